"""The training loop: the optimiser, one step's differentiable call, one epoch of steps with its divergence
guards, and the end of an epoch (validation, the best and the resumable checkpoints, the epoch's line)."""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from knnsolver import distributed
from knnsolver.data.batches import iterate_batches
from knnsolver.errors import DivergenceError, TrainingWarning
from knnsolver.hostsync import avoid_host_sync
from knnsolver.interfaces import EpochContext, Solver
from knnsolver.training.batch_plan import process_batches
from knnsolver.training.batchnorm import freeze_batchnorm
from knnsolver.training.checkpoint import save_checkpoint, write_jsonl
from knnsolver.training.config import PRECISIONS, TrainConfig
from knnsolver.training.parallel import data_parallel
from knnsolver.training.run import BEST, CHECKPOINT, LOG, Run, select_key
from knnsolver.training.schedule import lr_factor

# A run whose epoch loss exceeds this multiple of its first epoch's is flagged as diverged; the first epoch itself,
# over FIRST_EPOCH_FACTOR times the run's first step's (early losses may rise: CRC's dictionary of untrained
# embeddings gave a first step of 0.14 and a first epoch of 6.9 on digits, then 0.08).
DIVERGENCE_FACTOR = 10.0
FIRST_EPOCH_FACTOR = 100.0
# On a GPU the step's non-finite flags and loss are read back every this many steps, not every step.
_GPU_READ_EVERY = 32


def _fused(device: torch.device) -> bool:
    """Whether the optimiser runs fused (one kernel per step, its step counts on the device, no host read):
    on the accelerator paths; the CPU keeps the default implementation, so CPU results stay as they were."""
    return avoid_host_sync(device)


def build_optimizer(config: TrainConfig, params: list[dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    fused = {"fused": True} if _fused(device) else {}
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, **fused)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay, **fused)


