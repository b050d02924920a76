"""Atomic file writing and JSON records.

Every artefact (adapter, model, engine, summary) is written to a temporary name
in the destination folder and renamed into place, so an interrupted run never
leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary file keeps the destination's suffix (libraries such as
    safetensors or onnx look at it). On an exception the temporary file is
    removed and the destination is left untouched.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".tmp{dest.suffix}", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        publish(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def publish(tmp: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Rename a finished temporary file onto ``dest`` with the usual file mode (mkstemp makes 0600 files)."""
    tmp = Path(tmp)
    if tmp.exists():
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, dest)
    return Path(dest)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically and return the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, record: Any) -> Path:
    """Write ``record`` as indented JSON, atomically (non-finite floats become null)."""
    return write_text_atomic(path, json.dumps(_finite(record), indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Append one JSON line to ``path`` (a log; appends are line-atomic enough)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(_finite(record)) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _finite(value: Any) -> Any:
    """Replace NaN/inf floats by None recursively so the JSON stays standard."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
