"""Build LlamaGen models from published checkpoints, inferring the architecture from tensor shapes.

Only what no tensor records must be given: the GPT's head count (through `arch`, a published size,
or `n_head`) and its image size (the RoPE grid). Modules are built on the meta device and the file's
tensors assigned into them, so weights are allocated once; with meta tensors in (see
`models.loading.meta_state_dict`), nothing is allocated and the layout alone is checked.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kernels.linear import pack_linear_weights, packing_pays
from models.llamagen.model import GPT, GPTConfig
from models.llamagen.tokenizer import VQConfig, VQModel
from models.loading import CheckpointError, count_indexed, load_into, read_state_dict, require

# Published sizes (LlamaGen's GPT_models): arch -> (n_layer, n_head, dim).
GPT_ARCHS: dict[str, tuple[int, int, int]] = {
    "GPT-B": (12, 12, 768),
    "GPT-L": (24, 16, 1024),
    "GPT-XL": (36, 20, 1280),
    "GPT-XXL": (48, 24, 1536),
    "GPT-XXXL": (48, 40, 2560),
    "GPT-1B": (22, 32, 2048),
    "GPT-3B": (24, 32, 3200),
    "GPT-7B": (32, 32, 4096),
}


# Training-only state that may sit in a checkpoint: the RoPE table (recomputed from positions here)
# and the quantizer's codebook-usage ring buffer.
GPT_IGNORE = ("freqs_cis",)
VQ_IGNORE = ("quantize.codebook_used",)

StateOrPath = str | Path | dict[str, torch.Tensor]


def _read(source: StateOrPath) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(source, dict):
        return source, "<state dict>"
    return read_state_dict(source), str(source)


def gpt_config_from_state(
    state: dict[str, torch.Tensor],
    path: str | Path,
    arch: str | None = None,
    n_head: int | None = None,
    image_size: int | None = None,
    downsample: int = 16,
) -> GPTConfig:
    if arch is not None:
        if arch not in GPT_ARCHS:
            raise ValueError(f"unknown arch {arch!r}; published sizes: {', '.join(GPT_ARCHS)}")
        arch_layers, arch_heads, arch_dim = GPT_ARCHS[arch]
        if n_head is not None and n_head != arch_heads:
            raise ValueError(f"n_head={n_head} contradicts arch {arch} ({arch_heads} heads)")
        n_head = arch_heads
    if n_head is None:
        raise ValueError("the head count is not in the checkpoint: give arch= (e.g. 'GPT-XL') or n_head=")
    if image_size is None:
        raise ValueError("the token grid is not in the checkpoint: give image_size= (pixels, e.g. 384)")
    if image_size % downsample:
        raise ValueError(f"image_size {image_size} is not a multiple of the VQ downsampling {downsample}")

    vocab, dim = require(state, "tok_embeddings.weight", path).shape
    n_layer = count_indexed(state, "layers.")
    if arch is not None and (n_layer, dim) != (arch_layers, arch_dim):
        raise CheckpointError(
            f"{path}: {arch} has {arch_layers} layers of width {arch_dim}, the file has {n_layer} of {dim} "
            f"('layers.*', 'tok_embeddings.weight')"
        )
    if n_layer == 0:
        require(state, "layers.0.attention.wqkv.weight", path)
    if dim % n_head:
        raise CheckpointError(f"{path}: width {dim} ('tok_embeddings.weight') is not {n_head} heads")
    head_dim = dim // n_head

    key = "layers.0.attention.wqkv.weight"
    qkv_heads, rem = divmod(require(state, key, path).shape[0], head_dim)
    n_kv_head = (qkv_heads - n_head) // 2
    if rem or n_kv_head <= 0 or n_head + 2 * n_kv_head != qkv_heads or n_head % n_kv_head:
        raise CheckpointError(
            f"{path}: key '{key}' has shape {tuple(state[key].shape)}, which fits no KV head count "
            f"for {n_head} heads of dim {head_dim}"
        )
    ffn_hidden = require(state, "layers.0.feed_forward.w1.weight", path).shape[0]

    grid = image_size // downsample
    common = dict(
        dim=dim,
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=n_kv_head,
        ffn_hidden=ffn_hidden,
        vocab_size=vocab,
        block_size=grid * grid,
    )
    if "cls_embedding.embedding_table.weight" in state:
        # Published c2i models were trained with class dropout: the table's last row is the null class.
        rows = state["cls_embedding.embedding_table.weight"].shape[0]
        return GPTConfig(**common, model_type="c2i", num_classes=rows - 1, cls_token_num=1)
    if "cls_embedding.cap_proj.fc1.weight" in state:
        token_num, caption_dim = require(state, "cls_embedding.uncond_embedding", path).shape
        return GPTConfig(**common, model_type="t2i", cls_token_num=token_num, caption_dim=caption_dim)
    raise CheckpointError(
        f"{path}: missing key 'cls_embedding.embedding_table.weight' (c2i) or "
        f"'cls_embedding.cap_proj.fc1.weight' (t2i): not a LlamaGen GPT checkpoint"
    )


def load_gpt(
    path: StateOrPath,
    arch: str | None = None,
    n_head: int | None = None,
    image_size: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    downsample: int = 16,
) -> GPT:
    """A LlamaGen c2i or t2i GPT from a checkpoint file (or an already read state dict), in eval mode,
    its linear weights packed for `kernels.linear` where that pays (kernels.linear.packing_pays).

    The token grid is image_size // downsample: 16 for the VQ-16 tokenizer all published GPTs use."""
    state, name = _read(path)
    cfg = gpt_config_from_state(state, name, arch, n_head, image_size, downsample)
    model = _build(GPT, cfg, state, name, GPT_IGNORE, device, dtype)
    if packing_pays():  # CPU float32 on AVX-512: our 16-column panels, read at memory bandwidth
        pack_linear_weights(model)
    return model


