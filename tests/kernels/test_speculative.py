"""kernels/speculative.py: the C kernels against their PyTorch references (targets within float
rounding, acceptance decisions and tokens exactly), the references against their rules spelled
out one case at a time, and the races never drawing a token without mass."""

import functools

import pytest
import torch

from kernels import native
from kernels import speculative as ks

needs_c = pytest.mark.skipif(native.load("speculative") is None, reason="no C compiler")


def random_logits(g, b, S, V):
    return torch.randn(b, S, V, generator=g) * 3


SAMPLING = [  # (top_k, top_p) per row: no limit, top-k, top-k with top-p, greedy, top-p alone
    (0, 0.0),
    (20, 0.0),
    (20, 0.9),
    (1, 0.0),
    (0, 0.5),
]


@needs_c
@pytest.mark.parametrize("S, V", [(1, 16), (16, 512), (5, 100), (32, 2048)])
def test_target_probs_kernel_matches_the_reference(S, V):
    g = torch.Generator().manual_seed(S * V)
    b = len(SAMPLING)
    logits = random_logits(g, b, S, V)
    top_k = torch.tensor([k for k, _ in SAMPLING])
    top_p = torch.tensor([p for _, p in SAMPLING])
    temperature = torch.rand(b, generator=g) + 0.5
    p = ks.target_probs(logits, top_k, temperature, top_p)
    expected = ks.target_probs_reference(logits, top_k, temperature, top_p)
    torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-6)
    # the host's plan (largest k, any top-p) changes nothing but what is read back
    assert torch.equal(
        ks.target_probs_reference(logits, top_k, temperature, top_p, (V, True, True)), expected
    )
    assert torch.equal(p > 0, expected > 0)  # the same support
    assert ((p > 0).sum(-1)[1] == min(20, V)).all() and ((p > 0).sum(-1)[3] == 1).all()


def test_target_probs_reference_follows_its_rules():
    logits = torch.tensor([[[4.0, 3.0, 2.0, 1.0, 0.0]]]).expand(3, 1, 5)
    top_k, top_p = torch.tensor([2, 0, 0]), torch.tensor([0.0, 0.7, 0.0])
    p = ks.target_probs_reference(logits, top_k, torch.tensor([1.0, 1.0, 2.0]), top_p)
    torch.testing.assert_close(p[0, 0], torch.tensor([1, torch.e**-1, 0, 0, 0]) / (1 + torch.e**-1))
    # softmax mass 0.64, 0.24, ...: the first two reach 0.7, the rest are dropped
    assert torch.equal(p[1, 0] > 0, torch.tensor([True, True, False, False, False]))
    torch.testing.assert_close(p[1, 0].sum(), torch.tensor(1.0))
    torch.testing.assert_close(p[2, 0], (logits[2, 0] / 2).softmax(-1))


@needs_c
@pytest.mark.parametrize("S, V", [(1, 16), (16, 512), (5, 100), (3, 4096)])
def test_sample_kernel_draws_the_references_tokens(S, V):
    g = torch.Generator().manual_seed(S + V)
    b = 4 * len(SAMPLING)
    logits = random_logits(g, b, S, V)  # continuous: no ties at the k-th place
    top_k = torch.tensor([k for k, _ in SAMPLING] * 4)
    top_p = torch.tensor([p for _, p in SAMPLING] * 4)
    temperature = torch.rand(b, generator=g) + 0.5
    uniform = torch.rand(b, S, V, generator=g)
    tokens = ks.sample(logits, top_k, temperature, top_p, uniform)
    assert tokens.dtype == torch.long and tokens.shape == (b, S)
    assert torch.equal(tokens, ks.sample_reference(logits, top_k, temperature, top_p, uniform))
    assert torch.equal(tokens[3::5], logits[3::5].argmax(-1))  # top_k 1


