"""Fleet job lists and output ledgers for ``bilalora run --ray``. numpy-free, torch-free.

Two small files:

* the **catalogue** (``--manifest FILE``): one row per input, each with its own
  output and its own camera's model, as CSV (header ``input,output,model``) or JSON
  (a list of ``{"input", "output", "model"}`` objects, or ``{"jobs": [...]}``). An
  empty ``model`` uses ``--model``. Relative paths are relative to the manifest::

      input,output,model
      drone07/2026-05-01.mp4,clean/drone07/2026-05-01.mp4,catalogue/drone07/export
      mast3/frames/,clean/mast3/,catalogue/mast3/export

* the **ledger** (``run.outputs.jsonl`` in each output folder): one JSON line per
  finished output file with its size and sha256, the input's size and mtime and the
  model key (:func:`model_key`). ``--resume`` skips an output only when all of these
  still match, so a changed input, a re-exported model or a truncated file is redone.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from bilalora.errors import UserError
from bilalora.io import append_jsonl

__all__ = ["Job", "read_manifest", "Ledger", "LEDGER_NAME", "file_digest", "input_stamp", "model_key"]

LEDGER_NAME = "run.outputs.jsonl"
_MODEL_KEYS = ("model", "export")


@dataclass(frozen=True)
class Job:
    """One input to dehaze into one output with one model (None: the run's ``--model``)."""

    input: str
    output: str
    model: Optional[str] = None


def _resolve(value: str, base: Path) -> str:
    """``value`` as given when it is absolute or a camera/stream, else relative to ``base``."""
    if value.isdigit() or "://" in value or Path(value).is_absolute():
        return value
    return str(base / value)


def _job(row: dict[str, Any], where: str, base: Path) -> Job:
    row = {str(k).strip().lower(): ("" if v is None else str(v).strip()) for k, v in row.items() if k is not None}
    missing = [key for key in ("input", "output") if not row.get(key)]
    if missing:
        raise UserError(f"{where}: no {' or '.join(missing)} (columns: input, output, model)")
    model = next((row[key] for key in _MODEL_KEYS if row.get(key)), None)
    return Job(_resolve(row["input"], base), _resolve(row["output"], base), _resolve(model, base) if model else None)


def read_manifest(path: str | os.PathLike) -> list[Job]:
    """The jobs of a CSV or JSON catalogue (see the module docstring); UserError on a bad file.

    Two rows may not write the same output.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--manifest {path}: no such file (a CSV or JSON list of input, output, model)")
    base = path.parent
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--manifest {path}: cannot read it ({exc})") from None
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None or "input" not in [f.strip().lower() for f in reader.fieldnames]:
            raise UserError(f"--manifest {path}: the first line must be a header with input,output,model")
        jobs = [_job(row, f"{path}:{line}", base) for line, row in enumerate(reader, start=2)]
    elif suffix in (".json", ".jsonl"):
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()] if suffix == ".jsonl" else json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"--manifest {path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if isinstance(rows, dict):
            rows = rows.get("jobs")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise UserError(f"--manifest {path}: expected a list of {{input, output, model}} objects (or {{\"jobs\": [...]}})")
        jobs = [_job(row, f"{path} row {n}", base) for n, row in enumerate(rows, start=1)]
    else:
        raise UserError(f"--manifest {path}: use a .csv or .json file")
    if not jobs:
        raise UserError(f"--manifest {path}: no rows")
    seen: dict[str, int] = {}
    for number, job in enumerate(jobs, start=1):
        key = os.path.normpath(os.path.abspath(job.output))
        if key in seen:
            raise UserError(f"--manifest {path}: rows {seen[key]} and {number} both write {job.output}")
        seen[key] = number
    return jobs


# --------------------------------------------------------------------------- hashes


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> tuple[int, str]:
    """``(bytes, sha256 hex)`` of a file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def input_stamp(path: str | os.PathLike) -> dict[str, int]:
    """Size and modification time (ns) of an input file: a changed input is redone on ``--resume``."""
    try:
        stat = os.stat(path)
    except OSError:  # a dangling link or a loop named like an image: skipped by the reader anyway
        return {"bytes": -1, "mtime_ns": -1}
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def model_key(model: str | os.PathLike, options: dict[str, Any]) -> str:
    """A sha256 naming what computes the pixels: the model's files and the run options that change them.

    For an export folder it hashes ``model.json`` (which holds every artefact's sha256) and
    the graph and engine files that are present; for a ``.onnx`` / ``.engine`` file, that file.
    """
    path = Path(model)
    digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".json", ".onnx", ".engine", ".plan", ".trt", ".xml", ".bin")
    ) if path.is_dir() else []  # fmt: skip
    for file in files:
        digest.update(file.name.encode())
        digest.update(file_digest(file)[1].encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- ledger


class Ledger:
    """The ``run.outputs.jsonl`` of one output folder: finished outputs by file name.

    Args:
        folder: the folder the outputs are in (the ledger lives there too).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LEDGER_NAME
        self._entries: Optional[dict[str, dict[str, Any]]] = None

    def entries(self) -> dict[str, dict[str, Any]]:
        """Output name -> its newest entry (a torn last line from a crash is ignored)."""
        if self._entries is None:
            self._entries = {}
            if self.path.is_file():
                for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                        self._entries[entry["name"]] = entry
        return self._entries

    def done(self, name: str, stamp: dict[str, int], key: str) -> bool:
        """True when ``name`` exists with the recorded size and sha256, from this input stamp and model key."""
        entry = self.entries().get(name)
        path = self.folder / name
        if entry is None or entry.get("model") != key or entry.get("input") != stamp or not path.is_file():
            return False
        if path.stat().st_size != entry.get("bytes"):
            return False
        return file_digest(path)[1] == entry.get("sha256")

    def all_done(self, names: Iterable[str], stamp: dict[str, int], key: str) -> bool:
        """:meth:`done` for every name (False for an empty list)."""
        names = list(names)
        return bool(names) and all(self.done(name, stamp, key) for name in names)

    def add(self, name: str, size: int, sha256: str, stamp: dict[str, int], key: str) -> None:
        """Record a finished output (appends one line)."""
        entry = {"name": name, "bytes": size, "sha256": sha256, "input": stamp, "model": key}
        self.folder.mkdir(parents=True, exist_ok=True)
        append_jsonl(self.path, entry)
        self.entries()[name] = entry
