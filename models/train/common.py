"""Shared training plumbing: seeding, batches, the optimiser loop with progress logs, a stage's run
settings, the one recipe both tokenizers train by, saving."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from models.train.outer_levels import check_equivalent, fix_outer_levels
from models.train.vq import restart_dead_codes


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
    warm_start: Path | None = None,
) -> None:
    """AdamW with linear warm-up and cosine decay. loss_fn: batch indices -> (loss, logged values).

    Every `save_every` steps the model, optimiser, schedule and `gen` (which loss_fn and after_step
    draw from) go to `checkpoint`; a run that finds the file carries on from it, so a stopped run
    loses at most `save_every` steps and ends as an uninterrupted one would. extend: a checkpoint of
    a run of another length carries on under this run's schedule (its learning rate steps to this
    cosine's value at that step), longer or shorter, as long as steps remain. after_step must keep no
    state across a multiple of save_every (the tokenizers' code-use counts reset there). warm_start:
    a safetensors file of the model's weights (a stage's saved output) that a run without a
    checkpoint starts from instead of its initialisation, under a fresh optimiser and schedule; the
    checkpoints of such a run resume it as any other."""
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
        if state["steps"] != steps and not (extend and steps > state["step"]):
            raise SystemExit(
                f"{checkpoint}: a run of {state['steps']} steps at step {state['step']}, not {steps}; "
                "delete it to restart (or pass --extend to carry it on under a schedule of this length)"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        first, elapsed = state["step"], state["elapsed"]
        for group, base in zip(opt.param_groups, sched.base_lrs, strict=True):
            group["lr"] = base * sched.lr_lambdas[0](first)  # this schedule's, if its length changed
        print(f"[{name}] resuming at step {first}/{steps} ({elapsed:.0f}s so far)", flush=True)
        if warm_start is not None and first == steps:
            print(f"[{name}] --warm-start: {checkpoint} is a finished run, nothing to train", flush=True)
    elif warm_start is not None:
        if not warm_start.is_file():
            raise SystemExit(f"--warm-start: {warm_start} is not a file (a stage's saved weights)")
        model.load_state_dict(load_file(warm_start))  # fp16 on disk, cast into the fp32 parameters
        print(f"[{name}] warm start from {warm_start}, {steps} steps", flush=True)
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


@dataclass(frozen=True)
class Run:
    """What the command line sets for one stage's train() call, so a stage takes one value."""

    steps: int
    batch_size: int
    checkpoints: Path  # the folder; each stage names its own file in it
    extend: bool = False
    save_every: int = 50
    warm_start: Path | None = None  # the stage's saved weights to start from (without a checkpoint)

    def train(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
        n: int,
        gen: torch.Generator,
        name: str,
        checkpoint: str,
        lr: float,
        weight_decay: float = 0.0,
        after_step: Callable[[int], None] | None = None,
    ) -> None:
        """train() over n examples with this run's settings, checkpointing to checkpoints/checkpoint."""
        train(
            model,
            loss_fn,
            n,
            self.batch_size,
            self.steps,
            lr,
            gen,
            name,
            self.checkpoints / checkpoint,
            weight_decay=weight_decay,
            after_step=after_step,
            save_every=self.save_every,
            extend=self.extend,
            warm_start=self.warm_start,
        )


def train_tokenizer(
    tokenizer: nn.Module,
    forward: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, ...]],
    images: torch.Tensor,
    gen: torch.Generator,
    run: Run,
    name: str,
    checkpoint: str,
) -> nn.Module:
    """Train either family's freshly built tokenizer on images the one way both are trained: the
    fixed outer level, reconstruction (MSE + L1) plus the quantiser's VQ loss, and dead-code restarts.

    forward: (tokenizer, images) -> (reconstruction, vq loss, codes used (N,) long, the encoder
    features they coded (N, D)), one of models.train.vq's. -> the tokenizer, frozen."""
    fix_outer_levels(tokenizer)
    check_equivalent(tokenizer.eval(), images[:4])
    embedding = tokenizer.quantize.embedding
    hits = torch.zeros(embedding.num_embeddings)
    last: dict[str, torch.Tensor] = {}

    def loss_fn(idx):
        x = images[idx]
        recon, vq_loss, used, features = forward(tokenizer, x)
        hits.add_(torch.bincount(used, minlength=len(hits)))
        last["features"] = features.detach()
        rec = F.mse_loss(recon, x) + F.l1_loss(recon, x)
        return rec + vq_loss, {"rec": rec.item(), "vq": vq_loss.item(), "codes": (hits > 0).sum().item()}

    def after_step(step):
        # Codes are counted over one save interval: the counts are not checkpointed, so this way a
        # resumed run counts (and restarts) as the uninterrupted one.
        if (step + 1) % run.save_every == 0:
            if step < run.steps * 3 // 4:  # let the codebook settle before the end
                restart_dead_codes(embedding, hits, last["features"], gen)
            hits.zero_()

    run.train(tokenizer, loss_fn, len(images), gen, name, checkpoint, lr=2e-3, after_step=after_step)
    return tokenizer.requires_grad_(False)


def half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float16 storage halves a file; the loaders cast to the serving dtype."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def save(state: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file of contiguous float32 / integer tensors (no shared storage)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)
