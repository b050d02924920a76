""":func:`adapt`: one adapt run, as a short sequence of named steps."""

from __future__ import annotations

import contextlib
import copy
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter import Adapter, fingerprint
from ..data import ImageFolder
from ..devices import autocast_factory, uses_bf16
from ..errors import UserError
from ..io import atomic_path, read_json, write_json
from ..runs import ADAPTER_NAME, FULL_NAME, check_run_dir, checkpoint_path, clear_run_files
from .config import (PRESET_FIELDS, AdaptConfig, describe_preset, reconcile_resume, resolve_preset,
                     resolve_search_space)
from .loop import run_stages, truncate_log
from .report import gate_separation, is_channels_last, movement, plot_results
from .schedule import Schedule, Split, StepCrops, eval_batches, image_subset, resolve_schedule, split_images
from .state import AdaptState, read_checkpoint

__all__ = ["AdaptResult", "adapt"]


@dataclass
class AdaptResult:
    """What a run produced: its folder, the files written and the summary record."""

    run_dir: Path
    artefact: Path
    summary: dict[str, Any]
    adapter: Adapter | None = None


@dataclass
class _Data:
    """The run's images: the folder, its split, the decoded images of each split."""

    folder: ImageFolder
    not_files: dict[str, str]
    split: Split
    train: list
    val: list
    test: list


class _Progress:
    """Rich progress reporting (silent when ``console`` is None)."""

    def __init__(self, console):
        self.console = console
        self.progress = None
        self.task = None

    def __enter__(self):
        if self.console is not None:
            from ..progress import make_progress

            self.progress = make_progress(self.console)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def start(self, description: str, total: int, completed: int = 0):
        if self.progress is not None:
            self.task = self.progress.add_task(description, total=total, completed=completed, status="")

    def advance(self, status: str):
        if self.progress is not None:
            self.progress.update(self.task, advance=1, status=status)

    def print(self, text: str):
        if self.console is not None:
            self.console.print(text)


def adapt(
    model: nn.Module,
    images: str | Path,
    objective,
    config: AdaptConfig | None,
    run_dir: str | Path,
    device: str = "cpu",
    resume: bool = False,
    exist_ok: bool = False,
    console=None,
    on_step: Callable[[int, dict], None] | None = None,
    given: Iterable[str] | None = None,
) -> AdaptResult:
    """Adapt ``model`` to the hazy images in ``images``; write the run into ``run_dir``.

    Args:
        model: the backbone, (N, 3, H, W) in [0, 1] -> same; modified in place.
        images: folder of unlabeled hazy images.
        objective: callable (output, hazy) -> 0-d loss, with ``to(device)`` and ``describe()``.
        config: the run's settings; on resume None means the checkpoint's, and only
            the schedule length and bookkeeping (:data:`RESUME_APPLIED`) are taken from it.
            Fields left to the preset are filled for ``device`` (:func:`resolve_preset`);
            a resumed run keeps the preset it resolved when it started.
        run_dir: output folder (created). A folder holding an earlier run is
            refused unless ``resume`` (continue it) or ``exist_ok`` (replace it).
        device: torch device string.
        resume: continue from ``run_dir/checkpoints/last.pt`` (same base weights required).
        console: a rich Console for progress and messages, or None for silence.
        on_step: called after every step with (global step, record); may raise to interrupt.
        given: on resume, the config fields the user set explicitly (others are not compared).
    """
    run_dir = Path(run_dir)
    say = console.print if console is not None else (lambda *_: None)
    created = not run_dir.exists() or not any(run_dir.iterdir())
    check_run_dir(run_dir, resume, exist_ok)
    record = read_checkpoint(run_dir) if resume else None
    config = _settle_config(config, record, given, device, say)
    if record is None:
        config = resolve_search_space(config, model, getattr(objective, "name", None))
    with contextlib.ExitStack() as bound:  # the base output stays bound from the first step to the report
        try:
            if not resume and not created:
                _replace_earlier_run(run_dir, say)
            data = _load_data(images, run_dir, config, resume, say)
            base, base_fingerprint = _prepare_model(model, record, config.crop)
            schedule = resolve_schedule(config, len(data.train))
            say(describe_preset(config, device, resumed=record is not None))
            say(schedule.describe())
            if config.search_space:
                default = (getattr(model, "bilalora_info", None) or {}).get("default_sites") or ["'*'"]
                say(f"search space: {', '.join(config.sites)} ({config.search_space}; "
                    f"--sites {','.join(default)} searches the backbone's default space)")
            state = _start_state(model, config, device, base_fingerprint, schedule, record, run_dir, say)
            autocast = autocast_factory(device, config.precision)
            bound.enter_context(_reference_bound(objective, base, state.model, device, autocast))
            _run(state, schedule, data, objective, autocast, run_dir, console, on_step)
        except BaseException:
            if created and not checkpoint_path(run_dir).is_file():
                shutil.rmtree(run_dir, ignore_errors=True)  # nothing resumable: leave no empty run folder
            raise
        return _finish(state, base, schedule, data, objective, images, run_dir, device, say)


