"""Batched next-scale generation: 10 forward passes, one per scale, over a preallocated KV cache.

Every image in a batch carries its own class, guidance, sampling settings and seed. Guidance runs
on a doubled batch (conditional rows, then null-class rows) only when some image asks for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from models.kv.compressed import SlabScaleStore, slab_nbytes
from models.kv.dense import DenseScaleStore
from models.kv.policies import ScaleGeometry, policy
from models.kv.profile import KVProfile
from models.kv.store import KVStore
from models.runtime import device_clock
from models.sampling import SamplerRows
from models.settings import ImageSettings
from models.var.model import GROUP_TOKENS, VAR
from models.var.tokenizer import VQVAE


@dataclass
class ScaleStep:
    """Handed to the progress callback after each scale; decoding f_hat gives a preview image."""

    index: int  # the scale just sampled
    total: int  # number of scales
    f_hat: torch.Tensor  # (B, Cvae, H, W) accumulated so far
    tokens: torch.Tensor  # (B, pn*pn) this scale's token map
    history: torch.Tensor  # (B, tokens so far) every scale's map up to this one, concatenated

    @property
    def tokens_per_image(self) -> int:
        return self.history.shape[1]

    def select(self, images: list[int]) -> ScaleStep:
        """The step of some of the batch's images only (a preview of those)."""
        index = torch.tensor(images, device=self.history.device)
        pick = [t.index_select(0, index) for t in (self.f_hat, self.tokens, self.history)]
        return ScaleStep(self.index, self.total, *pick)


@dataclass
class VAROutput:
    images: torch.Tensor  # (B, 3, H, W) float in [0, 1]
    tokens: list[torch.Tensor]  # per scale (B, pn*pn)
    forward_passes: int
    kv_bytes: int  # peak stored KV bytes of the batch (the prefix later scales read)
    kv_bytes_full: int  # the same for the uncompressed store
    kv_bytes_working: int  # peak with the scale being computed
    flops: float = field(default=0.0)  # matmul FLOPs of the transformer passes
    decode_s: float = 0.0  # seconds the VQ-VAE took to decode the tokens to pixels


def is_guided(settings: list[ImageSettings]) -> bool:
    """Whether a batch runs its null-class rows: VAR's cfg 0 is no guidance, and the batch's rows
    are guided together (the null rows follow all conditional ones)."""
    return any(s.cfg != 0 for s in settings)


def engine_rows(settings: list[ImageSettings]) -> int:
    """Rows a batch of these images runs."""
    return len(settings) * (2 if is_guided(settings) else 1)


def guidance_strength(settings: list[ImageSettings], si: int, n_scales: int) -> torch.Tensor:
    """(B,) t for scale si: (1 + t) * cond - t * uncond, t = cfg * si / (S - 1) ramped over the
    scales (the official schedule) or t = cfg at every scale ("constant")."""
    ratio = si / (n_scales - 1)
    return torch.tensor([s.cfg * (ratio if s.cfg_schedule == "linear" else 1.0) for s in settings])


def transformer_flops(model: VAR, rows: int) -> float:
    """Multiply-add FLOPs (x2) of the transformer over all scales for `rows` sequences."""
    c = model.cfg
    C, L = c.embed_dim, c.seq_len
    per_token_linear = c.depth * (3 * C * C + C * C + 2 * C * c.mlp_hidden) + C * c.vocab_size
    attn_pairs = sum(pn * pn * sum(q * q for q in c.patch_nums[: i + 1]) for i, pn in enumerate(c.patch_nums))
    return 2.0 * rows * (L * per_token_linear + c.depth * 2 * C * attn_pairs)


def scale_store(
    model: VAR, settings: list[ImageSettings], guided: bool, profile: KVProfile | None
) -> tuple[DenseScaleStore | SlabScaleStore, int]:
    """The batch's KV store from its images' kv_policy / kv_budget, and the bytes the uncompressed
    store would hold. All `full`: the dense store (one contiguous prefix, no gather); otherwise the
    slab store with each row's own policy (a guided image's null-class row takes its image's).
    Any mix runs; the server still batches one policy and budget at a time (service/queue.py
    `batch_key`), so that an image's arithmetic and its reported bytes are its own policy's."""
    c = model.cfg
    dtype, device = model.pos_1LC.dtype, model.pos_1LC.device
    rows = 2 * len(settings) if guided else len(settings)
    stored_len = c.seq_len - c.patch_nums[-1] ** 2  # the last scale is never read again
    full_bytes = 2 * c.depth * rows * c.num_heads * stored_len * c.head_dim * dtype.itemsize
    if all(s.kv_policy == "full" for s in settings):
        store = DenseScaleStore(c.depth, rows, c.num_heads, c.seq_len, c.head_dim, dtype, device, stored_len)
        return store, full_bytes
    geo = ScaleGeometry(tuple(c.patch_nums), c.depth, c.num_heads)
    profile = profile or KVProfile.default(geo.patch_nums, c.depth, c.num_heads)
    per_image = [
        (policy(s.kv_policy), 1.0 if s.kv_policy == "full" else s.kv_budget, s.kv_merge) for s in settings
    ]
    return SlabScaleStore(
        geo, per_image * (2 if guided else 1), profile, c.head_dim, dtype, device
    ), full_bytes


