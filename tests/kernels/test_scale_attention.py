"""kernels/scale_attention.py: the reference against plain full attention, the CPU path and the
Triton kernels (in Triton's interpreter without a GPU, see conftest.py) against the reference."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kernels import scale_attention as sa

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(sa.triton is None, reason="triton is not installed (pip install triton)")
INTERPRETED = DEVICE == "cpu"
# Triton 3.9's interpreter gets tl.dot on bfloat16 inputs wrong (a lone 16x16 bf16 dot is off by
# ~1e10; fp16 and fp32 are right): the bf16 kernels are tested on a GPU only.
BF16_KERNEL = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.skipif(INTERPRETED, reason="bf16 tl.dot is wrong in Triton's interpreter; GPU only"),
)

# tolerances against the fp32 reference, per dtype of q / k / v (outputs and lse)
TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def layout(lengths, D, dtype=torch.float32, gap=3, seed=0):
    """Slabs with segments in a shuffled order and `gap` unused (NaN) slots after each."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths, dtype=torch.int32)
    order = torch.randperm(len(lengths), generator=g)
    offsets = torch.zeros_like(lengths)
    pos = 0
    for i in order.tolist():
        offsets[i] = pos
        pos += int(lengths[i]) + gap
    k = torch.randn(pos, D, generator=g)
    v = torch.randn(pos, D, generator=g)
    used = torch.zeros(pos, dtype=torch.bool)
    for o, n in zip(offsets.tolist(), lengths.tolist(), strict=True):
        used[o : o + n] = True
    k[~used], v[~used] = torch.nan, torch.nan  # never read
    return k.to(dtype), v.to(dtype), offsets, lengths, used


