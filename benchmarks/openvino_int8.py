"""OpenVINO and INT8 on this CPU: onnxruntime fp32 vs OpenVINO bf16/f32 vs INT8 (QDQ) in OpenVINO and onnxruntime.

    python benchmarks/openvino_int8.py [--model EXPORT_DIR] [--images DIR] [--sizes 480x640,720x1280]
                                       [--threads 2] [--calib-images 16] [--held-out 4] [--runs 4]

1. Export: ``--model`` (an export folder with model.onnx and model.xml), else the
   shipped default backbone exported here with ``bilalora export --base --openvino``.
2. INT8 variants: ``model.onnx`` quantised with the exporter's own code
   (:func:`bilalora.export.int8.quantize_once`, QDQ on convolutions, symmetric
   int8) from the first ``--calib-images`` photos of ``--images`` (256 px crops),
   with MinMax or percentile ranges and each keep-float set of the exporter's
   ladder. Each variant's PSNR against PyTorch fp32 is measured on 4 calibration
   photos and ``--held-out`` other photos (downsized to 512 px), the exporter's gate
   inputs. The variant the exporter would keep (the first passing percentile
   set), else the best one, is timed below.
3. Latency at each ``--sizes`` frame size, ``--threads`` threads: onnxruntime fp32
   (``model.onnx``, CPU provider), OpenVINO bf16 and f32 (``model.xml``), OpenVINO on
   the INT8 QDQ graph (bf16 for what stays float), onnxruntime on the INT8 graph.
   Frames are the held-out photos resized to the size; calls interleave across
   backends (a shared machine's load falls on each alike); the median of
   ``--runs`` calls after one warm-up is reported, with the PSNR of each output
   against the onnxruntime fp32 output on the same frames (min over frames).

Writes ``benchmarks/results/openvino_int8_<backbone>_<cpu>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _export(folder: Path, threads: int) -> Path:
    from bilalora.backbones import default_backbone
    from bilalora.export.options import ExportOptions
    from bilalora.export.pipeline import run_export

    run_export(ExportOptions(base=True, backbone=default_backbone(), out=folder, openvino=True, parity_sizes=((64, 96),)))
    return folder


def _variants(model_dir: Path, calib, check, references, work: Path, progress) -> tuple[list[dict], Path]:
    import onnx
    from onnxruntime.quantization import quant_pre_process

    from bilalora.export.int8 import KEEP_FLOAT_LADDER, keep_float_nodes, quantize_once
    from bilalora.export.parity import evaluate, gate_for, ort_session

    prepared = work / "prepared.onnx"
    quant_pre_process(str(model_dir / "model.onnx"), str(prepared), skip_symbolic_shape=True)
    graph = onnx.load(str(prepared), load_external_data=False).graph
    plan = [("minmax", ())] + [("percentile", tuple(parts)) for parts in KEEP_FLOAT_LADDER]
    task = progress.add_task("INT8 variants", total=len(plan), status="")
    rows, kept = [], None
    for method, parts in plan:
        out = work / f"int8-{method}-{'+'.join(parts) or 'all'}.onnx"
        tick = time.perf_counter()
        quantize_once(prepared, out, calib, keep_float_nodes(graph, parts), method=method)
        seconds = time.perf_counter() - tick
        session = ort_session(out, 2)
        outputs = [session.run(["output"], {"input": c.array})[0] for c in check]
        result = evaluate(out.name, "int8", check, outputs, references, gate_for("onnx", "int8"))
        row = {"method": method, "kept_float": list(parts), "quantize_seconds": round(seconds, 1),
               "psnr_db_worst": round(result.psnr_db, 2), "passed_35db": result.passed,
               "psnr_db": {c["input"]: round(c["psnr_db"], 2) for c in result.cases}, "file": out.name}  # fmt: skip
        rows.append(row)
        if kept is None and method == "percentile" and result.passed:
            kept = row
        progress.advance(task)
    best = kept or max((r for r in rows), key=lambda r: r["psnr_db_worst"])
    best["timed"] = True
    return rows, work / best["file"]


def _backends(model_dir: Path, int8: Path, threads: int) -> dict:
    import openvino as ov

    from bilalora.export.openvino_export import inference_config
    from bilalora.export.parity import ort_session

    core = ov.Core()

    def ov_runner(path: Path, precision):
        config, used = inference_config(core, precision, threads)
        compiled = core.compile_model(str(path), "CPU", config)
        output = compiled.output(0)
        return (lambda x: np.asarray(compiled({"input": x})[output])), used

    ort32 = ort_session(model_dir / "model.onnx", threads)
    ort8 = ort_session(int8, threads)
    bf16, bf16_used = ov_runner(model_dir / "model.xml", None)
    f32, _ = ov_runner(model_dir / "model.xml", "f32")
    ov8, ov8_used = ov_runner(int8, None)
    return {
        "onnxruntime fp32": lambda x: ort32.run(["output"], {"input": x})[0],
        f"openvino {bf16_used}": bf16,
        "openvino f32": f32,
        f"openvino int8 (QDQ, rest {ov8_used})": ov8,
        "onnxruntime int8 (QDQ)": lambda x: ort8.run(["output"], {"input": x})[0],
    }


def _latency(backends: dict, frames: list[np.ndarray], runs: int, progress) -> dict:
    from bilalora.export.parity import psnr

    names = list(backends)
    times = {n: [] for n in names}
    outputs = {n: [] for n in names}
    for name in names:  # warm-up (first-inference allocations, OpenVINO's shape-specific compilation)
        backends[name](frames[0])
    task = progress.add_task(f"latency {frames[0].shape[2]}x{frames[0].shape[3]}", total=runs * len(names), status="")
    for index in range(runs):
        frame = frames[index % len(frames)]
        for name in names:
            tick = time.perf_counter()
            out = backends[name](frame)
            times[name].append(time.perf_counter() - tick)
            if index < len(frames):
                outputs[name].append(out)
            progress.advance(task)
    reference = names[0]
    base = statistics.median(times[reference])
    table = {}
    for name in names:
        median = statistics.median(times[name])
        scores = [psnr(o, r) for o, r in zip(outputs[name], outputs[reference])]
        table[name] = {"median_ms": round(1000 * median, 1), "ratio_vs_ort_fp32": round(median / base, 3),
                       "psnr_db_vs_ort_fp32_min": None if name == reference else round(min(scores), 2),
                       "runs_ms": [round(1000 * t, 1) for t in times[name]]}  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="export folder with model.onnx and model.xml")
    parser.add_argument("--images", type=Path, default=Path("/work/shared/data/real_day"))
    parser.add_argument("--sizes", default="480x640,720x1280")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-images", type=int, default=16)
    parser.add_argument("--held-out", type=int, default=4)
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()

    import cv2
    import torch

    from bilalora import backbones
    from bilalora.devices import cpu_name
    from bilalora.export.int8 import calibration_crops
    from bilalora.export.onnx_export import ExportWrapper
    from bilalora.export.parity import image_cases, reference_outputs
    from bilalora.images import list_images, load_image
    from bilalora.parsing import parse_hw, parse_list
    from bilalora.progress import make_progress
    from bilalora.runtime.model_json import read_sidecar, tool_versions

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bilalora-ov-int8-") as tmp, make_progress() as progress:
        work = Path(tmp)
        model_dir = args.model or _export(work / "export", args.threads)
        record = read_sidecar(model_dir)
        paths = list_images(args.images)
        calib_paths = paths[: args.calib_images]
        held_paths = paths[args.calib_images : args.calib_images + args.held_out]
        calib = calibration_crops(calib_paths)
        check = image_cases(calib_paths[:4], count=4) + image_cases(held_paths, count=len(held_paths))
        model = backbones.load(record["backbone"], weights=record.get("weights")).eval()
        references = reference_outputs(ExportWrapper(model).eval(), check)
        variants, int8 = _variants(model_dir, calib, check, references, work, progress)
        backends = _backends(model_dir, int8, args.threads)
        latency = {}
        for size in parse_list(args.sizes):
            height, width = parse_hw(size, "--sizes", 4, example="480x640")
            frames = []
            for path in held_paths:
                image = cv2.resize(load_image(path), (width, height), interpolation=cv2.INTER_AREA)
                frames.append(np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32))
            latency[f"{height}x{width}"] = _latency(backends, frames, args.runs, progress)
    result = {
        "benchmark": "openvino_int8",
        "command": "python benchmarks/openvino_int8.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "cpu": cpu_name(),
        "threads": args.threads,
        "backbone": record["backbone"],
        "weights": record.get("weights"),
        "images": str(args.images),
        "calibration": [p.name for p in calib_paths],
        "held_out": [p.name for p in held_paths],
        "int8_variants": variants,
        "latency": latency,
        "versions": {**tool_versions(), "openvino": __import__("openvino").get_version()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in cpu_name().lower()).strip("-")[:24]
    out = RESULTS / f"openvino_int8_{record['backbone']}_{slug}.json"
    from bilalora.io import write_json

    write_json(out, result)
    print(json.dumps({"written": str(out), "latency": {s: {n: (r["median_ms"], r["ratio_vs_ort_fp32"],
                      r["psnr_db_vs_ort_fp32_min"]) for n, r in t.items()} for s, t in latency.items()},
                      "variants": [(v["method"], v["kept_float"], v["psnr_db_worst"]) for v in variants]},
                     indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
