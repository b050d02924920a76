"""GPU checks of the runtime's engine path, for one run on a CUDA machine with TensorRT (torch-free).

    python benchmarks/gpu_runtime_check.py --model EXPORT_DIR_WITH_ENGINE [--out results.json]

Each check is a row with ``passed`` true/false/null (null: could not be tried here) and what
was measured; the script exits 1 when a check that could run failed. What it verifies:

1. ``engine``: ``Dehazer(prefer="engine")`` opens ``model.engine`` in TensorRT (I/O names and
   dtypes accepted), runs frames inside the profile and one over its maximum (tiled), and its
   uint8 output is within 40 dB PSNR of ``model.onnx`` in onnxruntime fp32 on the same frames;
   the host buffers are page-locked (``cudaMallocHost``).
2. ``close``: ``close()`` gives back the device memory (``cudaMemGetInfo`` free bytes before the
   engine opened and after it closed, within 64 MiB).
3. ``fallback_run``: a CUDA failure while running (``execute_async_v3`` made to raise) moves the
   Dehazer to ``model.onnx`` with a note, and the frame is still dehazed.
4. ``fallback_open``: a truncated copy of the engine is passed over with a note at open.
5. ``ort_trt_cache``: with onnxruntime's TensorRT provider, the first session writes an engine
   and a timing cache under ``$BILALORA_CACHE_DIR/trt/onnxruntime``; a second session on the
   same graph starts faster (cache hit).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def _frames(max_hw: tuple[int, int] | None) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    sizes = [(480, 640), (720, 1280)]
    if max_hw:
        sizes.append((max_hw[0] + 36, max_hw[1] + 52))  # over the profile: tiled
    frames = []
    for height, width in sizes:
        yy, xx = np.mgrid[0:height, 0:width]
        base = (127 + 60 * np.sin(xx / 37.0) * np.cos(yy / 23.0))[..., None] + rng.normal(0, 8, (height, width, 3))
        frames.append(np.clip(base, 0, 255).astype(np.uint8))
    return frames


def check_engine(model: Path) -> list[dict]:
    from bilalora.runtime import Dehazer
    from bilalora.runtime.backends import import_cudart

    cudart = import_cudart()
    rows = []
    reference = Dehazer(model, prefer="onnx", precision="fp32", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    reference(_frames(None)[0])  # onnxruntime's CUDA arena is allocated before the engine's memory is counted
    free_before = int(cudart.cudaMemGetInfo()[1])
    engine = Dehazer(model, prefer="engine")
    frames = _frames(engine.backend.max_hw)
    psnrs = [_psnr(engine(f), reference(f)) for f in frames]
    pinned = all(buffer.pinned for buffer in engine.backend._host.values())
    rows.append({"check": "engine", "passed": bool(min(psnrs) >= 40.0 and pinned), "device": engine.backend.device,
                 "frames": [list(f.shape[:2]) for f in frames], "psnr_vs_onnx_fp32_db": psnrs, "pinned": pinned,
                 "ms_last": engine.last_ms})  # fmt: skip
    engine.close()
    del engine
    free_after = int(cudart.cudaMemGetInfo()[1])
    reference.close()
    rows.append({"check": "close", "passed": abs(free_after - free_before) < 64 << 20,
                 "free_before": free_before, "free_after": free_after})  # fmt: skip

    engine = Dehazer(model)  # auto: engine first, model.onnx behind it
    if engine.backend.name == "tensorrt":
        def broken(stream):
            raise RuntimeError("CUDA error (injected): an illegal memory access was encountered")

        engine.backend.context.execute_async_v3 = broken
        out = engine(frames[0])
        rows.append({"check": "fallback_run", "passed": engine.backend.name == "onnxruntime" and out.shape == frames[0].shape
                     and any("failed while running" in n for n in engine.notes), "notes": engine.notes})  # fmt: skip
    else:
        rows.append({"check": "fallback_run", "passed": None, "notes": engine.notes})
    engine.close()

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "export"
        shutil.copytree(model, copy)
        data = (copy / "model.engine").read_bytes()
        (copy / "model.engine").write_bytes(data[: len(data) // 2])
        broken_open = Dehazer(copy, verify=False)  # the hash would refuse it first: test the engine's own failure
        rows.append({"check": "fallback_open", "passed": broken_open.backend.name != "tensorrt"
                     and any("model.engine" in n for n in broken_open.notes), "notes": broken_open.notes})  # fmt: skip
        broken_open.close()
    return rows


def check_ort_trt_cache(model: Path) -> dict:
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return {"check": "ort_trt_cache", "passed": None, "why": "this onnxruntime has no TensorrtExecutionProvider"}
    from bilalora.runtime import Dehazer

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["BILALORA_CACHE_DIR"] = tmp
        providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        frame = _frames(None)[0]
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            dehaze = Dehazer(model, prefer="onnx", precision="fp32", providers=providers)
            dehaze(frame)
            seconds.append(time.perf_counter() - start)
            dehaze.close()
        files = sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*") if p.is_file())
        return {"check": "ort_trt_cache", "passed": bool(files) and seconds[1] < seconds[0],
                "first_s": seconds[0], "second_s": seconds[1], "files": files}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="export folder with model.engine and model.onnx")
    parser.add_argument("--out", type=Path, default=Path("gpu_runtime_check.json"))
    args = parser.parse_args()
    rows = []
    try:
        rows += check_engine(args.model)
    except Exception as exc:  # noqa: BLE001 - a GPU check that cannot run is a result too
        rows.append({"check": "engine", "passed": False, "error": f"{type(exc).__name__}: {exc}"})
    try:
        rows.append(check_ort_trt_cache(args.model))
    except Exception as exc:  # noqa: BLE001
        rows.append({"check": "ort_trt_cache", "passed": False, "error": f"{type(exc).__name__}: {exc}"})
    for row in rows:
        print(f"{row['check']:>14}: {row['passed']}")
    args.out.write_text(json.dumps({"benchmark": "gpu_runtime_check", "model": str(args.model), "rows": rows},
                                   indent=2, default=str))  # fmt: skip
    return 1 if any(row["passed"] is False for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