def planned_kv_bytes(model: VAR, settings: list[ImageSettings], profile: KVProfile | None) -> int:
    """The bytes `scale_store` allocates for these images, known before it runs (the server admits
    images by it under --kv-cache-bytes): all `full`, the dense store's whole buffer (the stored
    prefix and the last scale's working region it preallocates beside it, 680 positions at 256 px);
    otherwise the slab, each (row, layer, head) segment at the most its plan ever holds, K and V.
    Not counted: the slab store's current scale, handed over one layer and one group of rows at a
    time (activations bounded by the group, whatever the batch: the slab store's working extra)."""
    c = model.cfg
    itemsize = model.pos_1LC.dtype.itemsize
    copies = 2 if is_guided(settings) else 1  # a guided image's null-class row holds its own segments
    if all(s.kv_policy == "full" for s in settings):
        return 2 * c.depth * copies * len(settings) * c.num_heads * c.seq_len * c.head_dim * itemsize
    geo = ScaleGeometry(tuple(c.patch_nums), c.depth, c.num_heads)
    profile = profile or KVProfile.default(geo.patch_nums, c.depth, c.num_heads)
    rows = [(s.kv_policy, s.kv_budget, s.kv_merge) for s in settings] * copies
    return slab_nbytes(geo, profile, rows, c.head_dim, itemsize)


@torch.inference_mode()
def generate(
    model: VAR,
    vae: VQVAE,
    labels: list[int],
    settings: list[ImageSettings],
    on_scale: Callable[[ScaleStep], None] | None = None,
    decode: bool = True,
    profile: KVProfile | None = None,
    wrap_store: Callable[[DenseScaleStore], KVStore] | None = None,
) -> VAROutput:
    """labels: one class index per image; settings: one per image (its kv_policy and kv_budget
    choose what the batch's KV store keeps, see `scale_store`); profile: the model's offline KV
    profile for the policies that use one (None: KVProfile.default). `wrap_store` wraps the
    (dense, full-policy) store in one that delegates to it (calibration's recording store,
    models/kv/calibrate.py)."""
    c = model.cfg
    B, device = len(labels), model.pos_1LC.device
    dtype = model.pos_1LC.dtype
    n_scales = len(c.patch_nums)
    guided = is_guided(settings)
    rows = 2 * B if guided else B

    label_rows = torch.tensor(labels + ([c.num_classes] * B if guided else []), device=device)
    cond = model.class_emb(label_rows)  # (rows, C)
    mods = model.modulations(cond)
    pos = model.position_embedding()  # (1, L, C)
    sampler = SamplerRows.of(settings, device)

    store, full_bytes = scale_store(model, settings, guided, profile)
    if wrap_store is not None:
        store = wrap_store(store)
    f_hat = torch.zeros(B, c.vae_dim, c.patch_nums[-1], c.patch_nums[-1], device=device)
    x = model.start_tokens(cond)  # (rows, first_len, C)
    tokens, start = [], 0
    for si, pn in enumerate(c.patch_nums):
        h = model.blocks_forward(x, mods, store=store, start=start)  # (rows, pn*pn, C)
        t = guidance_strength(settings, si, n_scales).to(device).view(B, 1, 1)
        idx = torch.empty(B, pn * pn, dtype=torch.long, device=device)
        # (rows, pn*pn, V) logits of a large batch would not fit in cache: head, guidance and
        # sampling run on groups of images, each with its conditional and null-class rows.
        images_per_group = max(1, GROUP_TOKENS // (pn * pn * (2 if guided else 1)))
        for i in range(0, B, images_per_group):
            g = slice(i, min(i + images_per_group, B))
            logits = model.logits(h[g], cond[g])  # (b, pn*pn, V)
            if guided:
                uncond = model.logits(h[B + g.start : B + g.stop], cond[B + g.start : B + g.stop])
                logits = torch.lerp(uncond, logits, 1 + t[g])  # = (1 + t) * cond - t * uncond
            idx[g] = sampler[g].sample(logits)
        tokens.append(idx)
        next_in = vae.quantize.next_input(si, f_hat, idx)
        if on_scale is not None:
            on_scale(ScaleStep(si, n_scales, f_hat, idx, torch.cat(tokens, dim=1)))
        start += pn * pn
        if next_in is not None:
            pn_next = c.patch_nums[si + 1]
            x = model.word_embed(next_in.to(dtype)) + pos[:, start : start + pn_next * pn_next]
            if guided:
                x = torch.cat((x, x))
    # Each image is rebuilt from its own tokens at batch size 1: batched convolutions may differ in
    # the last bit with the batch size, which can flip an 8-bit pixel, and an image must not depend
    # on its batch. Per-image decoding is not the dearer choice: at batch 16 it took 3.1-3.7 s per
    # image against 4.2-4.9 s batched (VQ-VAE ch 160, 2 shared cores; earlier 1.96 against 2.58),
    # and at batch 4 the two were within noise (3.3-3.6 against 3.3-4.4).
    t0 = device_clock(f_hat.device) if decode else 0.0
    images = (
        torch.cat([vae.idx_to_img([t[i : i + 1] for t in tokens]) for i in range(B)]).add_(1).mul_(0.5)
        if decode
        else f_hat.new_zeros(0)
    )
    return VAROutput(
        images,
        tokens,
        n_scales,
        store.nbytes,
        full_bytes,
        store.working_nbytes,
        transformer_flops(model, rows),
        device_clock(f_hat.device) - t0 if decode else 0.0,
    )