def current(B, H, Lq, D, dtype=torch.float32, seed=1, temperature=4.0, Lc=None):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, H, Lq, D, generator=g), dim=-1) * temperature
    k = F.normalize(torch.randn(B, H, Lc or Lq, D, generator=g), dim=-1)
    v = torch.randn(B, H, Lc or Lq, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def case(B, H, Lq, D, lengths, dtype=torch.float32, Lc=None, device=DEVICE):
    q, kc, vc = current(B, H, Lq, D, dtype, Lc=Lc)
    ks, vs, off, ln, used = layout(lengths, D, dtype)
    ks = F.normalize(ks.float(), dim=-1).to(dtype)
    to = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    return (*to(q, kc, vc, ks, vs, off, ln), used.to(device))


def dense(q, kc, vc, ks, vs, off, ln, scale=1.0):
    """Plain attention per (b, h) over [stored | current] by SDPA, in fp64."""
    B, H = q.shape[:2]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for b in range(B):
        for h in range(H):
            i = b * H + h
            o, n = int(off[i]), int(ln[i])
            k = torch.cat([ks[o : o + n], kc[b, h]]).double()
            v = torch.cat([vs[o : o + n], vc[b, h]]).double()
            out[b, h] = F.scaled_dot_product_attention(q[b, h].double()[None], k[None], v[None], scale=scale)[
                0
            ]
    return out


RAGGED = {
    # (B, H, Lq, D, lengths of the B*H segments)
    "uniform": (1, 2, 8, 16, [12, 12]),
    "empty-and-one": (2, 2, 5, 16, [0, 1, 7, 0]),
    # a batch of 2 images with guidance: rows (cond 0, cond 1, null 0, null 1), each head its own length
    "guidance-rows": (4, 2, 9, 32, [30, 17, 1, 40, 23, 0, 35, 5]),
    "lq1": (2, 3, 1, 64, [3, 0, 50, 1, 33, 16]),
    "long-tail": (1, 2, 37, 32, [65, 31]),
}


# --------------------------------------------------------------------------------------------
# the reference and the CPU path


def test_with_nothing_evicted_it_is_full_attention_over_the_prefix():
    """Every segment holds the whole prefix of its (row, head): plain SDPA over the concatenated
    dense prefix [prefix | current scale]."""
    B, H, T, Lq, D = 2, 3, 14, 9, 32
    q, kc, vc = current(B, H, Lq, D)
    k_pre, v_pre = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    ks, vs = k_pre.reshape(B * H * T, D), v_pre.reshape(B * H * T, D)
    off = torch.arange(B * H, dtype=torch.int32) * T
    ln = torch.full((B * H,), T, dtype=torch.int32)
    expected = F.scaled_dot_product_attention(
        q, torch.cat([k_pre, kc], 2), torch.cat([v_pre, vc], 2), scale=1.0
    )
    for fn in (sa.scale_attention_reference, sa.scale_attention):
        torch.testing.assert_close(fn(q, kc, vc, ks, vs, off, ln), expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", RAGGED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_and_cpu_path_match_dense_attention(name, dtype):
    B, H, Lq, D, lengths = RAGGED[name]
    q, kc, vc, ks, vs, off, ln, _ = case(B, H, Lq, D, lengths, dtype, device="cpu")
    expected = dense(q, kc, vc, ks, vs, off, ln)
    ref = sa.scale_attention_reference(q, kc, vc, ks, vs, off, ln)
    cpu = sa.scale_attention_cpu(q, kc, vc, ks, vs, off, ln)
    assert ref.dtype == cpu.dtype == dtype and cpu.shape == q.shape
    torch.testing.assert_close(ref.double(), expected, **TOL[dtype])
    torch.testing.assert_close(cpu.double(), expected, **TOL[dtype])


@pytest.mark.parametrize("name", RAGGED)
def test_mass_sums_to_the_queries_and_matches_dense_softmax(name):
    B, H, Lq, D, lengths = RAGGED[name]
    q, kc, vc, ks, vs, off, ln, used = case(B, H, Lq, D, lengths, device="cpu")
    ms, mc = sa.attention_mass_reference(q, kc, ks, off, ln)
    ms2, mc2 = sa.attention_mass_torch(q, kc, ks, off, ln, chunk=64)  # several chunks
    ms3, mc3 = sa.attention_mass_cpu(q, kc, ks, off, ln)  # the C kernel
    assert ms.shape == (ks.shape[0],) and mc.shape == (B, H, Lq) and ms.dtype == mc.dtype == torch.float32
    assert torch.all(ms[~used] == 0) and torch.all(ms2[~used] == 0) and torch.all(ms3[~used] == 0)
    for b in range(B):
        for h in range(H):
            i = b * H + h
            o, n = int(off[i]), int(ln[i])
            k = torch.cat([ks[o : o + n], kc[b, h]]).double()
            mass = (q[b, h].double() @ k.T).softmax(-1).sum(0)
            torch.testing.assert_close(ms[o : o + n].double(), mass[:n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mc[b, h].double(), mass[n:], atol=1e-5, rtol=1e-5)
            total = ms2[o : o + n].double().sum() + mc2[b, h].double().sum()
            torch.testing.assert_close(total, torch.tensor(float(Lq), dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(ms2, ms, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mc2, mc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ms3, ms, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mc3, mc, atol=1e-5, rtol=1e-5)


def test_observed_queries_are_a_subset_and_temperature_reaches_100():
    """The mass over a subset of a scale's queries (q has fewer rows than the current keys), with
    logits up to +-100."""
    B, H, Lc, D = 2, 2, 25, 16
    q, kc, vc, ks, vs, off, ln, _ = case(B, H, Lc, D, [20, 0, 3, 9], device="cpu")
    q = q[:, :, ::4] * 25  # 7 observed queries, temperature 100
    ms, mc = sa.attention_mass_reference(q, kc, ks, off, ln)
    ms2, mc2 = sa.attention_mass_cpu(q, kc, ks, off, ln)
    assert mc.shape == (B, H, Lc)
    torch.testing.assert_close(ms2, ms, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mc2, mc, atol=1e-5, rtol=1e-5)
    totals = mc.sum(-1).flatten() + torch.stack(
        [ms[o : o + n].sum() for o, n in zip(off.tolist(), ln.tolist(), strict=True)]
    )
    torch.testing.assert_close(totals, torch.full_like(totals, 7.0), atol=1e-4, rtol=0)
    out = sa.scale_attention(q, kc, vc, ks, vs, off, ln)
    torch.testing.assert_close(
        out, sa.scale_attention_reference(q, kc, vc, ks, vs, off, ln), atol=1e-5, rtol=1e-5
    )


def test_a_segments_result_does_not_depend_on_the_others():
    q, kc, vc, ks, vs, off, ln, _ = case(2, 2, 6, 16, [5, 9, 0, 3], device="cpu")
    out = sa.scale_attention(q, kc, vc, ks, vs, off, ln)
    ks2, vs2 = ks.clone(), vs.clone()
    o, n = int(off[1]), int(ln[1])
    ks2[o : o + n], vs2[o : o + n] = torch.randn(n, 16), torch.randn(n, 16)  # only segment 1 changes
    out2 = sa.scale_attention(q, kc, vc, ks2, vs2, off, ln)
    assert torch.equal(out[0, 0], out2[0, 0]) and torch.equal(out[1], out2[1])
    assert not torch.equal(out[0, 1], out2[0, 1])


def test_the_cpu_path_writes_into_a_given_output_and_returns_lse():
    q, kc, vc, ks, vs, off, ln, _ = case(1, 2, 5, 16, [4, 0], device="cpu")
    buf = torch.empty(1, 5, 2, 16)  # (B, Lq, H, D), as the projection reads it
    out, lse = sa.scale_attention(q, kc, vc, ks, vs, off, ln, return_lse=True, out=buf.transpose(1, 2))
    torch.testing.assert_close(buf.transpose(1, 2), sa.scale_attention_reference(q, kc, vc, ks, vs, off, ln))
    logits = [
        torch.cat([ks[int(o) : int(o) + int(n)], kc[0, h]]) @ q[0, h].T
        for h, (o, n) in enumerate(zip(off, ln, strict=True))
    ]
    torch.testing.assert_close(lse[0], torch.stack([x.logsumexp(0) for x in logits]))


# --------------------------------------------------------------------------------------------
# the C kernel (kernels/cpu/scale_attention.c) against the reference

needs_c = pytest.mark.skipif(sa._c_kernel() is None, reason="no C compiler for the CPU kernels")
# fp32 against the fp32 reference: the kernel's exp2 is a polynomial (2e-7 relative) and its sums
# run in another order; errors seen are ~5e-7 on outputs of size ~1 and lse up to ~10
C_TOL = dict(atol=1e-5, rtol=1e-5)
# logits of +-100 carry ~1e-5 of fp32 rounding on either side, which the softmax turns into relative
# error of the weights: 1.2e-5 seen on outputs with a build without FMA (no -march=native AVX2)
C_TOL_HOT = dict(atol=5e-5, rtol=1e-4)


@pytest.fixture
def c_only(monkeypatch):
    """Fail if the CPU entry points fall back to the PyTorch path instead of running the C kernel."""
    for name in ("scale_attention_torch", "attention_mass_torch"):
        monkeypatch.setattr(sa, name, lambda *a, **k: pytest.fail("the PyTorch path ran, not the C kernel"))


def c_case(B, H, Lq, D, lengths, Lc, seed=0):
    q, kc, vc = current(B, H, Lq, D, Lc=Lc, seed=seed + 1)
    ks, vs, off, ln, used = layout(lengths, D, seed=seed)
    return q, kc, vc, F.normalize(ks, dim=-1), vs, off, ln, used


def check_c(q, kc, vc, ks, vs, off, ln, used, tol=C_TOL):
    """The C forward (out, lse) and mass against the reference; the mass sums to the queries."""
    B, H, Lq, D = q.shape
    out, lse = sa.scale_attention(q, kc, vc, ks, vs, off, ln, return_lse=True)
    ref = sa.scale_attention_reference(q, kc, vc, ks, vs, off, ln)
    assert out.shape == q.shape and out.dtype == torch.float32 and lse.shape == (B, H, Lq)
    torch.testing.assert_close(out, ref, **tol)
    lse_ref = torch.stack(
        [
            (q[b, h] @ torch.cat([ks[int(o) : int(o) + int(n)], kc[b, h]]).T).logsumexp(-1)
            for b in range(B)
            for h, (o, n) in enumerate(zip(off[b * H : (b + 1) * H], ln[b * H : (b + 1) * H], strict=True))
        ]
    ).view(B, H, Lq)
    torch.testing.assert_close(lse, lse_ref, **tol)
    ms, mc = sa.attention_mass(q, kc, ks, off, ln)
    ms_ref, mc_ref = sa.attention_mass_reference(q, kc, ks, off, ln)
    torch.testing.assert_close(ms, ms_ref, **tol)
    torch.testing.assert_close(mc, mc_ref, **tol)
    assert torch.all(ms[~used] == 0)
    totals = mc.sum(-1).flatten().double() + torch.stack(
        [ms[o : o + n].double().sum() for o, n in zip(off.tolist(), ln.tolist(), strict=True)]
    )
    torch.testing.assert_close(totals, torch.full_like(totals, float(Lq)), atol=1e-4 * Lq, rtol=0)


@needs_c
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("Lq", [1, 4, 25, 61, 256])
@pytest.mark.parametrize("current_keys", ["Lc = Lq", "Lc < Lq", "Lc > Lq"])
def test_c_kernel_matches_the_reference_over_shapes(c_only, D, Lq, current_keys):
    """Ragged segments of 0, 1, a few and one far longer than the others (several key blocks and
    panels, a ragged last panel); Lq over one, several and a partial row block; the current keys
    as many as the queries (a scale), fewer, or more (a subset of a scale's queries)."""
    Lc = {"Lc = Lq": Lq, "Lc < Lq": max(1, Lq // 3), "Lc > Lq": 2 * Lq + 5}[current_keys]
    lengths = [0, 1, 7, 3 * Lq + 300, 33, 2]
    check_c(*c_case(2, 3, Lq, D, lengths, Lc))


@needs_c
@pytest.mark.parametrize("name", [n for n in RAGGED if RAGGED[n][3] % 16 == 0])
def test_c_kernel_matches_the_reference_on_ragged_layouts(c_only, name):
    """The layouts above, guidance rows among them (cond and null rows of 2 images, each head its
    own length), with logits up to +-100 (temperature 100)."""
    B, H, Lq, D, lengths = RAGGED[name]
    q, kc, vc, ks, vs, off, ln, used = c_case(B, H, Lq, D, lengths, Lq)
    check_c(q, kc, vc, ks, vs, off, ln, used)
    check_c(q * 25, kc, vc, ks, vs, off, ln, used, tol=C_TOL_HOT)


@needs_c
@pytest.mark.parametrize("D", [32, 64, 128])
def test_c_kernel_with_nothing_evicted_is_full_attention(c_only, D):
    """Every segment the whole prefix of its (row, head): plain SDPA over [prefix | current]."""
    B, H, T, Lq = 2, 4, 91, 64  # the 8x8 scale of 680-token VAR over its 91-token prefix
    q, kc, vc = current(B, H, Lq, D)
    k_pre, v_pre = F.normalize(torch.randn(B, H, T, D), dim=-1), torch.randn(B, H, T, D)
    off = torch.arange(B * H, dtype=torch.int64) * T
    ln = torch.full((B * H,), T, dtype=torch.int64)
    out = sa.scale_attention(q, kc, vc, k_pre.reshape(-1, D), v_pre.reshape(-1, D), off, ln)
    expected = F.scaled_dot_product_attention(
        q, torch.cat([k_pre, kc], 2), torch.cat([v_pre, vc], 2), scale=1.0
    )
    torch.testing.assert_close(out, expected, **C_TOL)


@needs_c
def test_c_kernel_takes_strided_inputs_and_writes_a_strided_output(c_only):
    """q, k and v as (B, L, H, D) buffers transposed, q and k with a d stride of 2, slabs as column
    slices of wider buffers (the values' last dim strided too: copied), out into (B, Lq, H, D)."""
    B, H, Lq, D = 2, 3, 37, 32
    q, kc, vc, ks, vs, off, ln, _ = c_case(B, H, Lq, D, [0, 40, 1, 9, 120, 3], Lq)
    q_t = torch.zeros(B, Lq, H, 2 * D)
    q_t[..., ::2] = q.transpose(1, 2)
    kc_t = torch.zeros(B, Lq, H, 2 * D)
    kc_t[..., ::2] = kc.transpose(1, 2)
    vc_t = vc.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.cat([ks, torch.zeros_like(ks), vs], 1)
    v_strided = torch.stack([vs, vs], -1).flatten(1)[:, ::2]
    q_s, kc_s = q_t.transpose(1, 2)[..., ::2], kc_t.transpose(1, 2)[..., ::2]
    assert q_s.stride(-1) == 2 and v_strided.stride(-1) == 2
    buf = torch.full((B, Lq, H, D), torch.nan)
    ref = sa.scale_attention_reference(q, kc, vc, ks, vs, off, ln)
    for k_slab, v_slab in ((wide[:, :D], wide[:, 2 * D :]), (ks, v_strided)):
        out = sa.scale_attention(q_s, kc_s, vc_t, k_slab, v_slab, off, ln, out=buf.transpose(1, 2))
        assert out.data_ptr() == buf.data_ptr()
        torch.testing.assert_close(buf.transpose(1, 2), ref, **C_TOL)
        ms, mc = sa.attention_mass(q_s, kc_s, k_slab, off, ln)
        ms_ref, mc_ref = sa.attention_mass_reference(q, kc, ks, off, ln)
        torch.testing.assert_close(ms, ms_ref, **C_TOL)
        torch.testing.assert_close(mc, mc_ref, **C_TOL)


@needs_c
def test_c_kernel_rows_do_not_depend_on_the_batch(c_only):
    """A (row, head) alone (its queries split into chunks across threads) and inside a batch of
    16 rows (one work item per segment) gets bit-identical outputs, lse and mass."""
    H, Lq, D = 2, 100, 64
    lengths = [(37 * i) % 150 for i in range(16 * H)]
    q, kc, vc, ks, vs, off, ln, _ = c_case(16, H, Lq, D, lengths, Lq)
    out, lse = sa.scale_attention(q, kc, vc, ks, vs, off, ln, return_lse=True)
    ms, mc = sa.attention_mass(q, kc, ks, off, ln)
    for b in (0, 5, 15):
        rows = slice(b * H, (b + 1) * H)
        out1, lse1 = sa.scale_attention(
            q[b : b + 1], kc[b : b + 1], vc[b : b + 1], ks, vs, off[rows], ln[rows], return_lse=True
        )
        ms1, mc1 = sa.attention_mass(q[b : b + 1], kc[b : b + 1], ks, off[rows], ln[rows])
        assert torch.equal(out1[0], out[b]) and torch.equal(lse1[0], lse[b]) and torch.equal(mc1[0], mc[b])
        for o, n in zip(off[rows].tolist(), ln[rows].tolist(), strict=True):
            assert torch.equal(ms1[o : o + n], ms[o : o + n])


@needs_c
def test_c_kernel_converts_16_bit_inputs_and_checks_the_segments(c_only):
    q, kc, vc, ks, vs, off, ln, _ = c_case(2, 2, 9, 32, [5, 0, 12, 1], 9)
    half = [t.to(torch.bfloat16) for t in (q, kc, vc, ks, vs)]
    out = sa.scale_attention(*half, off, ln)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out, sa.scale_attention_reference(*[t.float() for t in half], off, ln).to(torch.bfloat16)
    )
    with pytest.raises(AssertionError, match="outside the slab"):
        sa.scale_attention(q, kc, vc, ks, vs, off, ln + ks.shape[0])
    with pytest.raises(AssertionError, match="outside the slab"):
        sa.attention_mass(q, kc, ks, off - 10**6, ln)


def test_without_the_c_kernel_the_pytorch_path_runs(monkeypatch):
    """No compiler (or D not a multiple of 16): the PyTorch path, same results."""
    q, kc, vc, ks, vs, off, ln, _ = c_case(2, 2, 9, 32, [5, 0, 12, 1], 9)
    ref = sa.scale_attention_reference(q, kc, vc, ks, vs, off, ln)
    monkeypatch.setattr(sa, "_c_kernel", lambda: None)
    torch.testing.assert_close(sa.scale_attention(q, kc, vc, ks, vs, off, ln), ref, **C_TOL)
    monkeypatch.undo()
    q, kc, vc, ks, vs, off, ln, _ = c_case(2, 2, 9, 24, [5, 0, 12, 1], 9)
    called = []
    monkeypatch.setattr(sa, "_c_kernel", lambda: called.append(1))
    torch.testing.assert_close(
        sa.scale_attention(q, kc, vc, ks, vs, off, ln),
        sa.scale_attention_reference(q, kc, vc, ks, vs, off, ln),
        **C_TOL,
    )
    assert not called  # D = 24: not even looked up


# --------------------------------------------------------------------------------------------
# the Triton kernels against the reference


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@needs_triton
@pytest.mark.parametrize("name", RAGGED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16_KERNEL])
def test_triton_forward_matches_the_reference(name, dtype):
    B, H, Lq, D, lengths = RAGGED[name]
    q, kc, vc, ks, vs, off, ln, _ = case(B, H, Lq, D, lengths, dtype)
    out, lse = sa.scale_attention_triton(q, kc, vc, ks, vs, off, ln, return_lse=True, block_m=16, block_n=16)
    ref = sa.scale_attention_reference(q, kc, vc, ks, vs, off, ln)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), dense(q, kc, vc, ks, vs, off, ln), **TOL[dtype])
    torch.testing.assert_close(out, ref, **TOL[dtype])
    _, lse_ref = sa.scale_attention_cpu(
        q.float(), kc.float(), vc.float(), ks.float(), vs.float(), off, ln, return_lse=True
    )
    torch.testing.assert_close(lse, lse_ref, **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16_KERNEL])
def test_triton_mass_matches_the_reference_and_sums_to_the_queries(dtype):
    B, H, Lq, D, lengths = RAGGED["guidance-rows"]
    q, kc, vc, ks, vs, off, ln, used = case(B, H, Lq, D, lengths, dtype)
    _, lse = sa.scale_attention_triton(q, kc, vc, ks, vs, off, ln, return_lse=True, block_m=16, block_n=16)
    ms, mc = sa.attention_mass_triton(q, kc, ks, off, ln, lse=lse, block_m=16, block_n=16)
    ms_ref, mc_ref = sa.attention_mass_reference(q, kc, ks, off, ln)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ms, ms_ref, **tol)
    torch.testing.assert_close(mc, mc_ref, **tol)
    assert torch.all(ms[~used] == 0)
    totals = mc.sum(-1).flatten().double() + torch.stack(
        [ms[o : o + n].double().sum() for o, n in zip(off.tolist(), ln.tolist(), strict=True)]
    )
    torch.testing.assert_close(
        totals, torch.full_like(totals, float(Lq)), atol=1e-3 if dtype == torch.float32 else 5e-2, rtol=0
    )


@needs_triton
@pytest.mark.parametrize("D", [16, 32, 64])
@pytest.mark.parametrize("Lq,lengths", [(1, [0, 1]), (17, [40, 2]), (33, [0, 0])])
def test_triton_over_head_dims_and_query_tails(D, Lq, lengths):
    """Lq = 1 and Lq not a multiple of BLOCK_M (17, 33 over 16 / 32), the mass without a given lse,
    and (33, [0, 0]) with nothing stored at all."""
    q, kc, vc, ks, vs, off, ln, _ = case(1, 2, Lq, D, lengths)
    for bm, bn in ((16, 16), (32, 16)):
        out = sa.scale_attention_triton(q, kc, vc, ks, vs, off, ln, block_m=bm, block_n=bn)
        torch.testing.assert_close(
            out, sa.scale_attention_reference(q, kc, vc, ks, vs, off, ln), **TOL[torch.float32]
        )
    ms, mc = sa.attention_mass_triton(q, kc, ks, off, ln, block_n=16)
    ms_ref, mc_ref = sa.attention_mass_reference(q, kc, ks, off, ln)
    torch.testing.assert_close(ms, ms_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mc, mc_ref, atol=1e-5, rtol=1e-5)


@needs_triton
def test_triton_writes_a_strided_output_and_takes_strided_inputs():
    B, H, Lq, D = 2, 2, 10, 16
    q, kc, vc, ks, vs, off, ln, _ = case(B, H, Lq, D, [3, 0, 12, 1])
    # current K/V as (B, L, H, D) transposed, slabs as column slices of a wider buffer
    kc_t = kc.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.cat([ks, vs], 1)
    buf = torch.empty(B, Lq, H, D, device=q.device)
    sa.scale_attention_triton(
        q, kc_t, vc, wide[:, :D], wide[:, D:], off, ln, out=buf.transpose(1, 2), block_m=16, block_n=16
    )
    torch.testing.assert_close(
        buf.transpose(1, 2), sa.scale_attention_reference(q, kc, vc, ks, vs, off, ln), **TOL[torch.float32]
    )


@needs_triton
def test_the_wrapper_asserts_what_the_kernels_assume():
    q, kc, vc, ks, vs, off, ln, _ = case(1, 1, 4, 16, [2])
    with pytest.raises(AssertionError, match="16"):
        sa.scale_attention_triton(q, kc, vc, ks, vs, off, ln, block_m=8)
    q, kc, vc, ks, vs, off, ln, _ = case(1, 1, 4, 40, [2])
    with pytest.raises(AssertionError, match="power of two"):
        sa.scale_attention_triton(q, kc, vc, ks, vs, off, ln)


def test_dispatch_follows_the_device(monkeypatch):
    """CPU tensors take the CPU path (the C kernel) even with triton installed."""
    q, kc, vc, ks, vs, off, ln, _ = case(1, 2, 3, 16, [2, 5], device="cpu")
    monkeypatch.setattr(sa, "scale_attention_triton", lambda *a, **k: pytest.fail("triton on CPU tensors"))
    torch.testing.assert_close(
        sa.scale_attention(q, kc, vc, ks, vs, off, ln),
        sa.scale_attention_reference(q, kc, vc, ks, vs, off, ln),
    )


# --------------------------------------------------------------------------------------------
# bias_slab: a stored key standing for several merged keys (its log count on its logit)


def duplicated(ks, vs, off, ln, counts):
    """The layout in which each stored slot appears counts[slot] times in its segment: what a slot
    with bias log(count) must be equivalent to. -> (ks, vs, off, ln, map) where map[j] is the
    original slot of expanded slot j (-1 outside every segment)."""
    rows, starts, lens = [], [], []
    for o, n in zip(off.tolist(), ln.tolist(), strict=True):
        starts.append(sum(len(r) for r in rows))
        seg = [s for s in range(o, o + n) for _ in range(int(counts[s]))]
        rows.append(seg)
        lens.append(len(seg))
    flat = torch.tensor([s for r in rows for s in r], dtype=torch.long)
    dtype = off.dtype
    return ks[flat], vs[flat], torch.tensor(starts, dtype=dtype), torch.tensor(lens, dtype=dtype), flat


def biased_case(name, dtype=torch.float32, device="cpu"):
    B, H, Lq, D, lengths = RAGGED[name]
    q, kc, vc, ks, vs, off, ln, used = case(B, H, Lq, D, lengths, dtype, device=device)
    g = torch.Generator().manual_seed(5)
    counts = torch.randint(1, 5, (len(ks),), generator=g)
    bias = counts.float().log().masked_fill(~used.cpu(), torch.nan).to(device)  # unused: never read
    return (q, kc, vc, ks, vs, off, ln, used), counts, bias


def expected_with_counts(q, kc, vc, ks, vs, off, ln, counts):
    """(out, mass_slab, mass_cur) of plain attention over the duplicated layout, the mass of each
    original slot summed over its copies."""
    cpu = [t.cpu().float() for t in (q, kc, vc, ks, vs)]
    dks, dvs, doff, dln, flat = duplicated(cpu[3], cpu[4], off.cpu(), ln.cpu(), counts)
    out = sa.scale_attention_reference(*cpu[:3], dks, dvs, doff, dln)
    dms, mc = sa.attention_mass_reference(cpu[0], cpu[1], dks, doff, dln)
    ms = torch.zeros(len(ks)).index_add_(0, flat, dms)
    return out, ms, mc


@pytest.mark.parametrize("name", ["empty-and-one", "guidance-rows", "lq1", "long-tail"])
def test_a_log_count_bias_equals_that_many_copies_of_the_key(name):
    (q, kc, vc, ks, vs, off, ln, used), counts, bias = biased_case(name)
    out_ref, ms_ref, mc_ref = expected_with_counts(q, kc, vc, ks, vs, off, ln, counts)
    paths = {
        "reference": (
            sa.scale_attention_reference(q, kc, vc, ks, vs, off, ln, bias_slab=bias),
            sa.attention_mass_reference(q, kc, ks, off, ln, bias_slab=bias),
        ),
        "pytorch": (
            sa.scale_attention_torch(q, kc, vc, ks, vs, off, ln, bias_slab=bias),
            sa.attention_mass_torch(q, kc, ks, off, ln, bias_slab=bias),
        ),
        "cpu": (
            sa.scale_attention(q, kc, vc, ks, vs, off, ln, bias_slab=bias),
            sa.attention_mass(q, kc, ks, off, ln, bias_slab=bias),
        ),
    }
    for path, (out, (ms, mc)) in paths.items():
        torch.testing.assert_close(out, out_ref, **C_TOL, msg=lambda m, p=path: f"{p}: {m}")
        torch.testing.assert_close(ms[used], ms_ref[used], **C_TOL, msg=lambda m, p=path: f"{p}: {m}")
        torch.testing.assert_close(mc, mc_ref, **C_TOL, msg=lambda m, p=path: f"{p}: {m}")
    # and the bias matters: without it the result is another one
    assert max_err(sa.scale_attention(q, kc, vc, ks, vs, off, ln), out_ref) > 1e-2


@needs_c
def test_c_kernel_takes_the_bias(c_only):
    (q, kc, vc, ks, vs, off, ln, used), counts, bias = biased_case("guidance-rows")
    out_ref, ms_ref, mc_ref = expected_with_counts(q, kc, vc, ks, vs, off, ln, counts)
    out, lse = sa.scale_attention(q, kc, vc, ks, vs, off, ln, return_lse=True, bias_slab=bias)
    ms, mc = sa.attention_mass(q, kc, ks, off, ln, bias_slab=bias)
    torch.testing.assert_close(out, out_ref, **C_TOL)
    torch.testing.assert_close(ms[used], ms_ref[used], **C_TOL)
    torch.testing.assert_close(mc, mc_ref, **C_TOL)


@needs_c
@pytest.mark.parametrize("name", ["guidance-rows", "long-tail", "lq1"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_c_forward_with_the_mass_of_some_queries_is_the_two_calls_bit_for_bit(c_only, name, with_bias):
    (q, kc, vc, ks, vs, off, ln, used), counts, bias = biased_case(name)
    bias = bias if with_bias else None
    Lq = q.shape[2]
    g = torch.Generator().manual_seed(Lq)
    observed = torch.rand(Lq, generator=g) < 0.4
    observed[-1] = True  # the last query, in a partial row block
    out, ms, mc = sa.scale_attention_with_mass_cpu(q, kc, vc, ks, vs, off, ln, observed, bias_slab=bias)
    assert torch.equal(out, sa.scale_attention(q, kc, vc, ks, vs, off, ln, bias_slab=bias))
    ms_alone, mc_alone = sa.attention_mass(q[:, :, observed], kc, ks, off, ln, bias_slab=bias)
    assert torch.equal(ms, ms_alone) and torch.equal(mc, mc_alone)
    # every observed query's weights sum to one: the mass of none of the others
    total = mc.sum() + ms[used].sum()
    torch.testing.assert_close(
        total, torch.tensor(float(observed.sum() * q.shape[0] * q.shape[1])), rtol=1e-5, atol=0
    )


@needs_triton
@pytest.mark.parametrize("name", ["empty-and-one", "guidance-rows", "long-tail"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_takes_the_bias(name, dtype):
    (q, kc, vc, ks, vs, off, ln, used), counts, bias = biased_case(name, dtype, DEVICE)
    out_ref, ms_ref, mc_ref = expected_with_counts(q, kc, vc, ks, vs, off, ln, counts)
    out, lse = sa.scale_attention_triton(
        q, kc, vc, ks, vs, off, ln, return_lse=True, bias_slab=bias, block_m=16, block_n=16
    )
    ms, mc = sa.attention_mass_triton(q, kc, ks, off, ln, lse=lse, bias_slab=bias, block_m=16, block_n=16)
    tol = TOL[dtype] if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.cpu().float(), out_ref, **TOL[dtype])
    torch.testing.assert_close(ms[used].cpu(), ms_ref[used.cpu()], **tol)
    torch.testing.assert_close(mc.cpu(), mc_ref, **tol)
    # without a given lse the mass runs its own forward, with the bias
    ms2, _ = sa.attention_mass_triton(q, kc, ks, off, ln, bias_slab=bias, block_m=16, block_n=16)
    torch.testing.assert_close(ms2[used].cpu(), ms_ref[used.cpu()], **tol)


@pytest.mark.skipif(sa.triton is None, reason="triton is not installed")
def test_cuda_head_dims_the_kernels_cannot_take_run_the_pytorch_path():
    # the Triton kernels' lanes are a power of two >= 16 (every published VAR: 64); a custom model
    # with heads of 100 must not reach their assertion on a GPU
    def cuda_like(D):
        return SimpleNamespace(shape=(2, 4, 16, D), is_cuda=True)

    assert sa._use_triton(cuda_like(64), cuda_like(64)) and sa._use_triton(cuda_like(16))
    assert not sa._use_triton(cuda_like(100)) and not sa._use_triton(cuda_like(8))
    assert not sa._use_triton(cuda_like(64), SimpleNamespace(shape=(1, 64), is_cuda=False))
