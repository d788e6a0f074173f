"""The fused decode layers (kernels/decode.py, kernels/cpu/decode.c) against the model's own
layer-by-layer path, the PyTorch reference they replace: logits and the keys and values written,
over paged and dense stores, grouped KV heads, head dims that are not a whole vector, rows at
ragged positions, verify windows and padded captions; and what the fused path must keep: a row's
numbers whatever its batch, the fallback where it does not apply."""

import pytest
import torch

from kernels import decode
from kernels.linear import pack_linear_weights
from models.kv.paged import BlockPool, PagedTokenStore
from models.llamagen.model import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not decode.available(), reason="no C compiler for the CPU kernels")

# (n_head, n_kv_head, head_dim): one KV head per query head, grouped (2 and 4 per KV head), and a
# head dim of 12, not a whole 8- or 16-float vector (the dot products' scalar tails)
HEADS = [(4, 4, 16), (4, 2, 16), (8, 2, 8), (4, 2, 12)]


def packed_gpt(n_head, n_kv_head, head_dim, model_type="c2i", cls_token_num=1, seed=0, vocab=64) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(
        dim=n_head * head_dim, n_layer=2, n_head=n_head, n_kv_head=n_kv_head, ffn_hidden=96, vocab_size=vocab,
        block_size=64, model_type=model_type, num_classes=10, cls_token_num=cls_token_num, caption_dim=16,
    )  # fmt: skip
    model = GPT(cfg).eval().requires_grad_(False)
    # published weights are far from the init's near-zero RMSNorm scale and tiny projections: give
    # every tensor unit-ish values, so the layers' glue (norms, RoPE, silu) sees real ranges
    for p in model.parameters():
        p.normal_(0, 1.0 if p.dim() == 1 else p.shape[-1] ** -0.5)
    pack_linear_weights(model)
    return model


def paged_store(model: GPT, rows: int, block_size: int = 16, spare: int = 3) -> PagedTokenStore:
    """A store whose rows hold every position, their blocks interleaved in the pool (row 0 block 0,
    row 1 block 0, ...) with unused blocks before them, so a wrong table lookup reads other rows."""
    c = model.config
    per_row = -(-c.max_seq_len // block_size)
    pool = BlockPool(c.n_layer, rows * per_row + spare, c.n_kv_head, block_size, c.head_dim)
    store = PagedTokenStore(pool, c.max_seq_len)
    store.set_rows([[spare + j * rows + r for j in range(per_row)] for r in range(rows)])
    return store


def both_paths(model, run):
    """run(model) under the fused path and the layer-by-layer path -> (fused, layers) results."""
    out = {}
    for fused in (True, False):
        model.fused_decode = fused
        with torch.inference_mode():
            out[fused] = run(model)
    model.fused_decode = True
    return out[True], out[False]


def decode_run(labels, steps, starts, make_store, window=1, cond=None, cond_mask=None):
    """Prefill the rows, feed `steps` windows of `window` tokens, each row from its own start (rows
    at ragged positions), -> (logits of every step, the store). A row's tokens follow from its
    label and positions alone, so a row gets the same ones in any batch."""

    def run(model):
        c = model.config
        store = make_store(model, len(labels))
        key_valid = model.key_valid(cond_mask)
        model.prefill(model.embed_cond(labels if cond is None else cond), store, key_valid)
        logits = []
        for i in range(steps):
            positions = c.cls_token_num + starts[:, None] + i * window + torch.arange(window)
            tokens = (labels.long()[:, None] * 7 + positions * 13) % c.vocab_size
            logits.append(model.decode_step(tokens, positions, store, key_valid))
        return torch.stack(logits), store

    return run


def cache_of(store, layer):
    if isinstance(store, PagedTokenStore):
        return store.pool.k[layer], store.pool.v[layer]
    return store.k[layer], store.v[layer]


@pytest.mark.parametrize("n_head, n_kv_head, head_dim", HEADS)
@pytest.mark.parametrize("store", ["paged", "dense"])
def test_decode_steps_match_the_layer_by_layer_path(n_head, n_kv_head, head_dim, store):
    model = packed_gpt(n_head, n_kv_head, head_dim)
    make = paged_store if store == "paged" else lambda m, rows: m.new_kv_store(rows)
    # three rows at their own positions: across block edges (16) as they go
    run = decode_run(torch.tensor([1, 4, 9]), steps=20, starts=torch.tensor([0, 5, 14]), make_store=make)
    (fused, fused_store), (layers, layers_store) = both_paths(model, run)
    assert fused.shape == (20, 3, 1, 64)
    torch.testing.assert_close(fused, layers, atol=1e-5, rtol=1e-5)
    for layer in range(model.config.n_layer):  # the keys and values each path wrote
        for got, want in zip(cache_of(fused_store, layer), cache_of(layers_store, layer), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vocab", [64, 60])
def test_the_output_head_runs_in_the_call_where_its_weight_is_packed(vocab):
    """The final norm always, and the output head where its weight is packed (a vocabulary of whole
    16-column panels), run inside the fused call; a vocabulary of 60 keeps the head in PyTorch.
    Either way the logits are the layer-by-layer path's."""
    model = packed_gpt(4, 2, 16, vocab=vocab)
    assert decode.linear.is_packed(model.output.weight) == (vocab % 16 == 0)
    run = decode_run(torch.tensor([1, 4]), steps=6, starts=torch.tensor([0, 9]), make_store=paged_store)
    (fused, _), (layers, _) = both_paths(model, run)
    assert fused.shape == (6, 2, 1, vocab) and fused.dtype == torch.float32
    torch.testing.assert_close(fused, layers, atol=1e-5, rtol=1e-5)
    assert model._head_in_c == (vocab % 16 == 0)


@pytest.mark.parametrize("n_head, n_kv_head, head_dim", HEADS[1:3])
@pytest.mark.parametrize("window", [2, 5])
def test_verify_windows_match_the_layer_by_layer_path(n_head, n_kv_head, head_dim, window):
    model = packed_gpt(n_head, n_kv_head, head_dim)
    run = decode_run(
        torch.tensor([2, 3]), steps=4, starts=torch.tensor([0, 7]), make_store=paged_store, window=window
    )
    (fused, _), (layers, _) = both_paths(model, run)
    assert fused.shape == (4, 2, window, 64)
    torch.testing.assert_close(fused, layers, atol=1e-5, rtol=1e-5)


def test_padded_captions_match_the_layer_by_layer_path():
    model = packed_gpt(4, 2, 16, model_type="t2i", cls_token_num=6)
    cond = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(2))
    cond_mask = torch.tensor([[False, False, True, True, True, True], [True] * 6])  # row 0 left-padded
    for window in (1, 3):
        run = decode_run(
            torch.zeros(2), steps=3, starts=torch.tensor([0, 2]), make_store=paged_store, window=window,
            cond=cond, cond_mask=cond_mask,
        )  # fmt: skip
        (fused, _), (layers, _) = both_paths(model, run)
        torch.testing.assert_close(fused, layers, atol=1e-5, rtol=1e-5)
        unmasked = decode_run(
            torch.zeros(2), steps=3, starts=torch.tensor([0, 2]), make_store=paged_store, window=window, cond=cond
        )  # fmt: skip
        with torch.inference_mode():
            plain, _ = unmasked(model)
        assert not torch.allclose(fused[:, 0], plain[:, 0], atol=1e-3)  # the mask is read...
        torch.testing.assert_close(fused[:, 1], plain[:, 1], atol=1e-5, rtol=1e-5)  # ...where it pads


def test_a_rows_logits_do_not_depend_on_its_batch():
    """Row 0 alone and beside two rows at other positions: the same bits (images are batch-independent)."""
    model = packed_gpt(4, 2, 16)
    with torch.inference_mode():
        alone, _ = decode_run(torch.tensor([3]), 12, torch.tensor([4]), paged_store)(model)
        batch, _ = decode_run(torch.tensor([3, 8, 1]), 12, torch.tensor([4, 0, 9]), paged_store)(model)
    assert torch.equal(batch[:, :1], alone)


def test_the_fused_kernel_runs_the_steps_and_the_prefill_does_not(monkeypatch):
    model = packed_gpt(4, 2, 16)
    calls = []
    real = decode.decode_layers
    monkeypatch.setattr(decode, "decode_layers", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    with torch.inference_mode():
        decode_run(torch.tensor([1, 2]), 3, torch.tensor([0, 3]), paged_store, window=2)(model)
    assert calls == [(2, 2, 64)] * 3  # every decode step, windows included; not the prefill


def test_where_the_kernel_does_not_apply_the_layers_run():
    """Unpacked weights (a CPU without AVX2, or not loaded through the loader) and float64 take the
    layer-by-layer path, with the same results as ever."""
    torch.manual_seed(0)
    cfg = GPTConfig(dim=64, n_layer=2, n_head=4, n_kv_head=2, ffn_hidden=96, vocab_size=64, block_size=16)
    model = GPT(cfg).eval().requires_grad_(False)
    run = decode_run(torch.tensor([1, 2]), 3, torch.tensor([0, 3]), lambda m, rows: m.new_kv_store(rows))
    (fused, _), (layers, _) = both_paths(model, run)
    assert torch.equal(fused, layers)
    weights = [(torch.ones(64), model.layers[0].attention.wqkv.weight)]
    assert not decode.applies(torch.ones(2, 1, 64), weights, [torch.ones(1, 2, 16, 16)])


def test_a_position_without_a_rope_entry_or_block_raises():
    model = packed_gpt(4, 2, 16)
    c = model.config
    store = paged_store(model, 1)
    with torch.inference_mode():
        model.prefill(model.embed_cond(torch.tensor([1])), store)
        with pytest.raises(IndexError, match="no RoPE entry or no cache block"):
            model.decode_step(torch.tensor([[3]]), torch.tensor([[c.max_seq_len + 1]]), store)


def ragged_passes(windows_per_pass, labels, ragged):
    """Prefill the rows, one plain step, then passes of each row's own window (its tokens
    consecutive after its last), every pass S = its widest window wide with the shorter windows'
    columns padding at the scratch position: run with `slots` (only the real tokens through the
    layers) or without (padding tokens through them too) -> run(model) -> (per pass the logits at
    the real columns, the store)."""

    def run(model):
        c = model.config
        R = len(labels)
        pool = BlockPool(c.n_layer, R * 5, c.n_kv_head, 16, c.head_dim)
        store = PagedTokenStore(pool, c.max_seq_len + 1)  # the scratch position's block too
        store.set_rows([[] for _ in range(R)])
        for r in range(R):
            store.grow(r, c.max_seq_len + 1)
        model.prefill(model.embed_cond(labels), store)
        model.decode_step(labels[:, None] % c.vocab_size, torch.full((R, 1), c.cls_token_num), store)
        nxt = [c.cls_token_num + 1] * R
        out = []
        for windows in windows_per_pass:
            S = max(windows)
            positions = torch.full((R, S), c.max_seq_len)
            for r, w in enumerate(windows):
                positions[r, :w] = nxt[r] + torch.arange(w)
                nxt[r] += w
            tokens = (labels[:, None] * 7 + positions * 13) % c.vocab_size
            real = torch.tensor([r * S + s for r, w in enumerate(windows) for s in range(w)])
            logits = model.decode_step(tokens, positions, store, slots=real if ragged else None)
            assert logits.shape == (R, S, c.vocab_size)
            if ragged:  # the padding columns' logits are zero
                pad = torch.ones(R * S, dtype=torch.bool).index_fill_(0, real, False)
                assert torch.equal(logits.flatten(0, 1)[pad], torch.zeros(int(pad.sum()), c.vocab_size))
            out.append(logits.flatten(0, 1)[real])
        return out, store

    return run


@pytest.mark.parametrize("n_head, n_kv_head, head_dim", HEADS[:3])
def test_a_ragged_pass_gives_each_real_token_the_padded_pass_logits(n_head, n_kv_head, head_dim):
    """A speculative row's window beside plain rows' single tokens (and windows of 1 and 3 beside
    one of 5, then the widest row plain): with `slots` only the real tokens go through the layers,
    on the fused path and the layer-by-layer one. Each real token gets the logits it gets in the
    padded pass, the same bits on the fused path (its products and glue are per token), and the
    keys and values at every real position are the same."""
    model = packed_gpt(n_head, n_kv_head, head_dim)
    labels = torch.tensor([1, 4, 9, 2])
    passes = [[1, 5, 1, 3], [4, 1, 2, 1], [1, 1, 1, 1], [2, 1, 1, 1]]
    with torch.inference_mode():
        padded, padded_store = ragged_passes(passes, labels, ragged=False)(model)
    (fused, fused_store), (layers, layers_store) = both_paths(
        model, ragged_passes(passes, labels, ragged=True)
    )
    for want, got_fused, got_layers in zip(padded, fused, layers, strict=True):
        assert torch.equal(got_fused, want)
        torch.testing.assert_close(got_layers, want, atol=1e-5, rtol=1e-5)
    c = model.config
    for layer in range(c.n_layer):
        for store in (fused_store, layers_store):
            for got, want in zip(cache_of(store, layer), cache_of(padded_store, layer), strict=True):
                table = padded_store.block_table.long()
                for r in range(len(labels)):
                    n = c.cls_token_num + 1 + sum(w[r] for w in passes)
                    rows_got = got[table[r]].transpose(0, 1).flatten(1, 2)[:, :n]  # (H_kv, n, D)
                    rows_want = want[table[r]].transpose(0, 1).flatten(1, 2)[:, :n]
                    torch.testing.assert_close(rows_got, rows_want, atol=1e-5, rtol=1e-5)


def test_the_kernel_refuses_slots_out_of_order_or_range():
    """The C kernel indexes its buffers by slot: slots out of order, repeated, outside R x S or not
    a row's first columns (a window from column 0, as attention reads it) raise rather than read
    or write past them, and a slot list that does not match the tokens is a ValueError."""
    model = packed_gpt(4, 2, 16)
    c = model.config
    store = paged_store(model, 2)
    positions = torch.tensor([[2, 3], [2, 3]])
    weights = model._layer_weights()
    with torch.inference_mode():
        model.prefill(model.embed_cond(torch.tensor([1, 2])), store)

        def run(slots, tokens=3):
            x = torch.randn(tokens, c.dim)
            return decode.decode_layers(
                x, positions, model._rope_table_on(x.device), weights, store.pool.k_layers,
                store.pool.v_layers, store.block_table, None, c.n_head, c.norm_eps,
                slots=torch.tensor(slots),
            )  # fmt: skip

        assert run([0, 1, 2]).shape == (3, c.dim)
        assert run([0, 2], tokens=2).shape == (2, c.dim)  # a window of 1 in each row
        for slots in ([1, 0, 2], [0, 0, 2], [0, 1, 4], [-1, 0, 2], [0, 3, 2], [1, 2, 3], [0, 1, 3]):
            with pytest.raises(IndexError, match="first columns, ascending, in 2 x 2"):
                run(slots, tokens=len(slots))
        with pytest.raises(ValueError, match="slots"):
            run([0, 1, 2], tokens=2)
