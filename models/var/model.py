"""The VAR transformer (next-scale prediction), parameter names as in the published checkpoints.

A token of scale s attends to every token of scales <= s. Conditioning is AdaLN from the class
embedding; the class index `num_classes` is the null class used for classifier-free guidance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention import attention
from kernels.linear import BatchInvariantLinear, batch_invariant_linear
from models.kv.store import KVStore, ScaleSpan

DEFAULT_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
# Rows of a batch go through the blocks in groups of about this many tokens, so activations (the
# FFN's 4C-wide hidden state above all) stay in the CPU's caches across layers; on CUDA it only
# bounds the activation memory of large batches.
GROUP_TOKENS = 1024
# Scales of at least this many tokens run their teacher-forced attention unmasked (block_causal_attention).
UNMASKED_MIN_TOKENS = 64


@dataclass(frozen=True)
class VARConfig:
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    num_classes: int = 1000
    vocab_size: int = 4096
    vae_dim: int = 32  # Cvae: channels of a VQ-VAE code vector
    patch_nums: tuple[int, ...] = DEFAULT_PATCH_NUMS
    mlp_hidden: int = 4096
    norm_eps: float = 1e-6

    @property
    def seq_len(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def first_len(self) -> int:
        return self.patch_nums[0] ** 2

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


def scale_index(patch_nums: tuple[int, ...]) -> torch.Tensor:
    """(L,) the scale each token position belongs to."""
    return torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(patch_nums)])


def unmasked_scales(patch_nums: tuple[int, ...]) -> list[tuple[int, int]]:
    """[(start, end)] of every scale from the first of at least UNMASKED_MIN_TOKENS tokens on."""
    spans, start = [], 0
    for pn in patch_nums:
        if spans or pn * pn >= UNMASKED_MIN_TOKENS:
            spans.append((start, start + pn * pn))
        start += pn * pn
    return spans


def block_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, spans: list[tuple[int, int]]
) -> torch.Tensor:
    """The teacher-forced pass's attention, = attention(q, k, v, bias) under the block-causal bias.
    q, k, v: (B, H, L, D); spans: unmasked_scales(). A query of a scale reads exactly the keys before
    its scale's end, so the large scales, most of the work, run unmasked on a key prefix (which skips
    the masked third of the score matrix); the coarse scales before them run in one masked call.
    Only for the block-causal bias: the large scales never read it. -> (B, H, L, D)."""
    if not spans:
        return attention(q, k, v, bias, scale=1.0)
    first = spans[0][0]
    parts = []
    if first > 0:
        mask = bias[..., :first, :first]
        parts.append(attention(q[:, :, :first], k[:, :, :first], v[:, :, :first], mask, scale=1.0))
    for start, end in spans:
        parts.append(attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], scale=1.0))
    return torch.cat(parts, dim=2)


def block_causal_bias(patch_nums: tuple[int, ...]) -> torch.Tensor:
    """(1, 1, L, L) additive mask: query of scale i sees keys of scale <= i."""
    lvl = scale_index(patch_nums)
    visible = lvl[:, None] >= lvl[None, :]
    return torch.where(visible, 0.0, -torch.inf).reshape(1, 1, len(lvl), len(lvl))


class SelfAttention(nn.Module):
    """Attention with l2-normalised q and k and a learned per-head temperature (`scale_mul_1H11`)."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        C, H = cfg.embed_dim, cfg.num_heads
        self.num_heads, self.head_dim = H, cfg.head_dim
        self.mat_qkv = BatchInvariantLinear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())
        self.max_scale_log = math.log(100)
        self.proj = BatchInvariantLinear(C, C)
        self.unmasked_spans = unmasked_scales(cfg.patch_nums)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        store: KVStore | None,
        layer: int,
        at: ScaleSpan | None,
    ) -> torch.Tensor:
        """x: (b, l, C) -> (b, l, C). Without a store: the teacher-forced pass, x a whole sequence under
        the block-causal `bias`. With
        one: the new keys of span `at` go to the store and the queries read it (every coarser scale
        and their own)."""
        B, L, C = x.shape
        qkv_bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = batch_invariant_linear(x, self.mat_qkv.weight, qkv_bias).view(
            B, L, 3, self.num_heads, self.head_dim
        )
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, D)
        q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(self.max_scale_log).exp()
        k = F.normalize(k, dim=-1)
        # l2-norm makes the 1/sqrt(D) scale moot: scale 1
        if store is None:
            out = block_causal_attention(q, k, v, bias, self.unmasked_spans)  # (B, H, L, D)
        else:
            store.write(layer, k, v, at)
            out = store.attend(layer, q, at, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.fc1 = BatchInvariantLinear(cfg.embed_dim, cfg.mlp_hidden)
        self.fc2 = BatchInvariantLinear(cfg.mlp_hidden, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNBlock(nn.Module):
    def __init__(self, cfg: VARConfig, layer: int):
        super().__init__()
        self.layer, self.eps = layer, cfg.norm_eps
        self.attn = SelfAttention(cfg)
        self.ffn = FFN(cfg)
        self.ada_lin = nn.Sequential(nn.SiLU(), BatchInvariantLinear(cfg.embed_dim, 6 * cfg.embed_dim))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """cond: (B, C) class embedding -> (B, 6, C) AdaLN gains, scales and shifts. It depends on the
        class only, so generation computes it once for all scales."""
        return self.ada_lin(cond).view(-1, 6, cond.shape[-1])

    def forward(
        self,
        x: torch.Tensor,
        mod: torch.Tensor,
        bias: torch.Tensor | None,
        store: KVStore | None,
        at: ScaleSpan | None,
    ) -> torch.Tensor:
        """x: (b, l, C), mod: (b, 6, C) from `modulation` -> (b, l, C)."""
        C = x.shape[-1]
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unsqueeze(1).unbind(2)
        h = F.layer_norm(x, (C,), eps=self.eps) * (scale1 + 1) + shift1
        x = x + self.attn(h, bias, store, self.layer, at) * gamma1
        h = F.layer_norm(x, (C,), eps=self.eps) * (scale2 + 1) + shift2
        return x + self.ffn(h) * gamma2


class AdaLNHead(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.eps = cfg.norm_eps
        self.ada_lin = nn.Sequential(nn.SiLU(), BatchInvariantLinear(cfg.embed_dim, 2 * cfg.embed_dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        C = x.shape[-1]
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, C).unbind(2)
        return F.layer_norm(x, (C,), eps=self.eps) * (scale + 1) + shift


class VAR(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        C, L = cfg.embed_dim, cfg.seq_len
        self.word_embed = BatchInvariantLinear(cfg.vae_dim, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, cfg.first_len, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, C))
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), C)
        self.blocks = nn.ModuleList(AdaLNBlock(cfg, i) for i in range(cfg.depth))
        self.head_nm = AdaLNHead(cfg)
        self.head = BatchInvariantLinear(C, cfg.vocab_size)
        # Published files carry these two buffers; we keep them so loading stays strict.
        self.register_buffer("lvl_1L", scale_index(cfg.patch_nums).view(1, L))
        self.register_buffer("attn_bias_for_masking", block_causal_bias(cfg.patch_nums))

    def position_embedding(self) -> torch.Tensor:
        """(1, L, C): scale (level) embedding + absolute position embedding of every token."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def start_tokens(self, cond: torch.Tensor) -> torch.Tensor:
        """cond: (B, C) class embedding -> (B, first_len, C) input of the first scale."""
        first = self.cfg.first_len
        return cond.unsqueeze(1) + self.pos_start + self.position_embedding()[:, :first]

    def modulations(self, cond: torch.Tensor) -> list[torch.Tensor]:
        """cond: (B, C) -> every block's (B, 6, C) AdaLN parameters."""
        return [block.modulation(cond) for block in self.blocks]

    def blocks_forward(
        self,
        x: torch.Tensor,
        mods: list[torch.Tensor],
        bias: torch.Tensor | None = None,
        store: KVStore | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """x: (B, l, C) tokens at positions start..start+l, mods: from `modulations` -> (B, l, C)."""
        B, l = x.shape[:2]
        rows_per_group = max(1, GROUP_TOKENS // l)
        out = torch.empty_like(x)
        for i in range(0, B, rows_per_group):
            rows = slice(i, min(i + rows_per_group, B))
            at = ScaleSpan(rows, start, start + l) if store is not None else None
            h = x[rows]
            for block, mod in zip(self.blocks, mods, strict=True):
                h = block(h, mod[rows], bias, store, at)
            out[rows] = h
        return out

    def logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x: (B, l, C) -> (B, l, V) in float32."""
        return self.head(self.head_nm(x, cond)).float()

    def forward(self, labels: torch.Tensor, next_scale_inputs: torch.Tensor) -> torch.Tensor:
        """Teacher-forced pass. labels: (B,), next_scale_inputs: (B, L - first_len, Cvae) built by the
        quantizer from ground-truth token maps -> logits (B, L, V)."""
        cond = self.class_emb(labels)
        x = torch.cat((self.start_tokens(cond), self.word_embed(next_scale_inputs)), dim=1)
        x[:, self.cfg.first_len :] += self.position_embedding()[:, self.cfg.first_len :]
        x = self.blocks_forward(x, self.modulations(cond), self.attn_bias_for_masking)
        return self.logits(x, cond)


def var_config_from_state_dict(state: dict[str, torch.Tensor], path) -> VARConfig:
    """Read the architecture off the tensors, so a user only names a file."""
    from models.loading import CheckpointError, count_indexed, require

    C, vae_dim = require(state, "word_embed.weight", path).shape
    num_classes = require(state, "class_emb.weight", path).shape[0] - 1
    depth = count_indexed(state, "blocks.")
    if depth == 0:
        raise CheckpointError(f"{path}: no 'blocks.0.*' keys: not a VAR transformer checkpoint")
    if "shared_ada_lin.1.weight" in state:
        raise CheckpointError(
            f"{path}: key 'shared_ada_lin.1.weight': shared-AdaLN VAR models are not supported"
        )
    num_heads = require(state, "blocks.0.attn.scale_mul_1H11", path).shape[1]
    seq_len = require(state, "pos_1LC", path).shape[1]
    n_scales = require(state, "lvl_embed.weight", path).shape[0]
    patch_nums = DEFAULT_PATCH_NUMS
    if "lvl_1L" in state and not state["lvl_1L"].is_meta:
        counts = torch.bincount(state["lvl_1L"].flatten().long(), minlength=n_scales).tolist()
        patch_nums = tuple(round(math.sqrt(c)) for c in counts)
    if len(patch_nums) != n_scales or sum(p * p for p in patch_nums) != seq_len:
        raise CheckpointError(
            f"{path}: key 'pos_1LC' holds {seq_len} positions over {n_scales} scales; "
            f"cannot tell the scale schedule (patch_nums)"
        )
    return VARConfig(
        depth=depth,
        embed_dim=C,
        num_heads=num_heads,
        num_classes=num_classes,
        vocab_size=require(state, "head.weight", path).shape[0],
        vae_dim=vae_dim,
        patch_nums=patch_nums,
        mlp_hidden=require(state, "blocks.0.ffn.fc1.weight", path).shape[0],
    )
