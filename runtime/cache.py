"""The user cache folder for TensorRT timing caches and engine caches (torch-free).

    folder = trt_cache_dir()                                     # ~/.cache/bilalora/trt
    folder = trt_cache_dir("NVIDIA H200", (9, 0), "10.9.0.34")   # .../trt/nvidia-h200-sm90-trt10.9.0.34

One folder serves every export and every onnxruntime TensorRT-provider
session on a machine: ``$BILALORA_CACHE_DIR/trt`` when set, else
``$XDG_CACHE_HOME/bilalora/trt``, else ``~/.cache/bilalora/trt``. A timing
cache is only valid for one GPU model, compute capability and TensorRT
version, so those name a subfolder; the exporter (``bilalora export --trt``)
and the runtime's onnxruntime TensorRT provider options
(``trt_timing_cache_path``, ``trt_engine_cache_path``) both use it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["cache_root", "trt_cache_dir"]


def cache_root() -> Path:
    """``$BILALORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/bilalora``, else ``~/.cache/bilalora``."""
    explicit = os.environ.get("BILALORA_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "bilalora"


def trt_cache_dir(
    gpu: Optional[str] = None,
    capability: Optional[Sequence[int]] = None,
    version: Optional[str] = None,
    create: bool = True,
) -> Path:
    """The TensorRT cache folder, keyed by GPU name, compute capability and TensorRT version when given.

    Args:
        gpu: GPU name ("NVIDIA H200"); None: the unkeyed root (for caches that key themselves).
        capability: (major, minor).
        version: TensorRT version string.
        create: make the folder.
    """
    folder = cache_root() / "trt"
    if gpu is not None or capability is not None or version is not None:
        slug = re.sub(r"[^a-z0-9]+", "-", (gpu or "gpu").lower()).strip("-") or "gpu"
        sm = f"-sm{capability[0]}{capability[1]}" if capability else ""
        trt = f"-trt{version}" if version else ""
        folder = folder / f"{slug}{sm}{trt}"
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder
