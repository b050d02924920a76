"""Run folders, the way Ultralytics numbers them: ``runs/adapt/exp``, ``exp2``, ``exp3``, ...

``bilalora adapt`` writes a new folder under ``runs/adapt/``; ``bilalora export``
and ``bilalora bench`` take the newest one when no adapter is named. "Newest" is
the folder whose ``adapter.safetensors`` was written last (a run that never
finished has none and is passed over).

This module is the one home of an adapt run folder's layout (file names, the
checkpoint path, the resumable-run lookup, the ``split.json`` reader). It never
imports torch.

A run folder holds::

    adapter.safetensors      the adapter (or finetuned.safetensors for --method full)
    summary.json             the run's record (schedule, ranking, gate trajectories, movement)
    log.jsonl                one line every --log-every steps
    split.json               train / val / test images, relative to images_root
    results.png              losses and every gate's trajectory
    checkpoints/last.pt      resumable state (tensors and plain types only)
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .errors import UserError

__all__ = [
    "ADAPTER_NAME",
    "CHECKPOINT_NAME",
    "FULL_NAME",
    "RUNS_ROOT",
    "RUN_FILES",
    "adapt_root",
    "check_run_dir",
    "checkpoint_path",
    "choose_run_dir",
    "clear_run_files",
    "latest_adapter_run",
    "latest_resumable_run",
    "new_run_dir",
    "read_split",
]

RUNS_ROOT = Path("runs")
#: The adapter file of a run (the one constant for this name; export, bench and run read it).
ADAPTER_NAME = "adapter.safetensors"
#: The weights file of a ``--method full`` run.
FULL_NAME = "finetuned.safetensors"
#: The resumable checkpoint, relative to the run folder.
CHECKPOINT_NAME = "checkpoints/last.pt"
#: Everything an adapt run writes into its folder (what ``--exist-ok`` replaces).
RUN_FILES = (ADAPTER_NAME, FULL_NAME, "summary.json", "log.jsonl", "split.json", "results.png", "checkpoints")


def adapt_root(root: Path | str | None = None) -> Path:
    """The folder that holds adapt runs (``runs/adapt`` under the working directory by default)."""
    return Path(root) if root is not None else RUNS_ROOT / "adapt"


def checkpoint_path(run_dir: Path | str) -> Path:
    """``run_dir/checkpoints/last.pt``."""
    return Path(run_dir) / CHECKPOINT_NAME


def new_run_dir(root: Path | str, name: str | None = None, exist_ok: bool = False) -> Path:
    """Create and return ``root/<name>``; without a name the next free ``exp``, ``exp2``, ...

    With a name that exists already and ``exist_ok`` False, the name is numbered too
    (``day`` -> ``day2``), so an earlier run is never overwritten.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base = name or "exp"
    candidate = root / base
    if exist_ok or not candidate.exists():
        candidate.mkdir(parents=True, exist_ok=True)
        return candidate
    taken = {p.name for p in root.iterdir()}
    pattern = re.compile(rf"^{re.escape(base)}(\d*)$")
    numbers = [int(m.group(1) or 1) for n in taken if (m := pattern.match(n))]
    index = max(numbers, default=1) + 1
    while f"{base}{index}" in taken:
        index += 1
    candidate = root / f"{base}{index}"
    candidate.mkdir(parents=True)
    return candidate


def latest_adapter_run(root: Path | str | None = None) -> Path | None:
    """The run folder under ``root`` whose adapter file is newest, or None when there is none."""
    root = adapt_root(root)
    if not root.is_dir():
        return None
    runs = [p for p in root.iterdir() if (p / ADAPTER_NAME).is_file()]
    if not runs:
        return None
    return max(runs, key=lambda p: ((p / ADAPTER_NAME).stat().st_mtime_ns, p.name))