def _settle_config(config: AdaptConfig | None, record: dict | None, given, device: str, say) -> AdaptConfig:
    """The config to run with: the checkpoint's on resume (plus what may change), else ``config`` resolved for
    ``device`` (its preset's values where it left fields unset); validated."""
    if record is not None:
        saved = AdaptConfig.from_dict(record["config"])
        config, applied, ignored = reconcile_resume(saved, config, given)
        if applied:
            say(f"resume: applying {', '.join(applied)}")
        if ignored:
            say(f"[yellow]warning:[/] resume: {', '.join(ignored)} ignored (the interrupted run's settings are kept)")
    if config is None:
        raise UserError("adapt needs a configuration for a new run")
    config.validate()
    return resolve_preset(config, device)  # a checkpoint's config is resolved already: kept as it is


def _replace_earlier_run(run_dir: Path, say) -> None:
    """``exist_ok``: remove the earlier run's files so nothing of it mixes with the new run's."""
    removed = clear_run_files(run_dir)
    if removed:
        say(f"[yellow]warning:[/] replacing the earlier run in {run_dir} ({', '.join(removed)})")
    if (run_dir / "export").exists():
        say(f"[yellow]warning:[/] {run_dir / 'export'} was exported from the earlier run; export again")


def _load_data(images, run_dir: Path, config: AdaptConfig, resume: bool, say) -> _Data:
    """Decode the folder (naming skipped files), split it (or reload the run's split), write ``split.json``."""
    folder = ImageFolder(images, recursive=config.recursive, max_side=config.max_side or None)  # 0: full size
    skipped = folder.report_skipped()
    if skipped:
        say(f"[yellow]warning:[/] {skipped}")
    not_files = _not_files(folder.folder, config.recursive)
    if not_files:
        say(f"[yellow]warning:[/] skipped {len(not_files)} entr{'y' if len(not_files) == 1 else 'ies'} named like an "
            f"image that {'is' if len(not_files) == 1 else 'are'} not a readable file: "
            + ", ".join(f"{name} ({why})" for name, why in not_files.items()))
    split_file = run_dir / "split.json"
    if resume and split_file.is_file():
        split = Split.from_record(read_json(split_file), folder.folder)
    else:
        split = split_images(folder.paths, config.seed, config.test_fraction)
        write_json(split_file, split.record(folder.folder, config.seed, config.test_fraction))
    for warning in split.warnings:
        say(f"[yellow]warning:[/] {warning}")
    by_path = {path: folder[i] for i, path in enumerate(folder.paths)}
    return _Data(folder, not_files, split, image_subset(split.train, by_path, "train"), image_subset(split.val, by_path, "val"),
                 image_subset(split.test, by_path, "test"))


def _not_files(root: Path, recursive: bool) -> dict[str, str]:
    """{name: why} of the entries with an image suffix that are not regular files (folders, broken links)."""
    from ..images import is_image_path

    found = {}
    for path in sorted(root.rglob("*") if recursive else root.iterdir()):
        if not is_image_path(path) or path.is_file() or any(p.startswith(".") for p in path.relative_to(root).parts):
            continue
        why = "a folder" if path.is_dir() else "a broken or looping symbolic link" if path.is_symlink() else "not a file"
        found[path.relative_to(root).as_posix()] = why
    return found


def _resume_input_norm(model: nn.Module, recorded: dict | None) -> None:
    """Give a resumed run the input normalisation it was adapting with (docs/weights.md).

    When the user chose one with ``--input-norm`` that differs, the resume is refused;
    otherwise the recorded one replaces whatever the weights file said (or nothing).
    """
    from bilalora.backbones.normalize import describe, fold_input_norm, same_input_norm, unfold_input_norm

    info = getattr(model, "bilalora_info", None) or {}
    current = info.get("input_norm")
    if same_input_norm(current, recorded):
        return
    if info.get("input_norm_source") == "flag":
        raise UserError(
            f"--resume: the interrupted run was adapting with input normalisation {describe(recorded)}, "
            f"not {describe(current)}; drop --input-norm or pass the run's"
        )
    if recorded is None:
        unfold_input_norm(model)
    else:
        fold_input_norm(model, recorded["mean"], recorded["std"])
    model.bilalora_info["input_norm_source"] = "run"