@needs_c
def test_sample_kernel_breaks_ties_by_token():
    """Equal scores go to the smaller token (every uniform 0: every candidate scores inf), top_k 1
    among equal logits is argmax's first, and a dropped candidate never wins."""
    logits = torch.tensor([[[0.0, 2.0, 1.0, 2.0, 2.0, -1.0]]]).expand(3, 1, 6).contiguous()
    top_k, top_p = torch.tensor([3, 1, 0]), torch.tensor([0.0, 0.0, 0.5])
    zero = torch.zeros(3, 1, 6)
    assert ks.sample(logits, top_k, torch.ones(3), top_p, zero)[:, 0].tolist() == [1, 1, 1]
    uniform = torch.full((3, 1, 6), 0.5)
    uniform[:, :, 0] = 0.0  # token 0 would win any race it entered, but no rule keeps it
    uniform[:, :, 3] = 1e-6  # token 3 wins among the kept
    assert ks.sample(logits, top_k, torch.ones(3), top_p, uniform)[:, 0].tolist() == [3, 1, 3]


def window_case(seed, b=6, S=8, V=64, W=12, N=40):
    """Engine-shaped inputs: rows idx of a token table with n committed tokens and drafts, q rows
    at qrows, drafts drawn from q (so tests pass often), windows up to S."""
    g = torch.Generator().manual_seed(seed)
    B = b + 2
    tokens = torch.randint(V, (B, N), generator=g)
    idx = torch.randperm(B, generator=g)[:b]
    qrows = torch.randperm(b + 1, generator=g)[:b]
    n = torch.randint(1, N - S, (b,), generator=g)
    windows = torch.randint(1, S + 1, (b,), generator=g)
    windows[:2] = S
    p = ks.target_probs_reference(
        random_logits(g, b, S, V), torch.full((b,), 10), torch.ones(b), torch.zeros(b)
    )
    q = torch.rand(b + 1, W, V, generator=g)
    # a row's q its target (every draft passes), rows with q near it (most pass), the others
    # one-hot (fresh drafts)
    for j in range(b):
        if j == 1:
            q[qrows[j], :S] = p[j]
        elif j % 2:
            q[qrows[j], :S] = 0.8 * p[j] + 0.2 * q[qrows[j], :S] / q[qrows[j], :S].sum(-1, keepdim=True)
        else:
            q[qrows[j]] = 0
            q[qrows[j], torch.arange(W), torch.randint(V, (W,), generator=g)] = 1
        drafts = torch.multinomial(q[qrows[j], :S], 1, generator=g)[:, 0]
        tokens[idx[j], n[j] : n[j] + S] = drafts
    u = torch.rand(b, S, generator=g)
    e = torch.rand(b, S, V, generator=g)
    e[0, 0, :5] = 0.0  # a uniform of exactly 0 (a zero-mass token must still never win)
    coupled = torch.arange(b) % 3 == 0
    grouped = torch.rand(b, S, generator=g)
    use_group = torch.arange(b) % 4 == 3
    return p, q, qrows, tokens, idx, n, windows, u, e, coupled, grouped, use_group


@needs_c
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("grouping", [False, True])
def test_commit_kernel_matches_the_reference_exactly(seed, grouping):
    case = window_case(seed)
    if not grouping:
        case = case[:-2] + (None, None)
    p, q, qrows, tokens, idx, n, windows, u, e, coupled, grouped, use_group = case
    q_ref, tokens_ref = q.clone(), tokens.clone()
    k_ref = ks.commit_reference(
        p, q_ref, qrows, tokens_ref, idx, n, windows, u, e, coupled, grouped, use_group
    )
    k = ks.commit(p, q, qrows, tokens, idx, n, windows, u, e, coupled, grouped, use_group)
    assert torch.equal(k, k_ref)
    assert torch.equal(tokens, tokens_ref)
    # the q rows that become the next drafts' (offsets below the window's remaining drafts)
    for j in range(len(idx)):
        left = int(windows[j] - 1 - k[j])
        assert torch.equal(q[qrows[j], :left], q_ref[qrows[j], :left])
    assert k_ref.sum() > 0 and (k_ref == 0).any()  # both accepting and rejecting cases ran


