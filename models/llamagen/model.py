"""LlamaGen GPT ("Autoregressive Model Beats Diffusion", FoundationVision/LlamaGen), inference only.

A Llama decoder over VQ image tokens: RMSNorm, SwiGLU, 2D RoPE over the token grid, optional grouped
KV heads. The sequence is `cls_token_num` condition tokens (one class embedding for c2i, 120 projected
caption tokens for t2i) followed by the image tokens in raster order. Parameter and buffer names
follow the published state dicts (`c2i_*.pt`, `t2i_*.pt`, key "model"), so they load unchanged.

Three entry points share the same layers:
- `forward(idx, cond)`: teacher-forced logits, as the official training forward.
- `prefill(cond_embeddings, store)`: writes the condition tokens into a KV store.
- `decode_step(tokens, positions, store)`: new image tokens, each row at its own positions (one per
  row for a decode step, several for a verify window), with the logits of every new position.
Sampling (cfg, top-k, ...) is left to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels import decode
from kernels.linear import Linear
from models.kv.dense import DenseTokenStore
from models.kv.paged import PagedTokenStore
from models.kv.store import KVStore, TokenSpan


@dataclass
class GPTConfig:
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None: one KV head per query head
    ffn_hidden: int = 2048  # published: find_multiple(int(8 * dim / 3), 256)
    vocab_size: int = 16384
    block_size: int = 256  # image tokens per image, grid_size ** 2
    model_type: str = "c2i"  # "c2i" (class label) or "t2i" (caption embeddings)
    num_classes: int = 1000
    class_dropout: bool = True  # the embedding table has the extra null-class row used by cfg
    cls_token_num: int = 1  # condition tokens: 1 for c2i, 120 caption tokens for t2i
    caption_dim: int = 2048  # t2i: width of the (flan-t5-xl) caption features
    rope_base: int = 10000
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.dim % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"dim {self.dim}, n_head {self.n_head}, n_kv_head {self.n_kv_head} do not fit")
        if self.grid_size**2 != self.block_size:
            raise ValueError(f"block_size {self.block_size} is not a square token grid")
        if self.model_type not in ("c2i", "t2i"):
            raise ValueError(f"model_type must be 'c2i' or 't2i', not {self.model_type!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid_size(self) -> int:
        return round(self.block_size**0.5)

    @property
    def max_seq_len(self) -> int:
        # The last image token is sampled, never fed back: the model sees at most this many positions.
        return self.cls_token_num + self.block_size - 1


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        # Normalise in float32 even for bf16 weights, as the published models were trained.
        return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x) * self.weight


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_2d(pos: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    """pos: (S,) absolute positions -> (S, head_dim // 2, 2) [cos, sin] for each rotated pair.

    The first half of the pairs rotates with the token's grid row, the second half with its column.
    Condition positions get cos = sin = 0, i.e. their queries and keys are zeroed (not left
    unrotated): that is what the official table does and what the published weights were trained with."""
    half = cfg.head_dim // 2
    freqs = 1.0 / (cfg.rope_base ** (torch.arange(0, half, 2, device=pos.device)[: half // 2].float() / half))
    p = pos - cfg.cls_token_num
    cell = p.clamp(min=0)
    row, col = cell // cfg.grid_size, cell % cfg.grid_size
    angles = torch.cat([row.float()[:, None] * freqs, col.float()[:, None] * freqs], dim=-1)
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    return torch.where((p >= 0)[:, None, None], table, torch.zeros_like(table))


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x: (B, S, H, D), rope: (B or 1, S, D // 2, 2) -> x with each interleaved pair (x[2i], x[2i + 1])
    rotated in float32: as complex numbers, x * (cos + i sin), a few kernels instead of a dozen."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    rotated = xc * torch.view_as_complex(rope)[:, :, None]
    return torch.view_as_real(rotated).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wqkv = Linear(cfg.dim, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.wo = Linear(cfg.dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        mask: torch.Tensor | None,
        store: KVStore | None = None,
        at: TokenSpan | None = None,
    ) -> torch.Tensor:
        """x: (B, S, dim); rope: (B or 1, S, head_dim // 2, 2). Without a store: mask bool,
        broadcastable to (B, 1, S, S), or None for plain causal. With one: the new keys go to the
        store and the queries read it (causality and padding come from `at`); a ragged pass
        (`at.slots`) brings its M real tokens as x: (1, M, dim), which attention places in their
        rows' columns."""
        B, S, dim = x.shape
        H, H_kv = self.n_head, self.n_kv_head
        qkv = self.wqkv(x).view(B, S, H + 2 * H_kv, self.head_dim)
        qk = apply_rope(qkv[:, :, : H + H_kv], rope)  # q and k rotated in one go
        q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + H_kv :]
        if store is None:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # q: (B, H, S, D), k/v: (B, H_kv, S, D)
            # Query head h reads KV head h // (H / H_kv), as the official repeat_interleave.
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and S > 1, enable_gqa=H_kv != H
            )
            return self.wo(y.transpose(1, 2).reshape(B, S, dim))
        ragged = at.slots is not None
        if ragged:  # (1, M, heads, D) -> (R, S_pass, heads, D)
            q, k, v = (at.to_columns(t[0]) for t in (q, k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # q: (R, H, S, D), k/v: (R, H_kv, S, D)
        store.write(self.layer_idx, k, v, at)
        y = store.attend(self.layer_idx, q, at).transpose(1, 2)  # reads the store in its own layout
        if ragged:
            y = at.to_tokens(y)[None]
        return self.wo(y.reshape(B, S, dim))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.attention = Attention(cfg, layer_idx)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, rope, mask, store=None, at=None):
        h = x + self.attention(self.attention_norm(x), rope, mask, store, at)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """c2i: label -> one condition token. Row `num_classes` (present when trained with class dropout)
    is the null class that classifier-free guidance uses as the unconditional input."""

    def __init__(self, num_classes: int, dim: int, null_row: bool):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(null_row), dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """labels: (B,) long -> (B, 1, dim)."""
        return self.embedding_table(labels)[:, None]


class CaptionMLP(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = Linear(in_dim, dim, bias=False)
        self.fc2 = Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """t2i: caption features (B, 120, caption_dim) -> 120 condition tokens. `uncond_embedding` (a
    buffer in the published files) is the learned null caption for classifier-free guidance."""

    def __init__(self, caption_dim: int, dim: int, token_num: int):
        super().__init__()
        self.cap_proj = CaptionMLP(caption_dim, dim)
        self.register_buffer("uncond_embedding", torch.zeros(token_num, caption_dim))

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.cap_proj(caption)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        if cfg.model_type == "c2i":
            self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout)
        else:
            self.cls_embedding = CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.cls_token_num)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._rope_table: torch.Tensor | None = None  # float32 whatever the weights: not a buffer
        # decode_step's layers in one C call where it applies (kernels/decode.py); False keeps the
        # layer-by-layer path everywhere (the reference the fused one is tested against)
        self.fused_decode = True
        self._layer_weights_key: tuple | None = None
        self._layer_weights_ok = False
        self._head_in_c = False  # the output head runs in the fused decode call
        self._layer_weights_list: list[tuple[torch.Tensor, ...]] = []
        # the modules whose weights' storage says when that list is stale (held here: walking the
        # module tree for them cost more per step than the check)
        self._watched = (self.layers[0].attention.wqkv, self.layers[-1].feed_forward.w2, self.output)

    # -- conditions -------------------------------------------------------------------------------

    def embed_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """c2i labels (B,) long or t2i captions (B, cls_token_num, caption_dim) -> (B, cls_token_num, dim)."""
        return self.cls_embedding(cond)[:, : self.config.cls_token_num]

    def null_cond(self, batch: int) -> torch.Tensor:
        """The unconditional input for classifier-free guidance, in the form `embed_cond` takes."""
        if self.config.model_type == "c2i":
            if not self.config.class_dropout:
                raise ValueError("this c2i model has no null class (trained without class dropout)")
            device = self.tok_embeddings.weight.device
            return torch.full((batch,), self.config.num_classes, dtype=torch.long, device=device)
        unc = self.cls_embedding.uncond_embedding
        return unc.expand(batch, *unc.shape)

    # -- teacher-forced ---------------------------------------------------------------------------

    def forward(
        self, idx: torch.Tensor | None, cond: torch.Tensor, cond_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """idx: (B, T) long image tokens or None; cond: as `embed_cond`; cond_mask: (B, cls_token_num)
        bool, False for padded caption tokens, or None.

        -> logits (B, T + 1, vocab) float32 at the positions that predict image tokens 0..T, i.e. the
        last condition token and every image token (the official training forward's output)."""
        h = self.embed_cond(cond)
        if idx is not None:
            h = torch.cat([h, self.tok_embeddings(idx)], dim=1)
        L = h.shape[1]
        pos = torch.arange(L, device=h.device)
        mask = None  # plain causal
        if cond_mask is not None:
            causal = pos[None, :] <= pos[:, None]  # (L, L): query row, key column
            # A padded caption token still sees itself, so no softmax row is empty (official sampler).
            diag = pos[None, :] == pos[:, None]
            mask = ((causal & self.key_valid(cond_mask, L)[:, None, :]) | diag)[:, None]  # (B, 1, L, L)
        rope = rope_2d(pos, self.config)[None]
        for layer in self.layers:
            h = layer(h, rope, mask)
        return self.output(self.norm(h[:, self.config.cls_token_num - 1 :])).float()

    # -- cached inference seam --------------------------------------------------------------------

    def new_kv_store(self, rows: int, max_len: int | None = None) -> DenseTokenStore:
        """An empty store on the model's device and dtype; max_len defaults to the longest sequence."""
        c, w = self.config, self.tok_embeddings.weight
        return DenseTokenStore(
            c.n_layer, rows, c.n_kv_head, max_len or c.max_seq_len, c.head_dim, w.dtype, w.device
        )

    def key_valid(self, cond_mask: torch.Tensor | None, length: int | None = None) -> torch.Tensor | None:
        """cond_mask (B, C) bool, False at caption padding -> (B, length) bool: which key positions
        may be attended to (None stays None: nothing is padded)."""
        if cond_mask is None:
            return None
        valid = torch.ones(
            cond_mask.shape[0], length or self.config.max_seq_len, dtype=torch.bool, device=cond_mask.device
        )
        valid[:, : cond_mask.shape[1]] = cond_mask.bool()
        return valid

    def prefill(
        self, cond_embeddings: torch.Tensor, store: KVStore, key_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """cond_embeddings: (R, C, dim) from `embed_cond` (guided callers add the null rows);
        key_valid: from `key_valid` (the official t2i sampler masks both guidance halves alike).

        Writes positions 0..C-1 of the store -> logits (R, vocab) float32 for image token 0."""
        R, C = cond_embeddings.shape[:2]
        positions = torch.arange(C, device=cond_embeddings.device).expand(R, C)
        return self._cached_forward(cond_embeddings, TokenSpan(positions, key_valid), store, every=False)[
            :, -1
        ]

    def decode_step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        store: KVStore,
        key_valid: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens: (R, S) long image tokens at absolute positions `positions` (R, S) long (image token
        i sits at cls_token_num + i), consecutive per row, each row at its own place. slots: (M,)
        long, ascending indices into the R x S columns (each row's first columns: its window), for
        a pass whose rows' windows differ: only
        those columns' tokens are real and run through the layers (a pass costs its tokens, not
        R x S), the rest are padding at a scratch position past every real one.

        -> logits (R, S, vocab) float32: at column j, for the image token after tokens[:, j] (with
        `slots`, zero at the padding columns).

        On CPU in float32 with packed weights (kernels.linear.packing_pays) over a paged or dense
        token store, the layers run as one C call (kernels/decode.py), verify windows included, so
        a window and a step run the same code; elsewhere (CUDA, bf16/fp16, unpacked) layer by layer."""
        # the embedding table read directly: the module call's hook machinery cost as much as the
        # lookup at batch 1
        at = TokenSpan(positions, key_valid, slots)
        h = F.embedding(tokens if slots is None else at.to_tokens(tokens), self.tok_embeddings.weight)
        logits = self._fused_layers(h, at, store) if self.fused_decode else None
        if logits is None:
            logits = self._cached_forward(h if slots is None else h[None], at, store)
        return logits if slots is None else at.to_columns(logits.view(-1, logits.shape[-1]))

    def _fused_layers(self, h: torch.Tensor, at: TokenSpan, store: KVStore) -> torch.Tensor | None:
        """h: (R, S, dim), or (M, dim) at `at.slots` -> logits (R, S, vocab) or (M, vocab) float32
        through kernels/decode.py (the layers, the final norm and, where its weight is packed, the
        output head in one call), writing the store; None where that kernel does not apply
        (nothing written)."""
        if h.requires_grad:
            return None
        if isinstance(store, PagedTokenStore):
            k_cache, v_cache = store.pool.k_layers, store.pool.v_layers
            block_table = store.block_table
        elif isinstance(store, DenseTokenStore):  # one block of T_max positions per row
            k_cache, v_cache = store.k, store.v
            block_table = decode.dense_block_table(store.k[0].shape[0])
        else:
            return None
        weights = self._layer_weights()
        if not decode.applies(h, weights, k_cache, self._layer_weights_ok):
            return None
        c = self.config
        head = self.output.weight if self._head_in_c else None
        out = decode.decode_layers(
            h, at.positions, self._rope_table_on(h.device), weights, k_cache, v_cache, block_table,
            at.key_valid, c.n_head, c.norm_eps, self.norm.weight, head, at.slots,
        )  # fmt: skip
        return out if head is not None else self.output(out).float()

    def _layer_weights(self) -> list[tuple[torch.Tensor, ...]]:
        """Each layer's weights in kernels/decode.py's order, gathered once: at batch 1 walking the
        modules for them cost a third of a millisecond a step. Rebuilt when the weights' storage
        moved (a cast, a device move, a re-pack)."""
        first, last, head = (m.weight for m in self._watched)
        key = (first.data_ptr(), last.data_ptr(), head.data_ptr(), first.dtype, first.device)
        if self._layer_weights_key != key:
            self._layer_weights_list = decode.LayerWeights(
                (
                    layer.attention_norm.weight,
                    layer.attention.wqkv.weight,
                    layer.attention.wo.weight,
                    layer.ffn_norm.weight,
                    layer.feed_forward.w1.weight,
                    layer.feed_forward.w3.weight,
                    layer.feed_forward.w2.weight,
                )
                for layer in self.layers
            )
            self._layer_weights_ok = decode.weights_apply(self._layer_weights_list, self.norm.weight)
            self._head_in_c = decode.head_applies(head)
            self._layer_weights_key = key
        return self._layer_weights_list

    def _cached_forward(
        self, h: torch.Tensor, at: TokenSpan, store: KVStore, every: bool = True
    ) -> torch.Tensor:
        """h: (R, S, dim) at positions at.positions -> logits (R, S, vocab) float32, or (R, 1, vocab)
        of the last position only when not `every` (a prefill samples one token); a ragged pass's
        h: (1, M, dim) at `at.slots` -> (1, M, vocab)."""
        rope = self._rope(at.positions)
        if at.slots is not None:
            rope = at.to_tokens(rope)[None]
        for layer in self.layers:
            h = layer(h, rope, None, store, at)
        return self.output(self.norm(h if every else h[:, -1:])).float()

    def _rope(self, positions: torch.Tensor) -> torch.Tensor:
        """positions (R, S) -> (R, S, head_dim // 2, 2), gathered from a table built once (no host
        value is read, so a step never waits for the device)."""
        return self._rope_table_on(positions.device)[positions]

    def _rope_table_on(self, device: torch.device) -> torch.Tensor:
        """(max_seq_len + 1, head_dim // 2, 2): `rope_2d` of every position a step may feed."""
        if self._rope_table is None or self._rope_table.device != device:
            all_positions = torch.arange(self.config.max_seq_len + 1, device=device)
            self._rope_table = rope_2d(all_positions, self.config)
        return self._rope_table