def _prepare_model(model: nn.Module, record: dict | None, crop: int) -> tuple[nn.Module, str]:
    """Check the crop fits the network, fingerprint the base (checked against the checkpoint on resume), copy it."""
    model.eval()  # DEA-Net has no dropout/batch-norm; eval keeps any such layer deterministic
    _check_crop_fits(model, crop)
    base_fingerprint = fingerprint(model)
    if record is not None and record["base_fingerprint"] != base_fingerprint:
        raise UserError(
            f"--resume: these base weights (fingerprint {base_fingerprint[:12]}) are not the ones the interrupted "
            f"run was adapting (fingerprint {str(record['base_fingerprint'])[:12]}); pass the same --backbone/--weights"
        )
    if record is not None and "input_norm" in record:
        _resume_input_norm(model, record["input_norm"])
    base = copy.deepcopy(model).eval()
    for param in base.parameters():
        param.requires_grad_(False)
    return base, base_fingerprint


@torch.no_grad()
def _check_crop_fits(model: nn.Module, crop: int) -> None:
    """One forward of a (1, 3, crop, crop) probe on the CPU: a crop the network cannot take is one clear line."""
    device = next(model.parameters()).device
    try:
        model(torch.zeros(1, 3, crop, crop, device=device))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[0][:120]
        raise UserError(f"--crop {crop} is too small for this backbone ({reason}); use a larger --crop, "
                        "e.g. 16 or more for DEA-Net") from None


def _start_state(model, config: AdaptConfig, device: str, base_fingerprint: str, schedule: Schedule,
                 record: dict | None, run_dir: Path, say) -> AdaptState:
    """A new run's first stage, or the interrupted run restored; the log trimmed to the checkpoint."""
    state = AdaptState(model, config, device, base_fingerprint)
    log_path = run_dir / "log.jsonl"
    if record is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # LoRA's A from the CPU generator: the same start on every device
            state.build_stage(schedule.stages[0][0])
        log_path.unlink(missing_ok=True)
        return state
    stage_index = min(record["stage_index"], len(schedule.stages) - 1)
    state.restore(record, schedule.stages[stage_index][0])
    truncate_log(log_path, state.global_step)
    if state.stage_index >= len(schedule.stages):
        say(f"resuming {run_dir}: its {state.global_step} steps are done (raise --steps to continue training); "
            "measuring and writing its records again")
    else:
        say(f"resuming {run_dir} in {schedule.stages[stage_index][0]}, step {state.stage_step} of the stage "
            f"(global step {state.global_step})")
    return state


def _run(state: AdaptState, schedule: Schedule, data: _Data, objective, autocast, run_dir: Path, console,
         on_step) -> None:
    """Run the stages with batches built on the host in the layout and memory the device wants."""
    config, device = state.config, state.device
    cuda = device.startswith("cuda")
    objective.to(device)
    train = StepCrops(data.train, config.batch, config.crop, config.seed, pin=cuda)
    val = StepCrops(data.val, config.batch, config.crop, config.seed + 1, pin=cuda) \
        if config.method == "bilevel" else None
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = previous or cuda  # fixed crop sizes: let cuDNN pick its kernels once
    try:
        with _Progress(console) as progress:
            try:
                run_stages(state, schedule, train, val, objective, autocast, run_dir, progress, on_step)
            except KeyboardInterrupt:
                progress.print(f"[yellow]interrupted[/]: progress up to global step {state.global_step} is in "
                               f"{checkpoint_path(run_dir)}; continue with --resume")
                raise
    finally:
        torch.backends.cudnn.benchmark = previous


@contextlib.contextmanager
def _reference_bound(objective, base: nn.Module, model: nn.Module, device: str, autocast):
    """Within: an objective that wants the unadapted network's output (``wants_reference``) has it bound."""
    if not getattr(objective, "wants_reference", False):
        yield
        return
    objective.bind_reference(_reference(base, model, device, autocast))
    try:
        yield
    finally:
        objective.bind_reference(None)


def _reference(base: nn.Module, model: nn.Module, device: str, autocast) -> Callable[[torch.Tensor], torch.Tensor]:
    """``reference(hazy)``: the unadapted network's output, (N, 3, H, W), no gradient, in the precision and
    memory layout the adapted model runs in (a copy of the base on ``device``)."""
    layout = torch.channels_last if is_channels_last(model) else torch.contiguous_format
    frozen = base.to(device=device, memory_format=layout).eval()

    @torch.no_grad()
    def reference(hazy: torch.Tensor) -> torch.Tensor:
        with autocast():
            return frozen(hazy).float()

    return reference