def test_verify_reference_follows_its_rules():
    V = 4
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]]).expand(1, 3, V).clone()
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(1, 3, V).clone()
    drafts = torch.tensor([[0, 0, 0]])
    # column 0: ratio 0.5, u 0.4 passes; column 1: u 0.6 rejects -> the residual (0, 0.5): token 1
    u = torch.tensor([[0.4, 0.6, 0.0]])
    e = torch.full((1, 3, V), 0.5)
    k, tokens = ks.verify_reference(p, q, drafts, torch.tensor([3]), u, e, torch.tensor([False]))
    assert k.tolist() == [1] and tokens[0, :2].tolist() == [0, 1]
    assert tokens[0, 2] in (0, 1)  # past the last draft: a draw of p


def test_races_never_draw_a_token_without_mass_even_at_a_zero_uniform():
    weights = torch.tensor([[0.0, 1.0, 0.0, 2.0]]).expand(50, 4)
    uniform = torch.rand(50, 4, generator=torch.Generator().manual_seed(0))
    uniform[:, 0] = 0.0  # E = 0: w / E is 0 / 0 there
    assert set(ks.race(weights, uniform).tolist()) <= {1, 3}


def drafted_one_by_one(tokens, q, idx, qrows, n, lo, hi, grid):
    """fill_drafts' meaning, one draft at a time in order."""
    for j in range(len(n)):
        for t in range(int(lo[j]), int(hi[j])):
            pos = int(n[j]) + t
            row = tokens[idx[j]]
            row[pos] = row[pos - grid if pos >= grid else pos - 1]
            q[qrows[j], t] = torch.nn.functional.one_hot(row[pos], q.shape[-1]).float()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "fill",
    [
        ks.fill_drafts,
        ks.fill_drafts_reference,  # over every row of q
        functools.partial(
            ks.fill_drafts_reference, width=9
        ),  # over the widest fill only (hi 9), as the engine asks
    ],
)
def test_fresh_drafts_copy_the_token_above_or_on_the_first_row_the_left_one(seed, fill):
    g = torch.Generator().manual_seed(seed)
    grid, N, V, W = 4, 16, 7, 12
    # rows on the first grid row (chains of left neighbours), past it, with drafts held already,
    # and windows wider than a grid row (drafts copying drafts above); rows of the table and q out
    # of order, one row of each untouched
    n = torch.tensor([1, 2, 5, 3, 9])
    lo = torch.tensor([0, 1, 0, 2, 0])
    hi = torch.tensor([3, 6, 9, 4, 6])
    idx, qrows = torch.tensor([4, 0, 2, 5, 1]), torch.tensor([1, 3, 0, 5, 2])
    tokens = torch.randint(V, (6, N), generator=g)
    q = torch.rand(6, W, V, generator=g)
    expected_tokens, expected_q = tokens.clone(), q.clone()
    drafted_one_by_one(expected_tokens, expected_q, idx, qrows, n, lo, hi, grid)
    fill(tokens, q, idx, qrows, n, lo, hi, grid)
    assert torch.equal(tokens, expected_tokens) and torch.equal(q, expected_q)


