"""Frames per second of ``bilalora run --ray`` against the number of workers, and what an hour of 1080p costs.

    python benchmarks/ray_scaling.py                        # local clusters of 1 and 2 CPUs on this machine
    python benchmarks/ray_scaling.py --workers 1,2,4,8 --address auto --size 1080x1920   # on a cluster

1. Exports the shipped default backbone with ``bilalora export --base`` into a temporary
   folder (or takes ``--model``).
2. Writes a test video: ``--frames`` frames of real photos (``--photos``, default the
   shared real_day set when present, else synthetic hazy scenes) resized to ``--size``,
   encoded with OpenCV's mp4v (keyframe every 12 frames).
3. One process without Ray (``Dehazer`` + ``process``, 1 and 2 onnxruntime threads): the
   reference output and the baseline rate.
4. For each worker count k: a fresh local Ray cluster with k CPUs (or the cluster at
   ``--address``), ``run_fleet`` with k one-CPU workers (one onnxruntime thread each) over
   the video; the output must be frame-identical to the one-process output. Rates are
   frames / the run's seconds in its record (from starting the workers to the last frame
   written: worker start, model load, decode, dehazing, reassembly and encode; planning and
   cluster start excluded) and the sum of the workers' busy rates (frames / time inside
   their items, model load excluded: what the workers sustain once started).
5. Times ``Dehazer`` on one ``--latency-size`` frame (default 1080x1920), wall and processor
   time, and computes the device-hours (and, on a CPU, core-hours) that one hour of 30 FPS
   video needs at that latency, one frame at a time.

Writes ``benchmarks/results/ray_scaling_<backbone>_<device>.json``. The machine's load
average is recorded: on a shared machine other work slows every row.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_day"
console = Console(highlight=False)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def _export(folder: Path) -> Path:
    """``bilalora export --base`` of the shipped default backbone into ``folder``."""
    script = Path(sys.executable).with_name("bilalora")
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from bilalora.cli.app import main; main()"]
    console.print(f"exporting the shipped backbone: {' '.join(command[-1:])} export --base --out {folder}")
    subprocess.run([*command, "export", "--base", "--out", str(folder)], check=True, stdout=subprocess.DEVNULL)
    return folder


def _photos(folder: Path | None, count: int, size: tuple[int, int]) -> tuple[list[np.ndarray], str]:
    height, width = size
    if folder is not None and folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        images = []
        for path in files:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is not None:
                images.append(cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA))
            if len(images) >= count:
                break
        if images:
            return images, f"{len(images)} photos of {folder}"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import write_hazy_images

    tmp = Path(tempfile.mkdtemp(prefix="ray_scaling_scenes_"))
    paths = write_hazy_images(tmp, count=min(count, 8), size=size)
    return [cv2.imread(str(p)) for p in paths], "synthetic hazy scenes (tests/conftest.py)"


def _write_video(path: Path, images: list[np.ndarray], frames: int, fps: float = 30.0) -> Path:
    height, width = images[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for index in range(frames):
        writer.write(images[(index // 4) % len(images)])  # each photo held 4 frames, like a slow pan
    writer.release()
    return path


def _decode(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, image = capture.read()
        if not ok:
            return frames
        frames.append(image)


def _one_process(model: Path, video: Path, out: Path, threads: int) -> dict:
    from bilalora.runtime import Dehazer, open_sink, open_source, process

    source = open_source(str(video))
    with Dehazer(model, threads=threads) as dehazer:
        cpu = time.process_time()
        report = process(source, open_sink(out, source), dehazer)
        cpu = time.process_time() - cpu
    return {"threads": threads, "frames": report.frames, "seconds": report.seconds, "fps": report.frames / report.seconds,
            "cpu_seconds_per_frame": cpu / max(1, report.frames)}  # fmt: skip


def _fleet(model: Path, video: Path, out: Path, workers: int, chunk_frames: int, address: str | None) -> dict:
    import ray
    from bilalora.runtime.manifest import Job
    from bilalora.runtime.ray import FleetOptions, run_fleet

    started = time.perf_counter()
    if address is None:
        ray.init(num_cpus=workers, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    else:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    cluster_s = time.perf_counter() - started
    try:
        options = FleetOptions(workers=workers, worker_cpus=1, chunk_frames=chunk_frames, dehazer={"threads": 1})
        record = run_fleet([Job(str(video), str(out))], str(model), options)
    finally:
        ray.shutdown()
    rows = record["ray"]["workers"]
    return {
        "workers": workers,
        "frames": record["frames"],
        "seconds": record["seconds"],
        "fps_wall": record["frames"] / record["seconds"],
        "fps_busy_sum": sum(r["fps_busy"] or 0.0 for r in rows),
        "items": record["ray"]["items"],
        "model_load_s": max(r["load_seconds"] for r in rows),
        "cluster_start_s": cluster_s,
        "per_worker": [{k: r[k] for k in ("worker", "frames", "items", "busy_seconds", "fps_busy")} for r in rows],
    }


def _latency(model: Path, size: tuple[int, int], runs: int, threads: int) -> dict:
    from bilalora.runtime import Dehazer

    height, width = size
    frame = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    with Dehazer(model, threads=threads) as dehazer:
        dehazer(frame)  # warm-up
        samples, cpu_samples = [], []
        for _ in range(runs):
            tick, cpu = time.perf_counter(), time.process_time()
            dehazer(frame)
            samples.append(1000.0 * (time.perf_counter() - tick))
            cpu_samples.append(1000.0 * (time.process_time() - cpu))
        info = dehazer.describe()
    ms, cpu_ms = statistics.median(samples), statistics.median(cpu_samples)
    frames_per_hour = 30 * 3600
    return {"frame": [height, width], "threads": threads, "runs": runs, "ms_p50": ms, "ms_all": samples,
            "cpu_ms_p50": cpu_ms, "cpu_ms_all": cpu_samples,
            "backend": info["backend"], "device": info["device"], "file": Path(info["file"]).name,
            # computed, not measured: one hour of 30 FPS video, one frame at a time at the measured latency
            "device_hours_per_video_hour_30fps": frames_per_hour * ms / 1000.0 / 3600.0,
            # for a CPU: processor time (all onnxruntime threads), which other load on a shared machine
            # inflates far less than wall time
            "cpu_core_hours_per_video_hour_30fps": frames_per_hour * cpu_ms / 1000.0 / 3600.0}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="export folder (default: export the shipped backbone)")
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    parser.add_argument("--address", help="an existing Ray cluster (default: a local one per row)")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--size", default="240x320", help="video frame size HxW")
    parser.add_argument("--chunk-frames", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2, help="runs per row (the median is reported)")
    parser.add_argument("--photos", type=Path, default=SHARED_PHOTOS)
    parser.add_argument("--latency-size", default="1080x1920", help="frame size for the cost figure (empty: skip)")
    parser.add_argument("--latency-runs", type=int, default=3)
    parser.add_argument("--latency-threads", type=int, default=1,
                        help="onnxruntime threads (0: its default); 1 keeps the CPU time free of its threads' spin-waiting")
    args = parser.parse_args()

    from bilalora.io import read_json, write_json
    from bilalora.parsing import parse_hw

    size = parse_hw(args.size, "--size")
    counts = [int(c) for c in args.workers.split(",")]
    work = Path(tempfile.mkdtemp(prefix="ray_scaling_"))
    load_before = os.getloadavg()
    try:
        model = args.model or _export(work / "export")
        model_record = read_json(model / "model.json") if (model / "model.json").is_file() else {}
        images, photos = _photos(args.photos, 16, size)
        video = _write_video(work / "in.mp4", images, args.frames)
        console.print(f"video: {args.frames} frames of {size[0]}x{size[1]} from {photos}")

        single = []
        for threads in (1, 2):
            runs = [_one_process(model, video, work / f"single_t{threads}.mp4", threads) for _ in range(args.repeats)]
            single.append({**runs[0], "fps": statistics.median(r["fps"] for r in runs), "fps_all": [r["fps"] for r in runs]})
            console.print(f"one process, {threads} thread(s): {single[-1]['fps']:.2f} FPS")
        reference = _decode(work / "single_t1.mp4")

        rows = []
        for count in counts:
            runs = []
            for repeat in range(args.repeats):
                out = work / f"ray_{count}_{repeat}.mp4"
                runs.append(_fleet(model, video, out, count, args.chunk_frames, args.address))
                frames = _decode(out)
                runs[-1]["identical"] = len(frames) == len(reference) and all(
                    np.array_equal(a, b) for a, b in zip(frames, reference)
                )
            row = dict(runs[0])
            for key in ("fps_wall", "fps_busy_sum", "seconds"):
                row[key] = statistics.median(r[key] for r in runs)
                row[f"{key}_all"] = [r[key] for r in runs]
            row["identical"] = all(r["identical"] for r in runs)
            rows.append(row)
            console.print(f"ray, {count} worker(s): {row['fps_wall']:.2f} FPS wall, {row['fps_busy_sum']:.2f} FPS busy "
                          f"(identical to one process: {row['identical']})")  # fmt: skip

        latency = None
        if args.latency_size:
            latency = _latency(model, parse_hw(args.latency_size, "--latency-size"), args.latency_runs, args.latency_threads)
            console.print(f"latency {args.latency_size}: {latency['ms_p50']:.0f} ms per frame, {latency['cpu_ms_p50']:.0f} ms "
                          f"of CPU ({latency['device']}) -> {latency['device_hours_per_video_hour_30fps']:.1f} device-hours, "
                          f"{latency['cpu_core_hours_per_video_hour_30fps']:.1f} CPU core-hours per hour of 30 FPS video")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)

    import onnxruntime
    import ray

    table = Table(title=f"ray_scaling: {args.frames} frames {args.size}")
    for column in ("run", "FPS (wall)", "FPS (busy, summed)", "speed-up (wall)", "identical"):
        table.add_column(column)
    base = rows[0]["fps_wall"] if rows else 1.0
    for entry in single:
        table.add_row(f"one process, {entry['threads']} thread(s)", f"{entry['fps']:.2f}", "", "", "reference")
    for row in rows:
        table.add_row(f"ray, {row['workers']} worker(s)", f"{row['fps_wall']:.2f}", f"{row['fps_busy_sum']:.2f}",
                      f"{row['fps_wall'] / base:.2f}x", str(row["identical"]))  # fmt: skip
    console.print(table)

    device = _cpu_name() if latency is None or latency["device"].lower().startswith("cpu") else latency["device"]
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")[:40]
    out = RESULTS / f"ray_scaling_{model_record.get('backbone', 'model')}_{slug}.json"
    write_json(out, {
        "benchmark": "ray_scaling",
        "date": time.strftime("%Y-%m-%d"),
        "device": device,
        "cpus": os.cpu_count(),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "versions": {"ray": ray.__version__, "onnxruntime": onnxruntime.__version__, "opencv": cv2.__version__},
        "backbone": model_record.get("backbone"),
        "weights": model_record.get("weights"),
        "video": {"frames": args.frames, "size": list(size), "codec": "mp4v", "source": photos},
        "chunk_frames": args.chunk_frames,
        "repeats": args.repeats,
        "address": args.address or "local cluster per row (num_cpus = workers)",
        "protocol": __doc__.split("\n\n", 2)[2].strip(),
        "one_process": single,
        "ray": rows,
        "latency": latency,
    })  # fmt: skip
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