def _finish(state: AdaptState, base: nn.Module, schedule: Schedule, data: _Data, objective, images, run_dir: Path,
            device: str, say) -> AdaptResult:
    """Measure the change on held-out crops, save the artefact, write summary.json and results.png."""
    config, model = state.config, state.model
    model.eval()
    held_out = "test" if data.test else "val"
    moved = {name: movement(base, model, objective, eval_batches(images_, config.crop, config.batch), device)
             for name, images_ in (("test", data.test), ("val", data.val)) if images_}
    separation = gate_separation(state.trajectory, config.top_k) if state.trajectory["steps"] else None
    meta = {
        "method": config.method,
        "objective": objective.describe() if hasattr(objective, "describe") else {"name": type(objective).__name__},
        "schedule": {k: v for k, v in config.as_dict().items() if k not in ("sites", "exclude_sites")},
        "seed": config.seed,
        "data": {"folder": str(images), "train": len(data.train), "val": len(data.val), "test": len(data.test),
                 "skipped": len(data.folder.skipped)},
        "ranking": [[name, value] for name, value in (state.ranking or [])],
        "movement": {"split": held_out, **moved[held_out]},
    }
    artefact, adapter = _save_artefact(state, meta, run_dir)
    figure = plot_results(run_dir, state.trajectory, state.selected, schedule.steps("search"))
    info = getattr(model, "bilalora_info", {}) or {}
    change = moved[held_out]["mean_abs_output_change"]
    summary = {
        "method": config.method,
        "backbone": info.get("name"),
        "weights": info.get("weights"),
        "input_norm": info.get("input_norm"),  # what the base expects (docs/weights.md); export/bench reload it
        "base_fingerprint": state.base_fingerprint,
        "artefact": str(artefact),
        "device": device,
        "precision": "bf16" if uses_bf16(device, config.precision) else "fp32",
        "objective": meta["objective"],
        "config": config.as_dict(),
        "schedule": schedule.as_dict(),
        "schedule_preset": {"requested": config.schedule, "preset": config.preset, "explicit": config.explicit,
                            "values": {key: getattr(config, key) for key in PRESET_FIELDS}},
        "ranking": meta["ranking"],
        "selected": state.selected,
        "gates": {"separation": separation, "trajectory": state.trajectory},
        "trainable_parameters": state.trainable,
        "stages": {
            stage: {
                "seconds": round(state.stage_seconds.get(stage, 0.0), 3),
                "steps": state.stage_steps.get(stage, 0),
                "seconds_per_step": round(state.stage_seconds.get(stage, 0.0) / max(state.stage_steps.get(stage, 0), 1),
                                          4),
            }
            for stage, _ in schedule.stages
        },
        "skipped_steps": state.bad_steps,
        "data": {**data.folder.summary(), "not_files": data.not_files, "train": len(data.train), "val": len(data.val),
                 "test": len(data.test)},
        "movement": meta["movement"],
        "movement_by_split": moved,
        "negligible_change": change is not None and change < config.move_threshold,
        "results_png": figure.name if figure else None,
    }
    write_json(run_dir / "summary.json", summary)
    _warn(summary, separation, config, say)
    return AdaptResult(run_dir, artefact, summary, adapter)


def _save_artefact(state: AdaptState, meta: dict, run_dir: Path) -> tuple[Path, Adapter | None]:
    """The adapter (LoRA methods) or the fine-tuned weights (``full``), written atomically."""
    model = state.model
    if state.config.method == "full":
        from safetensors.torch import save_file

        artefact = run_dir / FULL_NAME
        with atomic_path(artefact) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp),
                      metadata={"bilalora": "full fine-tune", "base_fingerprint": state.base_fingerprint})
        return artefact, None
    adapter = Adapter.from_model(model, state.selected, **meta)
    adapter.base_fingerprint = state.base_fingerprint
    return adapter.save(run_dir / ADAPTER_NAME), adapter


def _warn(summary: dict, separation: dict | None, config: AdaptConfig, say) -> None:
    """One line each: a top-k within the noise of the search; an adapted model that barely moved."""
    if separation and separation["within_noise"]:
        spread = f"{separation['spread']:.2e}" if separation["spread"] is not None else "unknown"
        say(f"[yellow]warning:[/] the top-{config.top_k} is within noise: the gap between {separation['kth']} and "
            f"{separation['next']} is {separation['gap']:.2e} against the gates' jitter {spread}, and the top-"
            f"{config.top_k} held for the last {separation['stable_readings']} of {separation['readings']} gate "
            "readings; raise --search-steps or --gate-lr")
    if summary["negligible_change"]:
        moved = summary["movement"]
        say(f"[yellow]warning:[/] the adapted model barely differs from the base (mean |change| "
            f"{moved['mean_abs_output_change']:.2e} < {config.move_threshold:g} on the {moved['split']} split); "
            "raise --lr or --steps")

