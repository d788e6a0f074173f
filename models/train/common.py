"""Shared training plumbing: seeding, batches, the optimiser loop with progress logs, saving."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def setup(seed: int, threads: int = 1) -> torch.Generator:
    """Seed everything a run draws from and return the generator its stages draw from."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """(batch_size,) indices of a step: positions step * batch_size... of a stream of epochs, each a
    permutation of range(n) seeded by (seed, epoch). A function of the step, so a resumed run draws
    the batches the uninterrupted one would have drawn."""
    flat = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = flat // n, flat % n
    out = torch.empty(batch_size, dtype=torch.long)
    for e in epochs.unique().tolist():
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + e))
        here = epochs == e
        out[here] = order[offsets[here]]
    return out


def train(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
    n: int,
    batch_size: int,
    steps: int,
    lr: float,
    gen: torch.Generator,
    name: str,
    checkpoint: Path,
    weight_decay: float = 0.0,
    after_step: Callable[[int], None] | None = None,
    log_every: int = 50,
    save_every: int = 50,
    extend: bool = False,
) -> None:
    """AdamW with linear warm-up and cosine decay. loss_fn: batch indices -> (loss, logged values).

    Every `save_every` steps the model, optimiser, schedule and `gen` (which loss_fn and after_step
    draw from) go to `checkpoint`; a run that finds the file carries on from it, so a stopped run
    loses at most `save_every` steps and ends as an uninterrupted one would. extend: a checkpoint of
    a shorter run carries on under this run's longer schedule (its learning rate steps up to the
    longer cosine's value at that step). after_step must keep no
    state across a multiple of save_every (the tokenizers' code-use counts reset there)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    seed = int(gen.initial_seed())
    first, elapsed = 0, 0.0
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        if state["steps"] != steps and not (extend and steps > state["steps"]):
            raise SystemExit(
                f"{checkpoint}: a run of {state['steps']} steps, not {steps}; delete it to restart "
                "(or pass --extend to lengthen it)"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        first, elapsed = state["step"], state["elapsed"]
        print(f"[{name}] resuming at step {first}/{steps} ({elapsed:.0f}s so far)", flush=True)
    model.train()
    start = time.perf_counter() - elapsed
    for step in range(first, steps):
        loss, logs = loss_fn(batch_indices(n, batch_size, step, seed))
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
        if (step + 1) % save_every == 0 or step == steps - 1:
            state = dict(
                model=model.state_dict(),
                opt=opt.state_dict(),
                sched=sched.state_dict(),
                gen=gen.get_state(),
                step=step + 1,
                steps=steps,
                elapsed=time.perf_counter() - start,
            )
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, checkpoint.with_suffix(".tmp"))
            checkpoint.with_suffix(".tmp").replace(checkpoint)  # atomic: a kill never leaves half a file
    print(f"[{name}] trained {steps} steps in {time.perf_counter() - start:.0f}s", flush=True)
    model.eval()


def half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float16 storage halves a file; the loaders cast to the serving dtype."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def save(state: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file of contiguous float32 / integer tensors (no shared storage)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)
