"""The step loop of an adapt run: stages in order, batches prefetched, logs and checkpoints every N steps.

The loop never waits on the device for bookkeeping: the step functions'
results (floats, or 0-d device tensors) are collected and read once every
``log_every`` steps (one host sync for the window), the gates are read at the
same time, finiteness skips are counted then (so an abort on a run of NaN
losses comes at most ``log_every`` steps late), and checkpoints are written
every ``checkpoint_every`` steps or ``checkpoint_minutes`` minutes and at each
stage end, not at every epoch end.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..io import append_jsonl
from ..prefetch import Prefetcher
from ..search import bilevel_step, joint_step, train_step
from .schedule import Schedule, StepCrops
from .state import AdaptState

__all__ = ["GracefulInterrupt", "StepWindow", "run_stages", "truncate_log"]


def _host(values: list) -> list[float]:
    """Floats of a list of floats / 0-d tensors, with one device sync for all the tensors."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    fetched = iter(torch.stack([t.detach().float().reshape(()) for t in tensors]).cpu().tolist())
    return [next(fetched) if isinstance(v, torch.Tensor) else float(v) for v in values]


class StepWindow:
    """The step results since the last log line, read on the host all at once by :meth:`flush`."""

    FIELDS = ("train_loss", "val_loss", "grad_norm")

    def __init__(self):
        self.results: list = []
        self.started = time.time()

    def add(self, result) -> None:
        self.results.append(result)

    def __len__(self) -> int:
        return len(self.results)

    def flush(self, extra: torch.Tensor | None = None) -> tuple[dict[str, float], list[bool], list[float]]:
        """Read the window in one transfer; empties it.

        Args:
            extra: a 1-D device tensor read in the same transfer (the gate values).

        Returns:
            (means of the logged fields over the finite steps, per-step skipped flags, ``extra`` as floats).
        """
        results, self.results = self.results, []
        extra_values: list = [] if extra is None else list(extra.detach().float().reshape(-1).unbind())
        values, layout = [], []
        for result in results:
            for name in self.FIELDS:
                value = getattr(result, name, None)
                if value is not None:
                    values.append(value)
                    layout.append(name)
            values.append(result.skipped)
            layout.append("skipped")
        read = _host(values + extra_values)
        values_read, extra_read = read[: len(values)], read[len(values) :]
        host = iter(values_read)
        sums: dict[str, list[float]] = {}
        skipped: list[bool] = []
        per_step: dict[str, float] = {}
        for name in layout:
            value = next(host)
            if name == "skipped":
                skipped.append(bool(value))
                if not value:
                    for key, item in per_step.items():
                        sums.setdefault(key, []).append(item)
                per_step = {}
            else:
                per_step[name] = value
        means = {key: sum(items) / len(items) for key, items in sums.items()}
        self.started = time.time()
        return means, skipped, extra_read


class GracefulInterrupt:
    """The first Ctrl-C lets the current step finish (the loop then checkpoints and stops); a second one kills."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.getsignal(signal.SIGINT)

            def handler(signum, frame):
                if self.requested:
                    raise KeyboardInterrupt
                self.requested = True

            signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines of steps after ``last_step`` (written after the checkpoint a run resumes from)."""
    import json

    from ..io import write_text_atomic

    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except ValueError:
            continue  # a line cut by the kill
        if step <= last_step:
            kept.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


def _step_function(state: AdaptState, stage: str, objective, autocast, device: str,
                   train: Prefetcher, val: Prefetcher | None) -> Callable[[], Any]:
    """The closure that runs the next step of ``stage`` (the dispatch happens once per stage)."""
    config, model = state.config, state.model

    def fetch(source: Prefetcher, index: int) -> torch.Tensor:
        return source.get(index).to(device, non_blocking=True)

    if stage == "search" and config.method == "bilevel":
        return lambda: bilevel_step(model, objective, fetch(train, state.global_step), fetch(val, state.stage_step),
                                    state.lora_optimizer, state.gate_optimizer, config.optim, config.passes,
                                    autocast)
    if stage == "search":
        return lambda: joint_step(model, objective, fetch(train, state.global_step), state.lora_optimizer,
                                  state.gate_optimizer, config.optim, autocast)
    return lambda: train_step(model, objective, fetch(train, state.global_step), state.lora_optimizer,
                              config.optim, autocast)


