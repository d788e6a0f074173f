"""Shared training plumbing: seeding, batches, the optimiser loop with progress logs, saving."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def setup(seed: int, threads: int = 1) -> torch.Generator:
    """Seed everything a run draws from and return the generator that orders its batches."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def batches(n: int, batch_size: int, steps: int, gen: torch.Generator):
    """Index tensors (batch_size,) for `steps` steps: epochs of a seeded permutation of range(n)."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat((order, torch.randperm(n, generator=gen)))
        yield order[:batch_size]
        order = order[batch_size:]


def train(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
    n: int,
    batch_size: int,
    steps: int,
    lr: float,
    gen: torch.Generator,
    name: str,
    weight_decay: float = 0.0,
    after_step: Callable[[int], None] | None = None,
    log_every: int = 50,
) -> None:
    """AdamW with linear warm-up and cosine decay. loss_fn: batch indices -> (loss, logged values)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * 0.5
            * (1 + torch.cos(torch.tensor(torch.pi * min(s, steps) / steps)).item())
        ),
    )
    model.train()
    start = time.perf_counter()
    for step, idx in enumerate(batches(n, batch_size, steps, gen)):
        loss, logs = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step(step)
        if step % log_every == 0 or step == steps - 1:
            values = " ".join(f"{k} {v:.4f}" for k, v in logs.items())
            print(
                f"[{name}] step {step}/{steps} loss {loss.item():.4f} {values} "
                f"({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    model.eval()


def half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float16 storage halves a file; the loaders cast to the serving dtype. (Not for VAR's VQ-VAE,
    which load_var keeps in the dtype it was stored in.)"""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def save(state: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file of contiguous float32 / integer tensors (no shared storage)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)
