"""TensorRT engines from the exported ONNX (``--trt``), with the ``tensorrt`` Python API.

UNVERIFIED HERE: TensorRT cannot be installed on the development and CI
machines, so :func:`build_engine` and :func:`run_engine` are written against
NVIDIA's documented Python API (Builder, OnnxParser.parse_from_file,
IBuilderConfig.set_memory_pool_limit, create_optimization_profile/set_shape,
create_timing_cache/set_timing_cache/ITimingCache.serialize,
BuilderFlag.FP16/REFIT, build_serialized_network, Refitter.get_all_weights)
and exercised in tests with a fake ``tensorrt`` module that records the calls;
``tests/test_trt.py`` has real-GPU tests that run only where TensorRT and CUDA
exist. Everything around the build (profiles, precision choice per TensorRT
major version, cache naming, refit name mapping) is plain Python and tested.

Precision:

* TensorRT 10: fp16 engines are built from the fp32 ``model.onnx`` with
  ``BuilderFlag.FP16`` (weak typing: TensorRT picks fp16 kernels where it can).
* TensorRT 11: weak typing is removed (no ``BuilderFlag.FP16``; every network is
  strongly typed), so an fp16 engine is built from ``model_fp16.onnx``, whose
  tensors are fp16 already; an fp32 engine from ``model.onnx``.

* INT8 (``--int8 --trt``): built from the calibrated QDQ ``model_int8.onnx``
  (explicit quantisation: the Q/DQ scales come from the file, no TensorRT
  calibrator); TensorRT 10 also gets ``BuilderFlag.INT8``, TensorRT 11 reads
  the types from the strongly typed graph.

Engines are written byte for byte as TensorRT serialised them (nothing is
prepended; the metadata goes to model.json). The timing cache lives in the
user cache folder (:func:`bilalora.runtime.cache.trt_cache_dir`, keyed by the
GPU, its compute capability and the TensorRT version, shared with the
runtime's onnxruntime TensorRT provider), so every export on a machine reuses
it; a cache TensorRT cannot read is discarded with a warning, not an abort.

``--refit`` sets ``BuilderFlag.REFIT``; the engine's refittable weight names
(the ONNX initializer names, which are the state-dict keys, see
:mod:`.onnx_export`) go into model.json so a runtime can swap in another
merged adapter with ``tensorrt.Refitter`` without rebuilding. TensorRT 11.3's
release notes list a known issue where REFIT engines can differ numerically
from non-refittable ones; the engine parity gate (run when CUDA is visible)
catches that.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from bilalora.errors import UserError
from bilalora.parsing import parse_hw

__all__ = [
    "TRT_INSTALL_HINT",
    "DEFAULT_MIN",
    "DEFAULT_OPT",
    "DEFAULT_MAX",
    "TensorRTMissing",
    "ShapeProfile",
    "parse_size",
    "make_profile",
    "import_tensorrt",
    "trt_major",
    "EnginePlan",
    "engine_plan",
    "gpu_info",
    "timing_cache_name",
    "timing_cache_path",
    "load_timing_cache",
    "refit_map",
    "EngineBuild",
    "build_engine",
    "run_engine",
]

TRT_INSTALL_HINT = "pip install 'bilalora[trt]'"

#: Default dynamic profile (H, W): small tiles up to 1080p frames.
DEFAULT_MIN = (64, 64)
DEFAULT_OPT = (720, 1280)
DEFAULT_MAX = (1080, 1920)

_PAD_MULTIPLE = 4


class TensorRTMissing(UserError):
    """``--trt`` was asked for but the ``tensorrt`` module cannot be imported."""


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class ShapeProfile:
    """The input shapes an export supports: fixed, or a dynamic min/opt/max range.

    Attributes:
        min, opt, max: (N, 3, H, W) of the TensorRT optimisation profile (all
            equal when fixed); H and W multiples of 4.
        dynamic: False when every artefact takes exactly ``min`` (``--shape``).
    """

    min: tuple[int, int, int, int]
    opt: tuple[int, int, int, int]
    max: tuple[int, int, int, int]
    dynamic: bool = True

    @property
    def fixed(self) -> Optional[tuple[int, int, int, int]]:
        return None if self.dynamic else self.min

    def contains(self, shape: Sequence[int]) -> bool:
        """Whether an (N, 3, H, W) shape lies inside the profile."""
        return all(lo <= int(v) <= hi for lo, v, hi in zip(self.min, shape, self.max))

    def clamp_hw(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) moved inside the profile's range."""
        return (
            min(max(height, self.min[2]), self.max[2]),
            min(max(width, self.min[3]), self.max[3]),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "dynamic": self.dynamic,
            "fixed": list(self.fixed) if self.fixed else None,
            "min": list(self.min),
            "opt": list(self.opt),
            "max": list(self.max),
            "multiple": _PAD_MULTIPLE,
        }

    def describe(self) -> str:
        def hw(shape):
            return f"{shape[0]}x{shape[2]}x{shape[3]}"

        if not self.dynamic:
            return f"fixed {hw(self.min)} (NxHxW)"
        return f"dynamic min {hw(self.min)}, opt {hw(self.opt)}, max {hw(self.max)} (NxHxW)"