def _log_window(state: AdaptState, stage: str, window: StepWindow, log_path: Path) -> dict | None:
    """Read the window's results (one sync), update the skip counters, append one log line."""
    from ..errors import UserError

    if not len(window):
        return None
    seconds = time.time() - window.started
    gates = state.gate_tensor() if stage == "search" else None
    means, skipped, gate_values = window.flush(gates)
    for flag in skipped:
        state.bad_streak = state.bad_streak + 1 if flag else 0
        state.bad_steps += int(flag)
        if state.bad_streak >= state.config.max_bad_steps:
            raise UserError(f"the loss was NaN/inf for {state.bad_streak} steps in a row; lower --lr "
                            f"(now {state.config.optim.lr:g}) or use --precision fp32")
    entry = {"step": state.global_step, "stage": stage, "steps": len(skipped),
             **{key: round(value, 6) for key, value in means.items()},
             "skipped": sum(skipped), "lr": state.lora_optimizer.param_groups[0]["lr"],
             "seconds_per_step": round(seconds / len(skipped), 4)}
    if stage == "search":
        entry["gates"] = {k: round(v, 6) for k, v in state.record_gates(gate_values).items()}
    append_jsonl(log_path, entry)
    return entry


def run_stages(
    state: AdaptState,
    schedule: Schedule,
    train_crops: StepCrops,
    val_crops: StepCrops | None,
    objective,
    autocast,
    run_dir: Path,
    progress,
    on_step: Callable[[int, dict], None] | None = None,
) -> None:
    """Run the remaining steps of every stage from where ``state`` stands; checkpoint into ``run_dir``.

    Args:
        train_crops: the train images' batch stream, indexed by the global step.
        val_crops: the validation images' stream (bilevel search), indexed by the search step.
        progress: an object with ``start(description, total, completed)``, ``advance(status)``, ``print(text)``.
        on_step: called after every step with (global step, record); may raise to interrupt (a test hook).
    """
    config, device = state.config, state.device
    log_path = run_dir / "log.jsonl"
    stages = list(schedule.stages)
    total_steps = schedule.total_steps
    with Prefetcher(train_crops.batch, config.workers, stop=total_steps) as train, \
            Prefetcher(val_crops.batch if val_crops else (lambda i: None), config.workers if val_crops else 0,
                       stop=schedule.steps("search")) as val, GracefulInterrupt() as interrupt:
        while state.stage_index < len(stages):
            stage, stage_steps = stages[state.stage_index]
            step = _step_function(state, stage, objective, autocast, device, train, val if val_crops else None)
            progress.start(stage, stage_steps, completed=min(state.stage_step, stage_steps))
            window, status = StepWindow(), ""
            stage_started = time.time() - state.stage_seconds.get(stage, 0.0)
            while state.stage_step < stage_steps:
                window.add(step())
                state.stage_step += 1
                state.global_step += 1
                state.stage_steps[stage] = state.stage_steps.get(stage, 0) + 1
                state.stage_seconds[stage] = time.time() - stage_started
                entry = None
                if len(window) >= config.log_every or interrupt.requested:
                    entry = _log_window(state, stage, window, log_path)
                    status = f"loss {entry.get('train_loss', float('nan')):.4f}"
                progress.advance(status)
                if state.checkpoint_due():
                    _log_window(state, stage, window, log_path)  # the log reaches the checkpoint's step
                    state.save(run_dir)
                if on_step is not None:
                    on_step(state.global_step, entry or {"step": state.global_step, "stage": stage})
                if interrupt.requested:
                    state.save(run_dir)
                    raise KeyboardInterrupt
            _log_window(state, stage, window, log_path)
            _finish_stage(state, stages, stage, progress)
            state.save(run_dir)


def _finish_stage(state: AdaptState, stages: list[tuple[str, int]], stage: str, progress) -> None:
    """Advance to the next stage and build its structure (stage B keeps the top-k sites)."""
    config = state.config
    if stage == "search" and (not state.trajectory["steps"] or state.trajectory["steps"][-1] != state.global_step):
        state.record_gates()
    state.stage_index += 1
    state.stage_step = 0
    if state.stage_index < len(stages):
        state.build_stage(stages[state.stage_index][0])
        if stage == "search" and state.selected:
            shown = ", ".join(f"{name} {value:.4f}" for name, value in state.ranking[: max(config.top_k + 2, 5)])
            progress.print(f"  gates after the search: {shown}")
            progress.print(f"  selected top-{config.top_k}: {', '.join(state.selected)}")
