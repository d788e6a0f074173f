"""Per-row sampling: filters, seeds, and independence from the rest of the batch."""

import torch

from models.sampling import make_generators, sample


def run(logits, top_k, top_p, temperature=1.0, seeds=None):
    B = logits.shape[0]
    return sample(
        logits,
        torch.tensor([top_k] * B if isinstance(top_k, int) else top_k),
        torch.tensor([top_p] * B if isinstance(top_p, float) else top_p),
        torch.full((B,), temperature),
        make_generators(seeds or list(range(B)), "cpu"),
    )


def test_top_k_one_is_argmax():
    logits = torch.randn(3, 50, 100)
    assert torch.equal(run(logits, 1, 0.0), logits.argmax(-1))


def test_top_k_restricts_to_k_best():
    logits = torch.randn(2, 1, 64).expand(2, 2000, 64).contiguous()
    tokens = run(logits, 5, 0.0)
    for row in range(2):
        top5 = set(logits[row, 0].topk(5).indices.tolist())
        assert set(tokens[row].unique().tolist()) == top5  # all five, and only them, over 2000 draws


def test_top_p_keeps_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: p = 0.7 keeps {0, 1}; p = 0.85 keeps {0, 1, 2}
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(1, 4000, 4).contiguous()
    assert set(run(logits, 0, 0.7).unique().tolist()) == {0, 1}
    assert set(run(logits, 0, 0.85).unique().tolist()) == {0, 1, 2}
    assert set(run(logits, 0, 0.0).unique().tolist()) == {0, 1, 2, 3}


def test_frequencies_follow_probabilities():
    probs = torch.tensor([0.6, 0.3, 0.1])
    tokens = run(probs.log().expand(1, 20000, 3).contiguous(), 0, 0.0)
    freq = torch.bincount(tokens.flatten(), minlength=3).float() / tokens.numel()
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_low_temperature_concentrates_on_the_best_token():
    logits = torch.tensor([1.0, 0.9, 0.0]).expand(1, 1000, 3).contiguous()
    hot, cold = run(logits, 0, 0.0, temperature=1.0), run(logits, 0, 0.0, temperature=0.01)
    assert (cold == 0).all()
    assert (hot != 0).sum() > 200


def test_rows_use_their_own_settings_and_seed():
    logits = torch.randn(3, 300, 512)
    batch = run(logits, [1, 10, 0], [0.0, 0.0, 0.9], seeds=[7, 8, 9])
    for i, (k, p, seed) in enumerate([(1, 0.0, 7), (10, 0.0, 8), (0, 0.9, 9)]):
        alone = run(logits[i : i + 1], k, p, seeds=[seed])
        assert torch.equal(batch[i], alone[0])


def test_seed_reproduces_and_differs():
    logits = torch.randn(1, 500, 256)
    assert torch.equal(run(logits, 0, 0.0, seeds=[3]), run(logits, 0, 0.0, seeds=[3]))
    assert not torch.equal(run(logits, 0, 0.0, seeds=[3]), run(logits, 0, 0.0, seeds=[4]))


def test_last_bit_logit_noise_rarely_changes_tokens():
    """Another batch size can change logits in the last bit; the draw must not amplify it."""
    logits = torch.randn(1, 5000, 1024)
    noisy = logits * (1 + 1e-7 * torch.randn_like(logits))
    same = run(logits, 900, 0.95, seeds=[1]) == run(noisy, 900, 0.95, seeds=[1])
    assert same.float().mean() > 0.999


def test_unsorted_candidates_give_the_tokens_the_sorted_path_gives():
    # Same k everywhere and no top-p: candidates are left unsorted. A second row with a smaller k
    # forces the sorted path for row 0; its tokens must not change.
    torch.manual_seed(0)
    logits = torch.randn(1, 64, 1000) * 3
    unsorted = run(logits, 200, 1.0, seeds=[7])
    forced = run(torch.cat([logits, logits]), [200, 50], 1.0, seeds=[7, 8])[:1]
    assert torch.equal(unsorted, forced)
    assert len(set(unsorted[0].tolist())) > 20  # a real draw, not a constant


def test_sampler_rows_decide_on_the_host_what_sample_reads_from_the_tensors():
    """SamplerRows passes top-k / top-p facts known from the settings (no device read per step);
    the tokens are those of `sample` reading them from the tensors, group slices included."""
    from models.sampling import SamplerRows
    from models.settings import ImageSettings

    logits = torch.randn(6, 3, 300)
    settings = [
        ImageSettings(seed=i, top_k=k, top_p=p, temperature=t)
        for i, (k, p, t) in enumerate(
            [(0, 0.0, 1.0), (5, 0.0, 1.0), (400, 0.9, 0.7), (1, 0.0, 1.0), (50, 1.0, 2.0), (50, 0.5, 1.0)]
        )
    ]
    rows = SamplerRows.of(settings, "cpu")
    temps = torch.tensor([s.temperature for s in settings])
    expected = sample(logits, rows.top_k, rows.top_p, temps, make_generators(list(range(6)), "cpu"))
    assert torch.equal(rows.sample(logits), expected)
    uniform = SamplerRows.of(settings[1:2] * 3, "cpu")  # one k for all rows, no top-p: unordered path
    assert torch.equal(
        uniform.sample(logits[:3]),
        sample(
            logits[:3], uniform.top_k, uniform.top_p, uniform.temperature, make_generators([1] * 3, "cpu")
        ),
    )
    group = SamplerRows.of(settings, "cpu")[2:5]
    assert group.top_k_values == (400, 1, 50) and len(group.generators) == 3


def test_a_dropped_candidate_never_wins_even_at_a_zero_uniform(monkeypatch):
    # top-p keeps {0, 1} of four; the uniforms of the dropped ones are exactly 0 (Exp(1) = 0 there),
    # which made their score 0 / 0 = NaN, and argmax picks NaN
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(1, 200, 4).contiguous()
    real_rand = torch.rand

    def rand_with_zeros(*shape, **kw):
        u = real_rand(*shape, **kw)
        u[..., 2:] = 0.0
        return u

    monkeypatch.setattr(torch, "rand", rand_with_zeros)
    assert set(run(logits, 0, 0.7).unique().tolist()) == {0, 1}
