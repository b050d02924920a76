"""onnxruntime execution providers and their options; the user cache folder for TensorRT. No torch.

    providers = session_providers(["TensorrtExecutionProvider", "CPUExecutionProvider"], record, "fp16")
    # [("TensorrtExecutionProvider", {"trt_engine_cache_enable": True, ..., "trt_fp16_enable": True}),
    #  "CPUExecutionProvider"]

onnxruntime's TensorRT provider builds a TensorRT engine for every new session and
every new input shape unless told otherwise. :func:`tensorrt_provider_options` gives it
(option names from onnxruntime's TensorRT execution provider documentation):

* ``trt_engine_cache_enable`` + ``trt_engine_cache_path``: engines are kept in the user cache
  folder :func:`~.cache.trt_cache_dir` ``/onnxruntime`` (onnxruntime keys them by graph, shapes
  and GPU);
* ``trt_timing_cache_enable`` + ``trt_timing_cache_path``: the kernel timing cache, in the same
  folder (onnxruntime names it by compute capability), shared by every export;
* ``trt_profile_min_shapes`` / ``opt`` / ``max``: the optimisation profile from model.json's
  ``shapes`` (``input:1x3x64x64``), so that frames within it reuse one engine;
* ``trt_fp16_enable`` for ``--precision fp16``, ``trt_int8_enable`` for the QDQ INT8 graph
  (explicit quantisation: no calibration table needed).

UNVERIFIED here: the development machine has no GPU and no TensorRT; the tests check the
options built, not a session using them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .cache import trt_cache_dir

__all__ = [
    "DEFAULT_PROVIDERS",
    "profile_shapes",
    "tensorrt_provider_options",
    "session_providers",
]

#: onnxruntime providers in order of preference; those not available are skipped.
DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

ProviderSpec = Union[str, tuple[str, dict[str, Any]]]


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in shape)


def profile_shapes(record: Optional[Mapping[str, Any]], input_name: str = "input") -> Optional[dict[str, str]]:
    """``trt_profile_{min,opt,max}_shapes`` from model.json's ``shapes`` (fixed: all three equal); None without."""
    shapes = (record or {}).get("shapes") or {}
    fixed = shapes.get("fixed")
    low, opt, high = (fixed, fixed, fixed) if fixed else (shapes.get("min"), shapes.get("opt"), shapes.get("max"))
    if not (low and opt and high):
        return None
    return {
        "trt_profile_min_shapes": f"{input_name}:{_dims(low)}",
        "trt_profile_opt_shapes": f"{input_name}:{_dims(opt)}",
        "trt_profile_max_shapes": f"{input_name}:{_dims(high)}",
    }


def tensorrt_provider_options(
    record: Optional[Mapping[str, Any]] = None,
    precision: str = "fp32",
    int8: bool = False,
    cache_dir: Optional[Path] = None,
    input_name: str = "input",
) -> dict[str, Any]:
    """Options for onnxruntime's ``TensorrtExecutionProvider`` (see the module docstring)."""
    folder = (cache_dir or trt_cache_dir()) / "onnxruntime"
    folder.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(folder),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(folder),
        "trt_fp16_enable": precision == "fp16",
        "trt_int8_enable": bool(int8),
    }
    options.update(profile_shapes(record, input_name) or {})
    return options


def session_providers(
    chosen: Sequence[str],
    record: Optional[Mapping[str, Any]] = None,
    precision: str = "fp32",
    int8: bool = False,
    cache_dir: Optional[Path] = None,
) -> list[ProviderSpec]:
    """``providers=`` for ``onnxruntime.InferenceSession``: the TensorRT provider gets its options."""
    out: list[ProviderSpec] = []
    for name in chosen:
        if name == "TensorrtExecutionProvider":
            out.append((name, tensorrt_provider_options(record, precision, int8, cache_dir)))
        else:
            out.append(name)
    return out
