"""Text encoders for text-conditional models: prompts -> caption embeddings and their mask.

The interface is one method, `encode(prompts) -> (embeddings (B, T, D), mask (B, T) bool)`, with
`dim` and `max_tokens` attributes. The published LlamaGen t2i models read flan-t5-xl features
(T = 120, D = 2048), loaded here from a local directory through `transformers`: nothing is
fetched from a hub at run time.
"""

from __future__ import annotations

from pathlib import Path

import torch


class TextEncoderError(ValueError):
    pass


def left_pad(emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each caption's valid tokens to the end and zero the padding, as the official t2i
    sampler does before generation: the image tokens then follow the last word directly.
    emb: (B, T, D), mask: (B, T) with the valid tokens first -> same shapes."""
    out_emb, out_mask = torch.zeros_like(emb), torch.zeros_like(mask, dtype=torch.bool)
    for b in range(emb.shape[0]):
        n = int(mask[b].sum())
        if n:
            out_emb[b, -n:] = emb[b, :n]
            out_mask[b, -n:] = True
    return out_emb, out_mask


class T5TextEncoder:
    def __init__(self, path: str | Path, device: str = "cpu", max_tokens: int = 120):
        path = Path(path)
        if not path.is_dir():
            raise TextEncoderError(f"{path}: no such text-encoder directory (a local T5 checkpoint)")
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError:
            raise TextEncoderError(
                "text-conditional models need transformers: pip install 'varserve[text]'"
            ) from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = T5EncoderModel.from_pretrained(path, local_files_only=True).to(device).eval()
        except (OSError, ValueError) as e:
            raise TextEncoderError(f"{path}: cannot load a T5 encoder ({e})") from None
        self.device, self.max_tokens = device, max_tokens
        self.dim = self.model.config.d_model

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> embeddings (B, max_tokens, dim) float32 and mask (B, max_tokens) bool, left-padded."""
        batch = self.tokenizer(
            prompts,
            max_length=self.max_tokens,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        return left_pad(hidden.float(), batch.attention_mask.bool())


def load_text_encoder(kind: str, path: str | Path, device: str, max_tokens: int):
    if kind == "t5":
        return T5TextEncoder(path, device, max_tokens)
    raise TextEncoderError(f"unknown text encoder kind '{kind}'")
