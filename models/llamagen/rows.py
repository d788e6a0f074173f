"""The rows of a next-token batch as the device sees them: every sequence's own row, then the null
rows of the guided ones, paired by `null_of`; classifier-free guidance over their logits (each
image its own cfg, per image token under cfg_interval) and the draw of the guided logits."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from models.llamagen.model import GPT
from models.sampling import SamplerRows
from models.settings import ImageSettings

if TYPE_CHECKING:
    from models.llamagen.generate import Sequence


class Rows:
    """What a set of sequences' rows share on the device: the guidance pairing (row B + j is the
    null row of guided_seqs[j], `null_of[j]` its partner), the (G, block_size) table of each
    guided image's cfg per image token, the padding mask and the sampler tensors."""

    def __init__(self, model: GPT, seqs: list[Sequence], device: torch.device, max_len: int):
        c = model.config
        self.seqs = seqs
        self.block_size = c.block_size
        guided = [i for i, s in enumerate(seqs) if s.guided]
        self.null_of = torch.tensor(guided, dtype=torch.long, device=device)
        self.guided_seqs = [seqs[i] for i in guided]
        self.tables = [s.blocks[0] for s in seqs] + [s.blocks[1] for s in self.guided_seqs]
        self.sampler = SamplerRows.of([s.settings for s in seqs], device, [s.generator for s in seqs])
        # each guided image's cfg per image token, on the host: a pass reads its columns' there and
        # hands the device one number where they agree (the usual case, no cfg_interval)
        self.cfg_host = [[cfg_at(s.settings, t) for t in range(c.block_size)] for s in self.guided_seqs]
        self.null_of_host = guided  # null_of on the host
        self._all_guided = guided == list(range(len(seqs)))
        agreed = {x for table in self.cfg_host for x in table}
        self.uniform_cfg = agreed.pop() if len(agreed) == 1 else None
        # the official sampler masks a guided image's null row as its own row; a negative caption
        # brings its own padding
        masks = [s.cond_mask for s in seqs] + [
            s.cond_mask if s.negative is None else s.negative.mask for s in self.guided_seqs
        ]
        self.key_valid = None
        if any(m is not None for m in masks):
            full = torch.ones(c.cls_token_num, dtype=torch.bool, device=device)
            cond_mask = torch.stack([full if m is None else m.to(device) for m in masks])
            self.key_valid = model.key_valid(cond_mask, max_len)

    @property
    def count(self) -> int:
        """Rows: every sequence's own, then the guided ones' null rows."""
        return len(self.tables)

    def guide(self, logits: torch.Tensor, first: list[int]) -> torch.Tensor:
        """logits: (rows, S, V), own rows then null rows; first: per sequence, the image token of
        its first column -> (B, S, V): uncond + cfg * (cond - uncond) for the guided images, each
        column with its own token's cfg (cfg_interval)."""
        B, S = len(self.seqs), logits.shape[1]
        cond = logits[:B]
        if not self.guided_seqs:
            return cond
        scale = self.uniform_cfg
        if scale is None:
            last = self.block_size - 1
            scale = torch.tensor(
                [
                    [table[min(first[i] + t, last)] for t in range(S)]
                    for i, table in zip(self.null_of_host, self.cfg_host, strict=True)
                ],
                dtype=torch.float32,
                device=logits.device,
            )[..., None]  # (G, S, 1)
        if self._all_guided:  # null row j belongs to sequence j: no rows to pick out
            return torch.lerp(logits[B:], cond, scale)
        return cond.index_copy(0, self.null_of, torch.lerp(logits[B:], cond[self.null_of], scale))

    def sample(self, logits: torch.Tensor, first: list[int]) -> torch.Tensor:
        """logits: (rows, 1, V); first: per sequence, the image token it samples now -> (B, 1) tokens."""
        return self.sampler.sample(self.guide(logits, first))


def cfg_at(settings: ImageSettings, token: int) -> float:
    return settings.cfg if settings.cfg_interval < 0 or token <= settings.cfg_interval else 1.0
