"""Token sampling with per-row temperature, top-k, top-p and random generator.

Each row of a batch draws its randomness from its own `torch.Generator`, always the same number
of draws per step, so a request's tokens do not depend on what else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import speculative as kernels
from models.settings import ImageSettings


def make_generators(seeds: list[int], device: torch.device | str) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def rand_into(out: torch.Tensor, generator: torch.Generator) -> None:
    """Fills `out` with uniforms in [0, 1) from `generator`: drawn straight into place where the
    generator lives on out's device, else drawn on its own device and copied (the same numbers)."""
    if generator.device == out.device:
        torch.rand(out.shape, generator=generator, out=out)
    else:
        out.copy_(torch.rand(out.shape, generator=generator, device=generator.device))


@dataclass
class SamplerRows:
    """The sampling settings of a batch's images as tensors, built once per batch, with each
    image's own generator. Indexing by a slice gives a group of rows that shares the generators."""

    top_k: torch.Tensor  # (B,) long
    top_p: torch.Tensor  # (B,) float32
    temperature: torch.Tensor  # (B,) float32
    generators: list[torch.Generator]
    # the same settings on the host, so a step never reads them back from the device
    top_k_values: tuple[int, ...] = ()
    top_p_values: tuple[float, ...] = ()

    @classmethod
    def of(
        cls,
        settings: list[ImageSettings],
        device: torch.device | str,
        generators: list[torch.Generator] | None = None,
    ) -> SamplerRows:
        """generators: the images' own when they carry one across calls, else fresh from their seeds."""
        top_k, top_p = tuple(s.top_k for s in settings), tuple(s.top_p for s in settings)
        return cls(
            torch.tensor(top_k, device=device),
            torch.tensor(top_p, device=device, dtype=torch.float32),
            torch.tensor([s.temperature for s in settings], device=device, dtype=torch.float32),
            generators if generators is not None else make_generators([s.seed for s in settings], device),
            top_k,
            top_p,
        )

    def __getitem__(self, rows: slice) -> SamplerRows:
        return SamplerRows(
            self.top_k[rows],
            self.top_p[rows],
            self.temperature[rows],
            self.generators[rows],
            self.top_k_values[rows],
            self.top_p_values[rows],
        )

    def select(self, rows: list[int]) -> SamplerRows:
        """The settings of some rows, in that order, with their generators."""
        idx = torch.tensor(rows, device=self.top_k.device)
        return SamplerRows(
            self.top_k[idx],
            self.top_p[idx],
            self.temperature[idx],
            [self.generators[i] for i in rows],
            tuple(self.top_k_values[i] for i in rows),
            tuple(self.top_p_values[i] for i in rows),
        )

    def plan(self, V: int) -> tuple[int, bool, bool]:
        """What kernels.speculative.candidate_probs would read from the tensors, from the host:
        (largest k, whether the candidates must be ordered, whether any row uses top-p)."""
        k = [min(k, V) if k > 0 else V for k in self.top_k_values]
        use_p = any(0 < p < 1 for p in self.top_p_values)
        return max(k), use_p or len(set(k)) > 1, use_p

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: (B, l, V) float32 -> tokens (B, l) long."""
        plan = self.plan(logits.shape[-1])
        return sample(logits, self.top_k, self.top_p, self.temperature, self.generators, plan)


def sample(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    temperature: torch.Tensor,
    generators: list[torch.Generator],
    plan: tuple[int, bool, bool] | None = None,
) -> torch.Tensor:
    """logits: (B, l, V) float32; top_k: (B,) long; top_p, temperature: (B,) float -> tokens (B, l) long.

    Top-k is applied before top-p, top-p keeps the smallest set of most likely tokens whose mass
    reaches p (the most likely token always stays): kernels.speculative.candidate_probs, which the
    speculative targets share; kernels.speculative.sample draws from them. A row with top_k == 1
    is exact argmax. plan: (largest k, whether candidates must be ordered, whether any row uses
    top-p) when the caller knows them on the host (SamplerRows); else they are read from the
    tensors."""
    B, l, V = logits.shape
    # Exponential race (Gumbel-max): token = argmax p_j / E_j with E_j ~ Exp(1) drawn for every
    # vocabulary id from the row's own generator. Unlike an inverse-CDF draw, a last-bit change in
    # the logits (another batch size picks another matmul kernel) or one candidate entering or
    # leaving the top-p set only changes the outcome if that candidate was about to win.
    uniform = torch.empty(B, l, V, device=logits.device)
    for row, g in zip(uniform, generators, strict=True):
        rand_into(row, g)
    return kernels.sample(logits, top_k, temperature, top_p, uniform, plan)
