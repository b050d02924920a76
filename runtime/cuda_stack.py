"""Which CUDA major version each installed GPU piece expects (for ``bilalora info``). No torch import.

PyTorch, onnxruntime-gpu, TensorRT and cuda-python are each built against one CUDA major
version; a CUDA 13 TensorRT beside a CUDA 12 torch and onnxruntime-gpu fails at import or
at the first engine. This module reads what is installed, from package metadata only
(nothing is imported, no GPU needed):

* torch: ``torch.version.cuda`` when the caller has it, else the ``-cuXX`` NVIDIA packages or
  ``cuda-toolkit`` / ``cuda-bindings`` pins its wheel requires;
* onnxruntime-gpu: ``onnxruntime/capi/version_info.py`` (``cuda_version``, written by GPU
  builds) when present, else the ``-cuXX`` packages it requires, else its version (1.19 and
  later are built for CUDA 12 by default, onnxruntime's install notes);
* TensorRT: the wheel variant installed (``tensorrt-cu12``, ``tensorrt-cu13``; the bare
  ``tensorrt`` package pulls the newest, CUDA 13 at the time of writing);
* cuda-python: the major of ``cuda-python`` or ``cuda-bindings`` (13 dropped ``cuda.cudart``;
  the runtime imports ``cuda.bindings.runtime`` first).
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import re
from pathlib import Path
from typing import Optional

__all__ = ["cuda_majors", "stack_problem"]

_CU = re.compile(r"-cu(\d+)\b")


def _dist_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _dist_requires(name: str) -> list[str]:
    try:
        return list(metadata.requires(name) or [])
    except metadata.PackageNotFoundError:
        return []


def _major(version: Optional[str]) -> Optional[int]:
    found = re.match(r"(\d+)", version or "")
    return int(found.group(1)) if found else None


def _from_requires(name: str) -> Optional[int]:
    """The CUDA major named by a distribution's requirements (``nvidia-*-cu12``, ``cuda-toolkit==13.*``)."""
    for requirement in _dist_requires(name):
        if "extra ==" in requirement and "cuda" not in requirement.split("extra ==")[1]:
            continue
        found = _CU.search(requirement)
        if found:
            return int(found.group(1))
        pinned = re.match(r"(cuda-toolkit|cuda-bindings|cuda-python)\S*?(==|>=|~=)\s*(\d+)", requirement)
        if pinned:
            return int(pinned.group(3))
    return None


def _onnxruntime_gpu() -> tuple[Optional[int], str]:
    version = _dist_version("onnxruntime-gpu")
    if version is None:
        return None, "onnxruntime-gpu not installed"
    spec = importlib.util.find_spec("onnxruntime")
    if spec is not None and spec.origin:
        info = Path(spec.origin).parent / "capi" / "version_info.py"
        if info.is_file():
            found = re.search(r"cuda_version\s*=\s*['\"](\d+)", info.read_text(errors="replace"))
            if found:
                return int(found.group(1)), f"onnxruntime-gpu {version} (built for CUDA {found.group(1)})"
    major = _from_requires("onnxruntime-gpu")
    if major is not None:
        return major, f"onnxruntime-gpu {version} (requires -cu{major} packages)"
    parts = [int(p) for p in re.findall(r"\d+", version)[:2]]
    if parts and parts >= [1, 19]:
        return 12, f"onnxruntime-gpu {version} (CUDA 12 default build since 1.19)"
    return 11, f"onnxruntime-gpu {version} (CUDA 11 default build before 1.19)"


def _tensorrt() -> tuple[Optional[int], str]:
    for major in (11, 12, 13, 14):
        version = _dist_version(f"tensorrt-cu{major}") or _dist_version(f"tensorrt-cu{major}-libs")
        if version:
            return major, f"tensorrt-cu{major} {version}"
    version = _dist_version("tensorrt")
    if version is None:
        return None, "tensorrt not installed"
    major = _from_requires("tensorrt")
    if major is not None:
        return major, f"tensorrt {version} (pulls tensorrt-cu{major})"
    return None, f"tensorrt {version} (CUDA variant unknown)"


def _cuda_python() -> tuple[Optional[int], str]:
    for name in ("cuda-python", "cuda-bindings"):
        version = _dist_version(name)
        if version:
            return _major(version), f"{name} {version}"
    return None, "cuda-python not installed"


def _torch(torch_cuda: Optional[str]) -> tuple[Optional[int], str]:
    version = _dist_version("torch")
    if version is None:
        return None, "torch not installed"
    if torch_cuda:
        return _major(torch_cuda), f"torch {version} (CUDA {torch_cuda})"
    if "+cpu" in version:
        return None, f"torch {version} (CPU build)"
    major = _from_requires("torch")
    if major is not None:
        return major, f"torch {version} (requires CUDA {major} packages)"
    return None, f"torch {version} (no CUDA)"


def cuda_majors(torch_cuda: Optional[str] = None) -> dict[str, dict]:
    """``{piece: {"major": int | None, "detail": str}}`` for torch, onnxruntime-gpu, tensorrt, cuda-python.

    Args:
        torch_cuda: ``torch.version.cuda`` when the caller has imported torch (None: read metadata).
    """
    found = {
        "torch": _torch(torch_cuda),
        "onnxruntime-gpu": _onnxruntime_gpu(),
        "tensorrt": _tensorrt(),
        "cuda-python": _cuda_python(),
    }
    return {name: {"major": major, "detail": detail} for name, (major, detail) in found.items()}


def stack_problem(majors: dict[str, dict]) -> Optional[str]:
    """One line when the installed pieces expect different CUDA majors, else None."""
    used = {name: entry["major"] for name, entry in majors.items() if entry["major"] is not None}
    if len(set(used.values())) <= 1:
        return None
    listed = ", ".join(f"{name} CUDA {major}" for name, major in used.items())
    return (
        f"mixed CUDA majors ({listed}): install the variants of one major, e.g. CUDA 12: "
        "pip install 'bilalora[trt]' (tensorrt-cu12, cuda-python 12) beside CUDA 12 torch and onnxruntime-gpu"
    )
