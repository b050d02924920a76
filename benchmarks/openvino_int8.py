"""OpenVINO and INT8 on this CPU: the exporter's keep-float search, then onnxruntime fp32 vs OpenVINO bf16/f32 vs INT8.

    python benchmarks/openvino_int8.py [--model EXPORT_DIR] [--images DIR] [--sizes 480x640,720x1280]
                                       [--threads 2] [--calib-images 16] [--held-out 4] [--unseen 8] [--runs 4]
                                       [--out NAME.json]

1. Export: ``--model`` (an export folder with model.onnx and model.xml), else the
   shipped default backbone exported here with ``bilalora export --base --openvino``.
2. INT8: ``model.onnx`` quantised by the exporter's own search
   (:func:`bilalora.export.int8.quantize_int8`: one calibration pass over 256 px
   crops of the first ``--calib-images`` photos of ``--images``, activation-range
   percentile chosen by measurement, per-conv sensitivity, the most damaging
   convolutions kept float until the gate passes). Its gate images are those of
   ``bilalora export --int8 --calib DIR``: 4 calibration photos and the next
   ``--held-out`` photos (downsized to 512 px). The written file and the same
   graph with every convolution int8 are then run by onnxruntime on every
   calibration photo, the held-out photos and ``--unseen`` further photos that
   neither calibration nor the search saw (512 px); OpenVINO bf16 (``model.xml``)
   runs on the gate images too, to see whether its worst frame is INT8's. A sweep
   keeps float the first n convolutions of the search's order for a few n and
   measures every image set (how many float convolutions unseen photos need).
3. Latency at each ``--sizes`` frame size, ``--threads`` threads: onnxruntime fp32
   (``model.onnx``, CPU provider), OpenVINO bf16 and f32 (``model.xml``), OpenVINO on
   the searched INT8 QDQ graph and on the every-conv-int8 graph (bf16 for what
   stays float), onnxruntime on the searched INT8 graph. Frames are the held-out
   photos resized to the size; calls interleave across backends (a shared
   machine's load falls on each alike); the median of ``--runs`` calls after one
   warm-up is reported, with the PSNR of each output against the onnxruntime
   fp32 output on the same frames (min over frames). How many convolutions
   OpenVINO compiled with int8 kernels is recorded (``openvino_conv_kernels``).

Writes ``benchmarks/results/<--out>`` (default ``openvino_int8_<backbone>_<cpu>_search.json``).
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
    from bilalora.export.options import ExportOptions
    from bilalora.export.pipeline import run_export

    from bilalora.backbones import default_backbone

    run_export(ExportOptions(base=True, backbone=default_backbone(), out=folder, openvino=True, parity_sizes=((64, 96),)))
    return folder


def _search(model_dir: Path, calib, check, references, work: Path, threads: int) -> tuple[dict, Path, Path, list]:
    """Run the exporter's INT8 search; (its record, the searched file, the every-conv-int8 file, the log lines)."""
    import onnx
    from bilalora.export.int8 import activation_ranges, quant_convs, quantize_int8, write_qdq

    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(f"{time.strftime('%H:%M:%S')} {line}")
        print(lines[-1], flush=True)

    searched = work / "model_int8.onnx"
    result = quantize_int8(model_dir / "model.onnx", searched, calib, check, references, log=log, threads=threads)
    record = result.record()
    record["seconds"] = round(result.seconds, 1)
    record["gate_psnr_db"] = {c["input"]: round(c["psnr_db"], 2) for c in result.parity.cases}
    model = onnx.load(str(model_dir / "model.onnx"))
    convs = quant_convs(model.graph)
    ranges = activation_ranges(model, convs, calib, (result.percentile,), threads)[result.percentile]
    everything = work / "model_int8_all.onnx"
    onnx.save(write_qdq(model, convs, ranges), str(everything))
    return record, searched, everything, lines


