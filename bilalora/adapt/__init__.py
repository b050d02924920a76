"""Adaptation runs: stage A (site search) and stage B (top-k LoRA fine-tuning).

    result = adapt(model, "frames/", objective, AdaptConfig(method="bilevel"), run_dir="runs/adapt/exp")

Methods (docs/method.md):

* ``bilevel``: gated LoRA on every candidate site; gates on the validation
  half, LoRA on the train half, hypergradient of the gates (stage A); then the
  top-k sites keep their stage-A LoRA, gates fixed, and are fine-tuned (stage B).
* ``joint``: stage A with gates and LoRA on the same train batches (plain gradient).
* ``manual``: ungated LoRA on the sites named by ``sites``; fine-tuning only.
* ``full``: all backbone weights fine-tuned; writes ``finetuned.safetensors``.

The package, one job per module:

* :mod:`.config`    :class:`AdaptConfig`, its checks, what ``--resume`` may change;
* :mod:`.schedule`  stage lengths in steps, the train/val/test split, the crop stream;
* :mod:`.state`     :class:`AdaptState` (LoRA structure, optimisers, counters) and the safe checkpoint;
* :mod:`.loop`      the step loop (logs, gate readings and checkpoints every N steps);
* :mod:`.report`    movement on held-out crops, gate separation, ``results.png``;
* :mod:`.pipeline`  :func:`adapt` as a sequence of those steps.

The run folder's layout is described in :mod:`bilalora.runs`. Batches are a
pure function of (seed, step) and the checkpoint holds the LoRA/gate state and
the optimisers, so on the CPU a resumed run reaches bit for bit the adapter of
an uninterrupted one. On CUDA, cuDNN's kernel choice (``cudnn.benchmark``) and
nondeterministic kernels make a resumed run close to, not identical with, an
uninterrupted one.
"""

from ..runs import ADAPTER_NAME, FULL_NAME
from .config import METHODS, PRESETS, RESUME_APPLIED, SCHEDULES, AdaptConfig, resolve_preset
from .pipeline import AdaptResult, adapt
from .schedule import MIN_SEARCH_STEPS, MIN_TOTAL_STEPS, Schedule, resolve_schedule, split_images
from .state import AdaptState, candidate_sites

__all__ = [
    "PRESETS",
    "SCHEDULES",
    "ADAPTER_NAME",
    "FULL_NAME",
    "METHODS",
    "MIN_SEARCH_STEPS",
    "MIN_TOTAL_STEPS",
    "RESUME_APPLIED",
    "AdaptConfig",
    "AdaptResult",
    "AdaptState",
    "Schedule",
    "adapt",
    "candidate_sites",
    "resolve_preset",
    "resolve_schedule",
    "split_images",
]