@needs_c
@pytest.mark.parametrize("seed", range(4))
def test_grouped_ratio_kernel_matches_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    b, S, V, dim = 4, 8, 96, 16
    p = ks.target_probs_reference(
        random_logits(g, b, S, V), torch.tensor([20, 0, 5, 20]), torch.ones(b), torch.zeros(b)
    )
    # drafts in the support (some near its tail: neighbours among the tokens without mass) and
    # outside it, drafted with more probability than their target gives them
    ranked = p.sort(dim=-1, descending=True).indices
    in_support = ranked.gather(-1, torch.randint(5, (b, S, 1), generator=g))[..., 0]
    drafts = torch.where(
        torch.rand(b, S, generator=g) < 0.7, in_support, torch.randint(V, (b, S), generator=g)
    )
    other = ks.target_probs_reference(
        random_logits(g, b, S, V), torch.full((b,), 20), torch.ones(b), torch.zeros(b)
    )
    q = 0.5 * other + 0.5 * torch.nn.functional.one_hot(drafts, V)
    embeddings = torch.randn(V, dim, generator=g)
    half = torch.tensor([7, 3, 0, 7])
    p_thr = torch.tensor([0.15, 0.5, 0.15, 1.0])
    d_thr = torch.full((b,), 2.0 * dim)  # about the mean squared distance: some neighbours join
    ratio = ks.grouped_ratio(p, q, drafts, embeddings, half, p_thr, d_thr)
    expected = ks.grouped_ratio_reference(p, q, drafts, embeddings, half, p_thr, d_thr)
    torch.testing.assert_close(ratio, expected, rtol=1e-5, atol=1e-7)
    plain = (p.gather(-1, drafts[..., None]) / q.gather(-1, drafts[..., None]).clamp(min=1e-30)).clamp(max=1)[
        ..., 0
    ]
    torch.testing.assert_close(ratio[2], plain[2])  # a group of the draft alone: SJD's ratio
    assert (ratio[3] - plain[3]).abs().max() > 1e-3  # wide groups: neighbours joined somewhere


def test_grouped_ratio_reference_sums_the_group():
    V = 6
    p = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0, 0.0]).view(1, 1, V)
    q = torch.tensor([0.1, 0.6, 0.1, 0.1, 0.1, 0.0]).view(1, 1, V)
    embeddings = torch.eye(V)  # every pair at squared distance 2
    drafts = torch.tensor([[1]])
    one = torch.ones(1)
    # neighbours 0 and 2 within 0.15 of p_d = 0.3 (0.1 apart): (0.4 + 0.3 + 0.2) / (0.1 + 0.6 + 0.1)
    r = ks.grouped_ratio_reference(p, q, drafts, embeddings, torch.tensor([1]), 0.15 * one, 2.0 * one)
    torch.testing.assert_close(r, torch.tensor([[1.0]]))
    r = ks.grouped_ratio_reference(p, q, drafts, embeddings, torch.tensor([1]), 0.15 * one, 1.0 * one)
    torch.testing.assert_close(r, torch.tensor([[0.5]]))  # too far apart: the draft alone, 0.3 / 0.6


def test_the_references_read_nothing_back_from_the_device():
    """On a GPU the references are what runs, once a pass: a value read back (`int(t.max())`, a
    boolean mask's indexing, a loop until nothing changed) waits for the device. The meta device
    holds shapes and no values, so any such read raises there."""
    meta, b, S, V, W, N = "meta", 3, 8, 50, 12, 64
    longs = torch.zeros(b, dtype=torch.long, device=meta)
    floats = torch.zeros(b, device=meta)
    tokens = torch.zeros(b + 1, N, dtype=torch.long, device=meta)
    q = torch.zeros(b + 1, W, V, device=meta)
    p, e, u = (
        torch.zeros(b, S, V, device=meta),
        torch.zeros(b, S, V, device=meta),
        torch.zeros(b, S, device=meta),
    )
    drafts = torch.zeros(b, S, dtype=torch.long, device=meta)
    ks.fill_drafts_reference(tokens, q, longs, longs, longs, longs, longs, grid=8)
    coupled = torch.zeros(b, dtype=torch.bool, device=meta)
    accepted = ks.commit_reference(p, q, longs, tokens, longs, longs, longs, u, e, coupled)
    grouped = ks.grouped_ratio_reference(
        p, p, drafts, torch.zeros(V, 16, device=meta), longs, floats, floats, 7
    )
    plan = (V, True, True)  # as SamplerRows.plan gives it from the host
    probs = ks.target_probs_reference(p, longs, floats, floats, plan)
    drawn = ks.sample_reference(p, longs, floats, floats, e, plan)
    assert accepted.shape == (b,) and grouped.shape == drawn.shape == (b, S) and probs.shape == p.shape
