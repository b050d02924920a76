"""End-to-end latency of the torch-free runtime at camera resolutions.

    python benchmarks/runtime_latency.py [--model EXPORT_DIR] [--sizes 480x640,720x1280] [--threads 2]
    python benchmarks/runtime_latency.py --openvino --int8 --calib ../shared/data/real_day   # export those too

Times ``Dehazer.__call__`` on uint8 BGR frames (colour conversion, padding,
inference, crop, back to uint8) for every precision the export holds an artefact
for that passed its parity gate (``--precision`` fp32, fp16, bf16 = OpenVINO on
CPUs with bf16 units, int8), with and without tiling. Without ``--model`` the
shipped default backbone is exported to a temporary folder first. Prints a table
and writes ``benchmarks/results/runtime_latency_<backbone>_<device>.json``; the
device is named in the file. Numbers depend on the machine and on what else runs
there (a shared machine: run it under ``nice`` when it is quiet, and say so).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"
console = Console(highlight=False)


#: Precision -> the artefact the runtime picks for it (the rows are those the export holds).
PRECISIONS = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "bf16": "model.xml", "int8": "model_int8.onnx"}


def _export_default(folder: Path, openvino: bool, int8: bool, calib: Path | None) -> Path:
    from bilalora.backbones import default_backbone
    from bilalora.export.pipeline import ExportOptions, run_export

    name = default_backbone()
    console.print(f"exporting the shipped {name} to {folder} ...")
    run_export(ExportOptions(base=True, backbone=name, out=folder, fp16=True, openvino=openvino, int8=int8,
                             calib=calib, slim=False))  # fmt: skip
    return folder


def _precisions(record: dict, asked: list[str]) -> list[str]:
    """The precisions to time: those asked (default: all) whose artefact exists and did not fail its gate."""
    from bilalora.runtime.ov_backend import cpu_has_bf16

    artefacts = record.get("artefacts") or {}
    chosen = []
    for precision in asked or list(PRECISIONS):
        entry = artefacts.get(PRECISIONS[precision])
        if not entry or entry.get("removed") or (entry.get("parity") or {}).get("passed") is False:
            continue
        if precision == "bf16" and not cpu_has_bf16():
            continue
        chosen.append(precision)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="export folder (default: export the shipped backbone)")
    parser.add_argument("--sizes", default="480x640,720x1280", help="frame sizes HxW, comma-separated")
    parser.add_argument("--tile", type=int, default=256, help="tile side for the tiled rows (0: none)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: its default)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--precisions", default="", help="fp32,fp16,bf16,int8 (default: all the export holds)")
    parser.add_argument("--openvino", action="store_true", help="default export: also OpenVINO model.xml")
    parser.add_argument("--int8", action="store_true", help="default export: also model_int8.onnx (needs --calib)")
    parser.add_argument("--calib", type=Path, default=None, help="calibration images for --int8")
    args = parser.parse_args()

    from bilalora.devices import cpu_name
    from bilalora.parsing import parse_hw, parse_list
    from bilalora.runtime.model_json import load_record

    from bilalora.bench.latency import time_callable
    from bilalora.runtime import Dehazer

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or _export_default(Path(tmp) / "export", args.openvino, args.int8, args.calib)
        record_in = load_record(folder, required=True)
        sizes = [parse_hw(s, "--sizes", example="480x640") for s in parse_list(args.sizes) or []]
        rng = np.random.default_rng(0)
        rows = []
        for precision in _precisions(record_in, parse_list(args.precisions) or []):
            for tile in [None] + ([args.tile] if args.tile else []):
                dehaze = Dehazer(folder, precision=precision, tile=tile, threads=args.threads)
                for height, width in sizes:
                    frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                    timing = time_callable(lambda: dehaze(frame), args.warmup, args.runs)
                    rows.append({"graph": dehaze.path.name, "precision": precision, "tile": tile,
                                 "frame": [height, width], "ms": timing.as_dict(), "provider": dehaze.backend.device})
                    console.print(f"{dehaze.path.name} tile={tile} {height}x{width}: {timing.p50:.1f} ms")
                dehaze.close()

    device = cpu_name()
    table = Table(title=f"runtime latency ({record_in.get('backbone')}, {device}, threads {args.threads or 'default'})")
    for column in ("graph", "tile", "frame", "ms p50", "ms p90", "FPS"):
        table.add_column(column, justify="right" if column.startswith(("ms", "FPS")) else "left")
    for row in rows:
        ms = row["ms"]
        table.add_row(row["graph"], str(row["tile"] or "-"), f"{row['frame'][0]}x{row['frame'][1]}",
                      f"{ms['p50']:.1f}", f"{ms['p90']:.1f}", f"{ms['fps']:.1f}")  # fmt: skip
    console.print(table)

    import onnxruntime

    from bilalora.io import write_json

    slug = "".join(c if c.isalnum() else "-" for c in device).strip("-").lower()
    out = RESULTS / f"runtime_latency_{record_in.get('backbone')}_{slug}.json"
    write_json(out, {
        "benchmark": "runtime_latency",
        "device": device,
        "threads": args.threads or "onnxruntime default",
        "onnxruntime": onnxruntime.__version__,
        "backbone": record_in.get("backbone"),
        "weights": record_in.get("weights"),
        "base_fingerprint": record_in.get("base_fingerprint"),
        "protocol": "Dehazer.__call__ on random uint8 BGR frames: BGR->RGB float, reflect pad to 4, the backend "
                    f"the runtime picks for --precision, crop, uint8; {args.warmup} warm-up + {args.runs} timed calls",
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    })  # fmt: skip
    console.print(f"saved {out}")


if __name__ == "__main__":
    main()