def vq_config_from_state(state: dict[str, torch.Tensor], path: str | Path) -> VQConfig:
    ch = require(state, "encoder.conv_in.weight", path).shape[0]

    def mults(prefix: str, n: int) -> list[int]:
        out = []
        for i in range(n):
            key = f"{prefix}{i}.res.0.conv1.weight"
            c = require(state, key, path).shape[0]
            if c % ch:
                raise CheckpointError(f"{path}: key '{key}' has {c} channels, not a multiple of ch={ch}")
            out.append(c // ch)
        return out

    n_enc, n_dec = count_indexed(state, "encoder.conv_blocks."), count_indexed(state, "decoder.conv_blocks.")
    codebook_size, embed_dim = require(state, "quantize.embedding.weight", path).shape
    return VQConfig(
        codebook_size=codebook_size,
        codebook_embed_dim=embed_dim,
        z_channels=require(state, "encoder.conv_out.weight", path).shape[0],
        ch=ch,
        encoder_ch_mult=mults("encoder.conv_blocks.", max(n_enc, 1)),
        # decoder levels are stored deepest first
        decoder_ch_mult=mults("decoder.conv_blocks.", max(n_dec, 1))[::-1],
        encoder_res_blocks=count_indexed(state, "encoder.conv_blocks.0.res."),
        decoder_res_blocks=count_indexed(state, "decoder.conv_blocks.0.res."),
    )


def load_vq(
    path: StateOrPath, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> VQModel:
    """The LlamaGen VQ tokenizer (l2-normalised codebook, as the published VQ-16) from a checkpoint."""
    state, name = _read(path)
    return _build(VQModel, vq_config_from_state(state, name), state, name, VQ_IGNORE, device, dtype)


def _build(cls, cfg, state, name, ignore, device, dtype):
    with torch.device("meta"):
        model = cls(cfg)
    load_into(model, state, name, ignore=ignore)
    if any(p.is_meta for p in model.parameters()):
        return model.eval()  # layout check: meta in, meta out
    return model.to(device=device, dtype=dtype).eval()
