"""Which backend the runtime should pick on this machine: Dehazer end to end per --precision, on real photos.

    python benchmarks/runtime_backends.py --model EXPORT_DIR [--images DIR] [--sizes 480x640,720x1280] [--threads 2]

For each ``--precision`` (fp32: onnxruntime ``model.onnx``; auto: what the runtime picks
here, e.g. OpenVINO bf16 on CPUs with AMX/AVX512-BF16; int8 when ``model_int8.onnx`` exists)
it times ``Dehazer.__call__`` on uint8 BGR frames (colour conversion, padding, inference,
crop, back to uint8) made from real photos resized to each size (calls interleaved across
backends, so that the load of a shared machine falls on each alike), and measures the PSNR of
the uint8 output against the fp32 onnxruntime output on the same frames. Torch-free.
Writes ``benchmarks/results/runtime_backends_<backbone>_<cpu>.json``. Numbers depend on
the machine and on what else runs there (this project's CPU is shared).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import cv2
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="export folder (model.json)")
    parser.add_argument("--images", type=Path, default=Path("/work/shared/data/real_day"), help="real photos")
    parser.add_argument("--count", type=int, default=3, help="photos used for the PSNR")
    parser.add_argument("--sizes", default="480x640,720x1280", help="frame sizes HxW, comma-separated")
    parser.add_argument("--precisions", default="fp32,auto,int8", help="--precision values to compare")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    from bilalora.images import list_images
    from bilalora.io import write_json
    from bilalora.parsing import parse_hw, parse_list
    from bilalora.runtime import Dehazer
    from bilalora.runtime.decode import read_frame
    from bilalora.runtime.model_json import load_record

    record = load_record(args.model, required=True)
    photos = [read_frame(p) for p in list_images(args.images)[: args.count]]
    photos = [p if p.ndim == 3 and p.shape[2] == 3 else cv2.cvtColor(p, cv2.COLOR_GRAY2BGR) for p in photos]
    sizes = [parse_hw(s, "--sizes") for s in parse_list(args.sizes)]
    if "fp32" not in parse_list(args.precisions):
        parser.error("--precisions must include fp32 (the reference)")
    load_before = _loadavg()
    dehazers = {}
    for precision in parse_list(args.precisions):
        dehaze = Dehazer(args.model, precision=precision, threads=args.threads)
        info = dehaze.describe()
        if precision != "fp32" and info["precision"] == "fp32" and info["backend"] == "onnxruntime":
            print(f"--precision {precision}: falls back to fp32 onnxruntime here ({'; '.join(info['notes'])}); skipped")
            dehaze.close()
            continue
        dehazers[precision] = (dehaze, info)
    rows = []
    for height, width in sizes:
        frames = [cv2.resize(p, (width, height), interpolation=cv2.INTER_AREA) for p in photos]
        outputs = {name: [d(f) for f in frames] for name, (d, _) in dehazers.items()}
        # interleaved timing: one call per backend in turn, so that the load of a shared machine
        # falls on every backend alike
        samples: dict[str, list[float]] = {name: [] for name in dehazers}
        for index in range(args.warmup + args.runs):
            for name, (dehaze, _) in dehazers.items():
                start = time.perf_counter()
                dehaze(frames[0])
                if index >= args.warmup:
                    samples[name].append(1000.0 * (time.perf_counter() - start))
        for name, (dehaze, info) in dehazers.items():
            worst = min(_psnr(o, r) for o, r in zip(outputs[name], outputs["fp32"]))
            row = {"precision_asked": name, "backend": info["backend"], "precision": info["precision"],
                   "file": Path(info["file"]).name, "device": info["device"], "frame": [height, width],
                   "ms_p50": float(np.percentile(samples[name], 50)), "ms_mean": float(np.mean(samples[name])),
                   "ms_min": float(np.min(samples[name])), "runs": len(samples[name]),
                   "psnr_vs_fp32_db_worst": None if worst == float("inf") else round(worst, 2)}  # fmt: skip
            rows.append(row)
            print(f"{name:>5} {info['backend']:>12} {info['precision']:>5} {height}x{width}: "
                  f"{row['ms_p50']:.0f} ms p50, PSNR vs fp32 {row['psnr_vs_fp32_db_worst']} dB")  # fmt: skip
    for dehaze, _ in dehazers.values():
        dehaze.close()
    for row in rows:
        base = next(r for r in rows if r["precision_asked"] == "fp32" and r["frame"] == row["frame"])
        row["speed_vs_fp32"] = round(row["ms_p50"] / base["ms_p50"], 3)
    from bilalora.devices import cpu_name

    cpu = cpu_name()
    slug = "".join(c if c.isalnum() else "-" for c in cpu).strip("-").lower()
    out = RESULTS / f"runtime_backends_{record.get('backbone')}_{slug}.json"
    write_json(out, {
        "benchmark": "runtime_backends",
        "cpu": cpu,
        "threads": args.threads,
        "cores": os.cpu_count(),
        "loadavg_before_after": [load_before, _loadavg()],
        "backbone": record.get("backbone"),
        "base_fingerprint": record.get("base_fingerprint"),
        "images": [p.name for p in list_images(args.images)[: args.count]],
        "protocol": "Dehazer.__call__ on real photos resized (INTER_AREA) to each size: uint8 BGR in and out; "
                    f"{args.warmup} warm-up + {args.runs} timed calls on the first photo, interleaved across "
                    "backends (a shared machine's load falls on each alike); PSNR of the uint8 output "
                    "against --precision fp32 (onnxruntime, model.onnx) on every photo, worst case",
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    })  # fmt: skip
    print(f"saved {out}")


if __name__ == "__main__":
    main()