def _sweep(model_dir: Path, calib, search: dict, sets: dict, counts: list[int], threads: int) -> list[dict]:
    """Worst/median PSNR per image set when the first n convs of the search's order stay float (n in ``counts``),
    measured with the search graph (the QDQ graph's arithmetic, without onnxruntime's int8 kernels)."""
    import onnx
    from bilalora.export.int8 import SearchGraph, activation_ranges, quant_convs
    from bilalora.export.parity import psnr

    model = onnx.load(str(model_dir / "model.onnx"))
    convs = quant_convs(model.graph)
    percentile = search["activation_percentile"]
    ranges = activation_ranges(model, convs, calib, (percentile,), threads)[percentile]
    order = list(search["search"]["sensitivity"]["psnr_db_alone"])
    graph = SearchGraph(model, convs, threads)
    rows = []
    try:
        scales = graph.scales(ranges)
        for n in counts:
            mask = graph.mask(order[:n])
            row = {"kept_float": n}
            for label, (cases, refs) in sets.items():
                scores = [psnr(graph.run(c.array, mask, scales), r) for c, r in zip(cases, refs)]
                row[label] = {"worst": round(min(scores), 2), "median": round(float(np.median(scores)), 2),
                              "below_35db": sum(s < 35 for s in scores), "images": len(scores)}  # fmt: skip
            rows.append(row)
            print(f"{n} float: " + ", ".join(f"{k} {v['worst']}" for k, v in row.items() if k != "kept_float"),
                  flush=True)  # fmt: skip
    finally:
        graph.close()
    return rows


def _psnr_table(sets: dict, runners: dict) -> dict:
    """{runner: {set: {"worst", "median", "worst_image", "per_image"}}} against PyTorch fp32."""
    from bilalora.export.parity import psnr

    table = {}
    for name, run in runners.items():
        table[name] = {}
        for label, (cases, refs) in sets.items():
            scores = {c.label: round(psnr(run(c.array), r), 2) for c, r in zip(cases, refs)}
            worst = min(scores, key=scores.get)
            table[name][label] = {"worst": scores[worst], "median": round(float(np.median(list(scores.values()))), 2),
                                  "worst_image": worst, "per_image": scores}  # fmt: skip
    return table