class LossStep(nn.Module):
    """``solver(model(x), y, rows)`` as one call: what one training step differentiates.

    The network runs under autocast when ``autocast_dtype`` is given (mixed
    precision); its embeddings are cast to fp32 before the solver, whose maths
    (distances, log-sum-exps, ridge solves) stays in fp32. Returns the loss and
    a 0-d bool tensor saying whether every embedding was finite (checked on the
    device, read with the step's other flags).
    """

    def __init__(self, model: nn.Module, solver: Solver, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model, self.solver = model, solver
        self.autocast_dtype = autocast_dtype

    def forward(self, x: Tensor, labels: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(x.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            embeddings = self.model(x)
        embeddings = embeddings.float()
        return self.solver(embeddings, labels, rows), torch.isfinite(embeddings.detach()).all()


def loss_step(run: Run) -> nn.Module:
    """The training step: network and solver wrapped for data parallelism when distributed,
    the network compiled with ``config.compile`` in ``config.compile_mode`` (and on accelerators the solver's loss
    maths), autocast with ``config.precision``."""
    model, solver = data_parallel(run.model, run.solver, run.device)
    if run.config.compile:
        model = torch.compile(model, **({} if run.config.compile_mode == "default" else {"mode": run.config.compile_mode}))
        if run.device.type != "cpu":  # on the CPU the compiled loss maths measured slower (benchmarks/README.md)
            run.solver.compile_loss()
    return LossStep(model, solver, PRECISIONS[run.config.precision])


def end_epoch(run: Run, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, epoch: int, row: dict[str, Any],
              history: list[dict[str, Any]], best_score: float, fingerprint: dict[str, Any] | None = None) -> float:
    """Validate, keep the best checkpoint, append to the log, save the resumable checkpoint; return the best score."""
    config, out = run.config, run.folder or Path(run.config.out)
    is_eval_epoch = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
    if is_eval_epoch and run.data.val is not None:
        start = time.perf_counter()
        row.update(run.evaluate(run.data.val, "val_"))
        row["seconds_val"] = time.perf_counter() - start
        run.progress.add("validation", row["seconds_val"])
    history.append(row)
    score = row.get(select_key(config))
    if run.data.val is None and epoch + 1 == config.epochs:
        # No validation split: the last epoch is the one kept, also when a resume raised the epoch count.
        score = float(epoch + 1)
    improved = score is not None and score > best_score
    run.progress.say(epoch_line(row, config, improved and run.data.val is not None))
    if improved:
        best_score = score
        run.calibrate()  # best.pt holds the statistics its evaluation used (no-op after validation)
        save_checkpoint({"model": run.model.state_dict(), "solver": run.solver.state_dict(), "epoch": epoch,
                         "solver_options": run.solver_options}, out / BEST)
    write_jsonl(history, out / LOG)
    save_checkpoint(
        {"config": config.to_dict(), "model": run.model.state_dict(), "solver": run.solver.state_dict(),
         "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch, "history": history,
         "world_size": distributed.world_size(),
         "solver_options": run.solver_options,
         "best_score": best_score, "bn_current": run.bn_current, "data": fingerprint},
        out / CHECKPOINT,
    )
    return best_score


# The validation scores an epoch line shows (when logged), after the one that selects the best epoch.
_SHOWN_VAL = ("val_map_at_r",)


def epoch_line(row: dict[str, Any], config: TrainConfig, best: bool = False) -> str:
    """One epoch in one line: loss, validation score(s), time, and the RBF solver's sigma and mean RBF value."""
    parts = [f"loss {row['loss']:.4f}"]
    for key in dict.fromkeys((select_key(config), *_SHOWN_VAL)):  # once each (disjoint splits select by MAP@R)
        if row.get(key) is not None:
            parts.append(f"{key} {row[key]:.4f}")
    seconds = row["seconds"] + row.get("seconds_refresh", 0.0) + row.get("seconds_val", 0.0)
    split = [f"train {row['seconds']:.1f}"] + [f"{name} {row[k]:.1f}" for name, k in
                                              (("refresh", "seconds_refresh"), ("val", "seconds_val")) if k in row]
    parts.append(f"{seconds:.1f} s ({', '.join(split)}; {row['samples_per_s']:.0f} rows/s)")
    if "solver_sigma" in row:
        parts.append(f"sigma {row['solver_sigma']:.4g}, mean RBF {row.get('solver_mean_rbf_value', math.nan):.4g}")
    return f"epoch {row['epoch']}/{config.epochs}: " + ", ".join(parts) + (" (best so far)" if best else "")


def train_epoch(run: Run, step: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                epoch: int, ctx: EpochContext, history: list[dict[str, Any]]) -> dict[str, Any]:
    """One epoch of this process's batches; the logged loss and throughput cover all processes.

    Every step sets the scheduled learning rate, clips gradients when asked,
    and flags (on the device, summed over processes) a non-finite loss,
    embedding or gradient norm. On the CPU the flags are read before every
    optimiser step, so a diverging run stops with weights that were never NaN;
    on a GPU they are read every :data:`_GPU_READ_EVERY` steps (no host
    synchronisation per step) and a flagged step moves nothing (the fused
    optimiser skips it on the device; otherwise its gradients are zeroed), so
    the weights stay finite until the run stops. With fp16 the
    gradient scaler skips steps with non-finite gradients itself, so only the
    loss and the embeddings are guarded there.
    """
    cfg, dev = run.config, run.device
    if run.bn_mode == "frozen":
        run.calibrate(force=True)  # the statistics this epoch's training forward (and any refresh) uses
    refreshes, start = run.refreshes, time.perf_counter()
    run.solver.on_epoch_start(ctx)
    refresh_seconds = time.perf_counter() - start if run.refreshes > refreshes else None
    if refresh_seconds is not None:
        run.progress.add("bank_refresh", refresh_seconds)
        run.progress.say(f"bank refresh before epoch {epoch + 1}: {refresh_seconds:.1f} s")
    run.model.train()
    run.solver.train()
    if run.bn_mode == "frozen":
        freeze_batchnorm(run.model)
    run.bn_current, run.train_embeddings = False, None
    batches = process_batches(run, epoch)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    read_every = _read_every(dev)
    total = torch.zeros(2, dtype=torch.float64)  # summed loss x rows, rows: over every process
    window = torch.zeros(5, dtype=torch.float64, device=dev)  # the same, then non-finite loss, embeddings, gradients
    first_bad = torch.full((), -1, dtype=torch.long, device=dev)
    lr = cfg.lr
    start = time.perf_counter()
    bar = tqdm(iterate_batches(run.data.train, batches, dev, cfg.num_workers), desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not cfg.progress, leave=False, unit="batch", total=len(batches))
    for i, (x, y, idx) in enumerate(bar):
        lr = cfg.lr * lr_factor(cfg, epoch * len(batches) + i, len(batches))
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # backbone_lr: the backbone's group has its own scale
        loss, embeddings_finite = step(x, y, idx)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        if cfg.clip_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=dev)
        grads_bad = ~torch.isfinite(grad_norm) if not scaler.is_enabled() else torch.zeros((), dtype=torch.bool, device=dev)
        rows = torch.full((), float(len(y)), dtype=torch.float64, device=dev)  # a fill, not a host copy
        flags = torch.stack([~torch.isfinite(loss.detach()), ~embeddings_finite, grads_bad])
        status = distributed.all_reduce_sum(torch.cat([torch.stack([loss.detach().double() * rows, rows]), flags.double()]))
        window += status
        if i == 0:
            first_step = status[:2].clone()  # the run's first loss, before any update: the divergence yardstick
        if read_every > 1:
            bad = status[2:].any()
            first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, i), first_bad)
            if optimizer.defaults.get("fused") and not scaler.is_enabled():
                optimizer.found_inf = bad.float()  # the fused step skips a flagged step on the device
            else:
                for g in grads:  # a flagged step moves nothing by its gradients (NaN * 0 would stay NaN)
                    g.masked_fill_(bad, 0.0)
        if (i + 1) % read_every == 0 or i + 1 == len(batches):
            read = window.cpu()
            if read[2:].any():
                at = i if read_every == 1 else int(first_bad)
                raise DivergenceError(_divergence_message(run, epoch, at, lr, read[2:].tolist(), history))
            total += read[:2]
            window.zero_()
            bar.set_postfix(loss=f"{total[0] / total[1]:.4f}", samples_s=f"{total[1] / (time.perf_counter() - start):.0f}")
        scaler.step(optimizer)
        scaler.update()
    elapsed = time.perf_counter() - start
    # DDP broadcasts rank 0's BatchNorm statistics before each step; the last step's update is synced here.
    distributed.sync_buffers(run.model)
    seen = int(total[1])
    row = {"epoch": epoch + 1, "loss": float(total[0]) / max(1, seen), "seconds": elapsed, "samples_per_s": seen / elapsed,
           "lr": lr}
    if not history and batches:
        row["first_step_loss"] = float(first_step[0] / first_step[1])
    run.progress.add("train", elapsed)
    if refresh_seconds is not None:
        row.update(bank_refreshed=True, seconds_refresh=refresh_seconds)
    row.update({f"solver_{k}": float(v) for k, v in run.solver.on_epoch_end(ctx).items()})
    # later epochs against the first epoch's mean, the first against the run's first step (no loss there, as when a
    # miner found no tuple: unchecked)
    reference, factor, what = ((history[0]["loss"], DIVERGENCE_FACTOR, "the first epoch's") if history else
                               (row.get("first_step_loss", 0.0), FIRST_EPOCH_FACTOR, "the first step's"))
    if reference > 0 and row["loss"] > factor * reference:
        row["diverged"] = True
        if distributed.is_main():
            warnings.warn(
                f"epoch {epoch + 1}: training loss {row['loss']:.4g} is over {factor:g}x {what} "
                f"({reference:.4g}); the run is marked diverged in log.jsonl and summary.json; try a lower --lr or "
                "--clip-grad-norm", TrainingWarning, stacklevel=2,
            )
    return row


def _read_every(device: torch.device) -> int:
    """Steps between host reads of the loss and the non-finite flags: every step where a read is free (the CPU)."""
    return _GPU_READ_EVERY if avoid_host_sync(device) else 1


def _divergence_message(run: Run, epoch: int, step: int, lr: float, flags: list[float], history: list[dict[str, Any]]) -> str:
    """One line: what became non-finite, where, the likely cause, what to try, and what is saved."""
    what = ", ".join(name for name, bad in zip(("loss", "embeddings", "gradients"), flags) if bad)
    saved = (f"the checkpoint of epoch {epoch} in {run.config.out} is intact (continue with --resume)"
             if epoch > 0 else "no epoch had finished, so nothing was saved")
    return (
        f"non-finite {what} at epoch {epoch + 1}, step {step + 1}: training diverged. Likely cause: learning rate "
        f"{lr:g} ({run.config.optimizer}) too high for this network and solver, or inputs holding inf/NaN. Try a lower "
        f"--lr, --clip-grad-norm 1.0 or --warmup-epochs 1; {saved}"
    )