def parse_size(value: str | Sequence[int], flag: str, multiple: int = _PAD_MULTIPLE) -> tuple[int, int]:
    """``"HxW"`` -> (H, W), multiples of the pad multiple (:func:`bilalora.parsing.parse_hw`)."""
    return parse_hw(value, flag, multiple, example="720x1280")


def make_profile(
    shape: Optional[str | Sequence[int]] = None,
    dynamic: bool = False,
    min_hw: Optional[str | Sequence[int]] = None,
    opt_hw: Optional[str | Sequence[int]] = None,
    max_hw: Optional[str | Sequence[int]] = None,
    batch: int = 1,
) -> ShapeProfile:
    """The export's :class:`ShapeProfile` from the ``--shape`` / ``--dynamic --min --opt --max`` / ``--batch`` flags.

    * ``shape`` given: fixed (batch, 3, H, W); combining it with dynamic flags is an error.
    * otherwise dynamic: N from 1 to ``batch`` (opt ``batch``), H/W from the flags
      or the defaults min 64x64, opt 720x1280, max 1080x1920 (opt defaults to
      the max when a given max is smaller than the default opt).

    Raises:
        UserError: sizes that are not multiples of 4, a min > opt > max order
            violation, a batch < 1, or conflicting flags.
    """
    if batch < 1:
        raise UserError(f"--batch {batch}: the batch size must be at least 1")
    if shape is not None:
        given = [
            flag
            for flag, v in (("--dynamic", dynamic or None), ("--min", min_hw), ("--opt", opt_hw), ("--max", max_hw))
            if v
        ]
        if given:
            raise UserError(f"--shape fixes the input size; drop {', '.join(given)} (or drop --shape for a range)")
        height, width = parse_size(shape, "--shape")
        fixed = (batch, 3, height, width)
        return ShapeProfile(fixed, fixed, fixed, dynamic=False)
    lo = parse_size(min_hw, "--min") if min_hw is not None else DEFAULT_MIN
    hi = parse_size(max_hw, "--max") if max_hw is not None else DEFAULT_MAX
    if opt_hw is not None:
        mid = parse_size(opt_hw, "--opt")
    else:
        mid = tuple(min(max(default, low), high) for default, low, high in zip(DEFAULT_OPT, lo, hi))
    for axis, name in ((0, "height"), (1, "width")):
        if not lo[axis] <= mid[axis] <= hi[axis]:
            raise UserError(
                f"--min/--opt/--max: the {name}s must satisfy min <= opt <= max, got "
                f"{lo[axis]} <= {mid[axis]} <= {hi[axis]}"
            )
    return ShapeProfile((1, 3, *lo), (batch, 3, *mid), (batch, 3, *hi), dynamic=True)


# --------------------------------------------------------------------------- tensorrt module


def import_tensorrt(folder: Optional[Path] = None):
    """Import ``tensorrt`` lazily; a missing module is a :class:`TensorRTMissing` one-liner.

    Args:
        folder: where the ONNX artefacts were written (named in the message).
    """
    try:
        import tensorrt  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install (missing libnvinfer)
        where = f" (the ONNX artefacts are written in {folder})" if folder else ""
        reason = "is not installed" if isinstance(exc, ImportError) else f"cannot be imported ({type(exc).__name__})"
        raise TensorRTMissing(
            f"--trt: TensorRT {reason}; on a CUDA machine run {TRT_INSTALL_HINT} and export again{where}"
        ) from None
    return tensorrt


def trt_major(version: str) -> int:
    """The major version of a TensorRT version string ("10.9.0.34" -> 10)."""
    match = re.match(r"\s*(\d+)", str(version))
    if not match:
        raise UserError(f"cannot read the TensorRT version {version!r}")
    return int(match.group(1))


@dataclass(frozen=True)
class EnginePlan:
    """How to build an engine of a given precision with a given TensorRT major version.

    Attributes:
        onnx: which ONNX file to parse ("model.onnx", "model_fp16.onnx" or "model_int8.onnx").
        flags: BuilderFlag names to set besides REFIT (["FP16"] for TensorRT 10 fp16, ["INT8"] for int8).
        strongly_typed: whether the network is strongly typed (always on TensorRT 11).
    """

    onnx: str
    flags: tuple[str, ...]
    strongly_typed: bool