def _kernels(compiled) -> dict:
    """{"<layer type> <runtime precision>": count} of the convolutions OpenVINO compiled (int8 kernels or not)."""
    counts: dict = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind in ("Convolution", "Deconvolution"):
            key = f"{kind} {info['runtimePrecision'].astype(str)}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def _backends(model_dir: Path, int8: Path, int8_all: Path, threads: int, kernels: dict) -> dict:
    import openvino as ov
    from bilalora.export.openvino_export import inference_config
    from bilalora.export.parity import ort_session

    core = ov.Core()

    def ov_runner(path: Path, precision):
        config, used = inference_config(core, precision, threads)
        compiled = core.compile_model(str(path), "CPU", config)
        kernels[f"{path.name} {used}"] = _kernels(compiled)
        output = compiled.output(0)
        return (lambda x: np.asarray(compiled({"input": x})[output])), used

    ort32 = ort_session(model_dir / "model.onnx", threads)
    ort8 = ort_session(int8, threads)
    bf16, bf16_used = ov_runner(model_dir / "model.xml", None)
    f32, _ = ov_runner(model_dir / "model.xml", "f32")
    ov8, ov8_used = ov_runner(int8, None)
    ov8_all, _ = ov_runner(int8_all, None)
    return {
        "onnxruntime fp32": lambda x: ort32.run(["output"], {"input": x})[0],
        f"openvino {bf16_used}": bf16,
        "openvino f32": f32,
        f"openvino int8 (searched QDQ, rest {ov8_used})": ov8,
        f"openvino int8 (every conv int8, rest {ov8_used})": ov8_all,
        "onnxruntime int8 (searched QDQ)": lambda x: ort8.run(["output"], {"input": x})[0],
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
    parser.add_argument("--unseen", type=int, default=8)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--out", help="result file name under benchmarks/results/")
    args = parser.parse_args()

    import cv2
    import openvino as ov
    import torch
    from bilalora.export.int8 import calibration_crops
    from bilalora.export.onnx_export import ExportWrapper
    from bilalora.export.openvino_export import inference_config
    from bilalora.export.parity import image_cases, ort_session, reference_outputs
    from bilalora.runtime.model_json import read_sidecar, tool_versions

    from bilalora import backbones
    from bilalora.devices import cpu_name
    from bilalora.images import list_images, load_image
    from bilalora.parsing import parse_hw, parse_list
    from bilalora.progress import make_progress

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bilalora-ov-int8-") as tmp:
        work = Path(tmp)
        model_dir = args.model or _export(work / "export", args.threads)
        record = read_sidecar(model_dir)
        paths = list_images(args.images)
        calib_paths = paths[: args.calib_images]
        held_paths = paths[args.calib_images : args.calib_images + args.held_out]
        unseen_paths = paths[args.calib_images + args.held_out : args.calib_images + args.held_out + args.unseen]
        calib = calibration_crops(calib_paths)
        held = image_cases(held_paths, count=len(held_paths))
        for case in held:
            case.label = f"held-out {case.label}"
        check = image_cases(calib_paths[:4], count=4) + held  # the exporter's gate images
        calib_full = image_cases(calib_paths, count=len(calib_paths))
        unseen = image_cases(unseen_paths, count=len(unseen_paths))
        wrapped = ExportWrapper(backbones.load(record["backbone"], weights=record.get("weights")).eval()).eval()
        references = reference_outputs(wrapped, check)
        search, searched, everything, lines = _search(model_dir, calib, check, references, work, args.threads)
        ort8, ort8_all = ort_session(searched, args.threads), ort_session(everything, args.threads)
        core = ov.Core()
        config, bf16 = inference_config(core, None, args.threads)
        ir = core.compile_model(str(model_dir / "model.xml"), "CPU", config)
        runners = {
            "int8 searched (onnxruntime)": lambda x: ort8.run(["output"], {"input": x})[0],
            "int8 every conv (onnxruntime)": lambda x: ort8_all.run(["output"], {"input": x})[0],
            f"openvino {bf16} (model.xml)": lambda x: np.asarray(ir({"input": x})[ir.output(0)]),
        }
        sets = {
            "gate": (check, references),
            "calibration": (calib_full, reference_outputs(wrapped, calib_full)),
            "held_out": (held, references[4:]),
            "unseen": (unseen, reference_outputs(wrapped, unseen)),
        }
        accuracy = _psnr_table(sets, runners)
        chosen = search["convs"] - search["int8_convs"]
        counts = sorted({0, chosen, 16, 24, search["convs"] // 2} - {c for c in (16, 24) if c < chosen})
        sweep = _sweep(model_dir, calib, search, {k: v for k, v in sets.items() if k != "gate"}, counts, args.threads)
        kernels: dict = {}
        backends = _backends(model_dir, searched, everything, args.threads, kernels)
        latency = {}
        with make_progress() as progress:
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
        "unseen": [p.name for p in unseen_paths],
        "int8_search": search,
        "int8_log": lines,
        "accuracy_vs_pytorch_fp32": accuracy,
        "keep_float_sweep": sweep,
        "latency": latency,
        "openvino_conv_kernels": kernels,
        "versions": {**tool_versions(), "openvino": ov.get_version()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in cpu_name().lower()).strip("-")[:24]
    out = RESULTS / (args.out or f"openvino_int8_{record['backbone']}_{slug}_search.json")
    from bilalora.io import write_json

    write_json(out, result)
    print(json.dumps({"written": str(out), "float": search["float_nodes"],
                      "accuracy": {n: {k: (v["worst"], v["median"], v["worst_image"]) for k, v in t.items()}
                                   for n, t in accuracy.items()},
                      "latency": {s: {n: (r["median_ms"], r["ratio_vs_ort_fp32"], r["psnr_db_vs_ort_fp32_min"])
                                      for n, r in t.items()} for s, t in latency.items()}}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