def latest_resumable_run(root: Path | str | None = None) -> Path | None:
    """The interrupted run under ``root`` (a checkpoint, no adapter or weights yet) written last, or None.

    A finished run keeps its checkpoint too (``--resume --steps N`` naming it
    continues it), but a bare ``--resume`` means the run that did not finish.
    """
    root = adapt_root(root)
    if not root.is_dir():
        return None
    runs = [p for p in root.iterdir() if checkpoint_path(p).is_file()
            and not (p / ADAPTER_NAME).is_file() and not (p / FULL_NAME).is_file()]
    if not runs:
        return None
    return max(runs, key=lambda p: (checkpoint_path(p).stat().st_mtime_ns, p.name))


def choose_run_dir(
    out: Path | str | None,
    name: str | None,
    resume: bool,
    exist_ok: bool = False,
    root: Path | str | None = None,
) -> Path:
    """The folder an ``adapt`` invocation writes to (created unless resuming).

    * ``--out DIR``: that folder; refused when it already holds a run, unless
      ``resume`` or ``exist_ok`` (see :func:`check_run_dir`).
    * ``--name N``: ``root/N``; with ``resume`` the existing one, otherwise the
      next free numbered name (``N``, ``N2``, ...) unless ``exist_ok``.
    * neither: with ``resume`` the run whose checkpoint is newest, else the next ``exp``.
    """
    root = adapt_root(root)
    if out is not None:
        folder = Path(out)
        check_run_dir(folder, resume, exist_ok)
        return folder
    if resume:
        if name:
            folder = root / name
            check_run_dir(folder, resume, exist_ok)
            return folder
        found = latest_resumable_run(root)
        if found is None:
            raise UserError(f"--resume: no interrupted run under {root}; name it with --out or --name")
        return found
    return new_run_dir(root, name, exist_ok=exist_ok)


def check_run_dir(run_dir: Path | str, resume: bool, exist_ok: bool) -> None:
    """Refuse to start a new run over an earlier run's files; check a resumable run exists.

    Raises:
        UserError: ``resume`` without a checkpoint in ``run_dir``; or a new run into a
            folder holding an earlier run's files without ``exist_ok``.
    """
    run_dir = Path(run_dir)
    if resume:
        if not checkpoint_path(run_dir).is_file():
            raise UserError(f"--resume: no checkpoint at {checkpoint_path(run_dir)}; start a new run without --resume")
        return
    earlier = [name for name in RUN_FILES if (run_dir / name).exists()]
    if earlier and not exist_ok:
        raise UserError(
            f"{run_dir} already holds a run ({', '.join(earlier)}); continue it with --resume, replace it with "
            "--exist-ok, or choose another --out/--name"
        )


def clear_run_files(run_dir: Path | str) -> list[str]:
    """Remove an earlier run's files from ``run_dir`` (what ``--exist-ok`` replaces). Returns their names."""
    run_dir = Path(run_dir)
    removed = []
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def read_split(run_dir: Path | str) -> dict[str, list[Path]]:
    """The images of a run's ``split.json`` as absolute paths: {"train", "val", "test"} -> [Path].

    Paths in the file are relative to its ``images_root`` (an absolute folder), so
    the split reads the same from any working directory. Files written before the
    test split existed have no "test" key (an empty list here) and may hold paths
    relative to the working directory that wrote them (returned as stored).

    Raises:
        UserError: the file is missing or is not a split record.
    """
    path = Path(run_dir) / "split.json"
    if not path.is_file():
        raise UserError(f"{path}: no split.json in this run folder")
    import json

    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not readable as JSON ({err})") from None
    if not isinstance(record, dict) or not isinstance(record.get("train"), list):
        raise UserError(f"{path}: not a split record (no 'train' list)")
    root = record.get("images_root")
    base = Path(root) if isinstance(root, str) else None
    out = {}
    for key in ("train", "val", "test"):
        names = record.get(key) or []
        out[key] = [base / name if base is not None else Path(name) for name in names]
    return out
