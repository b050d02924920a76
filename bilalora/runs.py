"""Run folders, the way Ultralytics numbers them: ``runs/adapt/exp``, ``exp2``, ``exp3``, ...

``bilalora adapt`` writes a new folder under ``runs/adapt/``; ``bilalora export``
and ``bilalora bench`` take the newest one when no adapter is named. "Newest" is
the folder whose ``adapter.safetensors`` was written last (a run that never
finished has none and is passed over).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

__all__ = ["RUNS_ROOT", "ADAPTER_NAME", "new_run_dir", "latest_adapter_run", "adapt_root"]

RUNS_ROOT = Path("runs")
ADAPTER_NAME = "adapter.safetensors"


def adapt_root(root: Path | str | None = None) -> Path:
    """The folder that holds adapt runs (``runs/adapt`` under the working directory by default)."""
    return Path(root) if root is not None else RUNS_ROOT / "adapt"


def new_run_dir(root: Path | str, name: Optional[str] = None, exist_ok: bool = False) -> Path:
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


def latest_adapter_run(root: Path | str | None = None) -> Optional[Path]:
    """The run folder under ``root`` whose adapter file is newest, or None when there is none."""
    root = adapt_root(root)
    if not root.is_dir():
        return None
    runs = [p for p in root.iterdir() if (p / ADAPTER_NAME).is_file()]
    if not runs:
        return None
    return max(runs, key=lambda p: ((p / ADAPTER_NAME).stat().st_mtime_ns, p.name))
