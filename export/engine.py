"""The TensorRT step of an export: build ``model.engine`` and gate it against PyTorch on the GPU.

UNVERIFIED HERE (no TensorRT on the development machines): written against
TensorRT 10's documented Python API, exercised with a stand-in ``tensorrt``
module in ``tests/test_trt_contract.py``; the engine parity gate runs only
where CUDA is visible.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Optional

from .formats import by_key
from .options import Artefact, Events
from .parity import ParityResult
from .record import ExportState

__all__ = ["engine_precision", "build_engine_artefact", "engine_parity"]


def engine_precision(fp16: bool, int8: bool) -> str:
    """The engine's precision from the flags: int8 over fp16 over fp32."""
    return "int8" if int8 else ("fp16" if fp16 else "fp32")


def build_engine_artefact(state: ExportState, events: Events, model) -> Artefact:
    """Build ``model.engine`` from the ONNX artefacts in the work folder and gate it (when CUDA is visible).

    Args:
        model: the exported (merged) float32 PyTorch network, the parity reference.
    """
    from .trt import build_engine, gpu_info, import_tensorrt

    options = state.options
    row = by_key("tensorrt")
    trt = import_tensorrt(state.out_dir)
    state.tensorrt_version = str(getattr(trt, "__version__", "unknown"))
    gpu = gpu_info()
    precision = engine_precision(options.fp16, options.int8)
    events.step(f"TensorRT: starting {precision} engine build with TensorRT {state.tensorrt_version} on {gpu[0]} ...")
    build = build_engine(
        state.work_dir,
        state.path(row.file),
        state.profile,
        precision,
        refit=options.refit,
        workspace_gb=options.workspace_gb,
        state_keys=list(model.state_dict()),
        trt=trt,
        gpu=gpu,
        log=events.info,
    )
    state.trt_record = build.record
    state.timed("trt", build.seconds)
    artefact = Artefact(row.file, build.path, row.format, precision, build.seconds)
    state.artefacts.append(artefact)
    artefact.parity = engine_parity(state, model, build.path, precision, trt)
    if artefact.parity is None:
        artefact.notes.append("parity not measured: no CUDA tensors in this process")
    return artefact


def engine_parity(state: ExportState, model, engine_path: Path, precision: str, trt) -> Optional[ParityResult]:
    """Engine vs PyTorch fp32 (on the GPU, TF32 off) at sizes inside the profile; None without CUDA."""
    import numpy as np
    import torch

    from .onnx_export import ExportWrapper
    from .parity import evaluate, random_cases
    from .trt import run_engine

    if not torch.cuda.is_available():
        return None
    profile = state.profile
    if precision == "int8" and state.real_cases:
        cases = list(state.real_cases)  # INT8 is calibrated for real images, not uniform noise
    elif profile.dynamic:
        sizes = sorted({profile.clamp_hw(h, w) for h, w in state.options.parity_sizes} | {tuple(profile.opt[2:])})
        cases = random_cases(sizes, [profile.opt[0]] * len(sizes), seed=1)
    else:
        cases = random_cases([tuple(profile.min[2:])], [profile.min[0]], seed=1)
    tick = time.perf_counter()
    reference_model = ExportWrapper(copy.deepcopy(model)).cuda().eval()
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False), torch.no_grad():
            references = [reference_model(torch.from_numpy(c.array).cuda()).float().cpu().numpy() for c in cases]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    outputs = run_engine(engine_path, [c.array for c in cases], trt=trt)
    state.timed("parity", time.perf_counter() - tick)
    del reference_model
    torch.cuda.empty_cache()
    return evaluate(
        engine_path.name,
        precision,
        cases,
        [np.asarray(o) for o in outputs],
        references,
        _engine_gate(state, precision),
        "PyTorch fp32 (CUDA, TF32 off)",
    )


def _engine_gate(state: ExportState, precision: str) -> dict:
    """The engine's gate: PSNR >= 40 dB, INT8 35 dB (or ``--int8-min-psnr``)."""
    from .parity import gate_for

    if precision == "int8" and state.options.int8_min_psnr is not None:
        return {"psnr_db": float(state.options.int8_min_psnr)}
    return gate_for("engine", precision)