def engine_plan(precision: str, major: int) -> EnginePlan:
    """Pick the ONNX source and builder flags for ``precision`` ("fp32"/"fp16"/"int8") on TensorRT ``major``."""
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    if major < 10:
        raise UserError(f"TensorRT {major}.x is not supported; install TensorRT 10 or newer ({TRT_INSTALL_HINT})")
    if precision == "int8":
        return EnginePlan("model_int8.onnx", () if major >= 11 else ("INT8",), major >= 11)
    if major >= 11:
        return EnginePlan("model_fp16.onnx" if precision == "fp16" else "model.onnx", (), True)
    return EnginePlan("model.onnx", ("FP16",) if precision == "fp16" else (), False)


def gpu_info() -> tuple[str, tuple[int, int]]:
    """(name, (major, minor)) of the current CUDA GPU, read through torch.

    Raises:
        UserError: no CUDA GPU is visible.
    """
    import torch

    if not torch.cuda.is_available():
        raise UserError("--trt: TensorRT builds engines on a CUDA GPU and none is visible to this process")
    index = torch.cuda.current_device()
    return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))


def timing_cache_name(gpu: str, capability: Sequence[int], version: str) -> str:
    """File name of the timing cache for one GPU model, compute capability and TensorRT version."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") or "gpu"
    return f"timing-{slug}-sm{capability[0]}{capability[1]}-trt{version}.cache"


def timing_cache_path(gpu: str, capability: Sequence[int], version: str) -> Path:
    """The timing cache file in the user cache folder (:func:`bilalora.runtime.cache.trt_cache_dir`)."""
    from bilalora.runtime.cache import trt_cache_dir

    return trt_cache_dir(gpu, capability, version) / timing_cache_name(gpu, capability, version)


def load_timing_cache(config, path: Path, log: Optional[Callable[[str], None]] = None):
    """``config.create_timing_cache`` from ``path``; an unreadable or corrupt cache is discarded with a warning."""
    data = b""
    if path.is_file():
        try:
            data = path.read_bytes()
        except OSError as exc:
            if log:
                log(f"timing cache {path} is not readable ({exc}); building without it")
    if data:
        reason = "TensorRT returned no cache"
        try:
            cache = config.create_timing_cache(data)
            if cache is not None:
                return cache
        except Exception as exc:  # noqa: BLE001 - TensorRT raises on a corrupt cache; rebuild it instead
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if log:
            log(f"timing cache {path} is corrupt or from another TensorRT ({reason}); discarded, a new one is written")
        path.unlink(missing_ok=True)
    return config.create_timing_cache(b"")


def refit_map(weight_names: Iterable[str], state_keys: Iterable[str]) -> dict[str, Optional[str]]:
    """Map each refittable engine weight name to the state-dict key it holds (None: a graph constant).

    The ONNX parser names engine weights after the ONNX initializers, which the
    exporter names after the state-dict keys; a ``model.`` prefix (the export
    wrapper's) is tolerated.
    """
    keys = set(state_keys)
    mapping: dict[str, Optional[str]] = {}
    for name in weight_names:
        candidates = (name, name[len("model.") :] if name.startswith("model.") else None)
        mapping[name] = next((c for c in candidates if c and c in keys), None)
    return mapping


# --------------------------------------------------------------------------- building


@dataclass
class EngineBuild:
    """Result of :func:`build_engine`.

    Attributes:
        path: the engine file.
        seconds: build time.
        record: the ``trt`` section of model.json.
    """

    path: Path
    seconds: float
    record: dict[str, Any] = field(default_factory=dict)


def build_engine(
    onnx_dir: Path,
    engine_path: Path,
    profile: ShapeProfile,
    precision: str = "fp32",
    *,
    refit: bool = False,
    workspace_gb: float = 4.0,
    state_keys: Iterable[str] = (),
    trt=None,
    gpu: Optional[tuple[str, tuple[int, int]]] = None,
    log: Optional[Callable[[str], None]] = None,
) -> EngineBuild:
    """Build ``engine_path`` from the ONNX file in ``onnx_dir`` chosen by :func:`engine_plan`.

    UNVERIFIED against a real TensorRT on the machines this was written on (see the module docstring).

    Args:
        onnx_dir: folder holding model.onnx (and model_fp16.onnx for TensorRT 11 fp16).
        engine_path: where the serialised engine goes (written atomically, unmodified bytes).
        profile: the optimisation profile (ignored by TensorRT for a static graph).
        precision: "fp32" or "fp16".
        refit: build a refittable engine and list its weights.
        workspace_gb: ``MemoryPoolType.WORKSPACE`` limit in GiB.
        state_keys: the network's state-dict keys, to map refittable weights to them.
        trt: the tensorrt module (imported lazily when None).
        gpu: (name, (major, minor)); read from torch.cuda when None.

    Raises:
        TensorRTMissing, UserError: TensorRT absent, no GPU, a parser or build failure.
    """
    from bilalora.io import write_bytes_atomic

    trt = trt or import_tensorrt(onnx_dir)
    version = str(getattr(trt, "__version__", "unknown"))
    major = trt_major(version)
    plan = engine_plan(precision, major)
    source = Path(onnx_dir) / plan.onnx
    if not source.is_file():
        need = {"model_fp16.onnx": "--fp16", "model_int8.onnx": "--int8"}.get(plan.onnx, "")
        raise UserError(f"--trt needs {source} to build a {precision} engine with TensorRT {version}; export {need}")
    name, capability = gpu if gpu is not None else gpu_info()
    start = time.perf_counter()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10: explicit batch is implicit in flags 0. TensorRT 11: networks are always strongly typed.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = [str(parser.get_error(i)).strip() for i in range(parser.num_errors)]
        raise UserError(f"TensorRT {version} could not parse {source.name}: {errors[0] if errors else 'unknown error'}")

    config = builder.create_builder_config()
    workspace = int(workspace_gb * (1 << 30))
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    flags = list(plan.flags) + (["REFIT"] if refit else [])
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))

    tensor = network.get_input(0)
    input_name = getattr(tensor, "name", "input")
    dynamic_graph = any(int(d) < 0 for d in tuple(tensor.shape))
    if dynamic_graph:
        trt_profile = builder.create_optimization_profile()
        trt_profile.set_shape(input_name, tuple(profile.min), tuple(profile.opt), tuple(profile.max))
        config.add_optimization_profile(trt_profile)

    cache_path = timing_cache_path(name, capability, version)
    cache = load_timing_cache(config, cache_path, log)
    config.set_timing_cache(cache, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(
            f"TensorRT {version} failed to build {engine_path.name} from {source.name} "
            f"(profile {profile.describe()}); try a smaller --max or a larger --workspace"
        )
    plan_bytes = bytes(serialized)
    write_bytes_atomic(engine_path, plan_bytes)  # the engine's bytes, unmodified
    write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))

    refittable: dict[str, Optional[str]] = {}
    if refit:
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan_bytes)
        refitter = trt.Refitter(engine, logger)
        refittable = refit_map(list(refitter.get_all_weights()), state_keys)
    seconds = time.perf_counter() - start
    record = {
        "version": version,
        "major": major,
        "gpu": name,
        "compute_capability": f"{capability[0]}.{capability[1]}",
        "built_from": plan.onnx,
        "precision": precision,
        "strongly_typed": plan.strongly_typed,
        "builder_flags": flags,
        "workspace_bytes": workspace,
        "timing_cache": str(cache_path),
        "profile": {input_name: {"min": list(profile.min), "opt": list(profile.opt), "max": list(profile.max)}},
        "refittable": bool(refit),
        "refittable_weights": refittable,
        "refit_dtype": ("float16" if plan.onnx == "model_fp16.onnx" else "float32") if refit else None,
        "timing_cache_bytes": cache_path.stat().st_size if cache_path.is_file() else 0,
        "verified": "built with the tensorrt Python API; parity measured only when CUDA is visible",
    }
    if log:
        log(f"TensorRT {version} on {name} (sm_{capability[0]}{capability[1]}), built from {plan.onnx}")
    return EngineBuild(engine_path, seconds, record)


def run_engine(engine_path: Path, arrays: Sequence[np.ndarray], trt=None) -> list[np.ndarray]:
    """Run a serialised engine on float32 (N, 3, H, W) arrays; float32 outputs. Needs CUDA (torch buffers).

    UNVERIFIED here (no TensorRT on this machine); used for the engine parity gate on GPU machines.
    """
    import torch

    trt = trt or import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise UserError(f"TensorRT could not load {engine_path} (built for another TensorRT version or GPU?)")
    context = engine.create_execution_context()
    outputs = []
    for array in arrays:
        x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).cuda()
        context.set_input_shape("input", tuple(x.shape))
        y = torch.empty(tuple(context.get_tensor_shape("output")), dtype=torch.float32, device="cuda")
        context.set_tensor_address("input", x.data_ptr())
        context.set_tensor_address("output", y.data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise UserError(f"TensorRT failed to run {Path(engine_path).name} on shape {tuple(x.shape)}")
        stream.synchronize()
        outputs.append(y.cpu().numpy())
    return outputs
