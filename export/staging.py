"""Build an export beside its folder and swap it in at the end: a killed export never leaves a mixed folder.

    staging = Staging(Path("runs/adapt/exp/export"))
    notes = staging.open()          # a leftover of a killed export is finished or removed first
    ... write artefacts and model.json into staging.dir ...
    staging.commit()                # model.json last; the old artefacts are replaced or removed

The new export is written into the sibling folder ``<out>.partial/``. Nothing in
``<out>/`` changes until :meth:`Staging.commit`, which

1. removes ``<out>/model.json`` (from here on the folder has no record, so no
   reader can pair old files with a new record or the reverse),
2. moves each artefact the new ``model.json`` lists into ``<out>/`` (``os.replace``,
   atomic per file) and removes managed files it does not list (a stale
   ``model.engine`` from an earlier export, say),
3. moves the new ``model.json`` in (atomic) and removes ``<out>.partial/``.

``staging.dir/model.json`` is written only when the export is complete, so it
marks a commit that may have been cut short: :meth:`Staging.open` (the next
export into the same folder) finishes such a commit, and removes any other
leftover staging folder. A SIGKILL at any point therefore leaves either the
old export or the new one, plus at most a visible ``<out>.partial/`` that the
next export cleans up. Other files in ``<out>/`` are never touched.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from bilalora.runtime.model_json import SIDECAR_NAME, read_sidecar

from .formats import by_file, managed_files

__all__ = ["STAGING_SUFFIX", "Staging"]

STAGING_SUFFIX = ".partial"


class Staging:
    """The staging folder of one export folder.

    Attributes:
        out_dir: the export folder the user asked for.
        dir: ``<out_dir>.partial``, where the new export is written.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        resolved = self.out_dir.resolve()  # "." and "sub/.." have no name of their own
        self.dir = resolved.with_name(resolved.name + STAGING_SUFFIX)

    def open(self) -> list[str]:
        """Clean up a leftover staging folder and create an empty one; one-line notes on what was found."""
        notes = []
        if self.dir.exists():
            if (self.dir / SIDECAR_NAME).is_file():
                self.commit()
                notes.append(f"finished the swap of an interrupted export into {self.out_dir}")
            else:
                shutil.rmtree(self.dir, ignore_errors=True)
                notes.append(f"removed {self.dir}, left by an interrupted export")
        self.dir.mkdir(parents=True)
        return notes

    def discard(self) -> None:
        """Remove the staging folder (the export folder keeps its earlier export)."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def commit(self) -> Path:
        """Swap the staged export into :attr:`out_dir` (see the module docstring); returns its model.json."""
        record_path = self.dir / SIDECAR_NAME
        listed = _listed_files(record_path)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / SIDECAR_NAME).unlink(missing_ok=True)
        for name in managed_files():
            staged, target = self.dir / name, self.out_dir / name
            if name in listed:
                if staged.is_file():
                    os.replace(staged, target)
            elif target.is_file() or target.is_symlink():
                target.unlink()
        os.replace(record_path, self.out_dir / SIDECAR_NAME)
        _fsync_dir(self.out_dir)
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.out_dir / SIDECAR_NAME


def _listed_files(record_path: Path) -> set[str]:
    """Files a staged model.json lists as present (artefacts and their companions; not removed ones)."""
    record = read_sidecar(record_path)
    names: set[str] = set()
    for name, entry in (record.get("artefacts") or {}).items():
        if isinstance(entry, dict) and entry.get("removed"):
            continue
        row = by_file(name)
        names.update(row.files if row else (name,))
    return names


def _fsync_dir(folder: Path) -> Optional[int]:
    """Flush a folder's entries to disk where the platform allows it (POSIX)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
    return 0
