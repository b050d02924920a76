"""Does adaptation help on photos it never saw? Adapt each base on real hazy photos, score the held-out split.

    python benchmarks/adapt_eval.py                                  # dea-net-s (+ dea-net-s-synthetic), day + night
    python benchmarks/adapt_eval.py --bases dea-net-s --sets day --adapt-args "--steps 60 --search-steps 20 --batch 8"
    python benchmarks/adapt_eval.py --sets day --objective "prior(colour=0)" --score val --out ...   # tuning

``--score val`` scores the validation half instead of the test split: that is where
objective settings are chosen (the gates saw those photos, the LoRA weights did not),
so the test split stays held out for the final figures.

For every base (registered backbones only; a missing one is recorded as skipped) and
every set (``day``: real_day; ``night``: real_night, adapted with ``--night``):

1. ``bilalora adapt --images SET --backbone BASE --objective prior`` (the CLI, as a user
   runs it; ``--adapt-args`` appends flags, e.g. a reduced schedule on a busy CPU). adapt
   keeps a held-out ``test`` split (``split.json``) that neither level sees;
2. :func:`bilalora.bench.run_bench` on that test split: the base, the adapted network,
   the base followed by a 1-99 % contrast stretch (per channel and global), and the
   dark channel prior; FADE, entropy, dark-channel density, colourfulness, average
   gradient, brightness (built-in) and PIQE (pyiqa); per-image win rates against the
   base and against both stretch rows;
3. the targets of the method issue, each with its value and whether it is met: mean
   FADE at least 20 % (shipped base) / 30 % (synthetic-haze base) below the base's and
   below the base+stretch row's; entropy and PIQE no worse than base+stretch by more
   than 2 %; FADE better than the base on at least 80 % of the held-out images.

Writes ``benchmarks/results/adapt_eval.json`` (or ``--out``): image names only (the
photos and contact sheets stay in ``--workdir``, they are research-only).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DATA = REPO.parent / "shared" / "data"
SETS = {"day": ("real_day", []), "night": ("real_night", ["--night"])}
METRICS = ("fade", "entropy", "dcd", "colourfulness", "ag", "brightness")
#: Required mean-FADE reduction against the base, per base (the method issue's targets).
FADE_TARGET = {"dea-net-s": 0.20, "dea-net-s-synthetic": 0.30}


def _relative(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    if value is None or reference in (None, 0):
        return None
    return (value - reference) / abs(reference)


def targets(quality: dict[str, Any], base: str) -> dict[str, dict[str, Any]]:
    """The method issue's acceptance checks on a bench "quality" record (value, target, met)."""
    mean = quality["mean"]
    adapted, plain, stretch = mean.get("adapted", {}), mean.get("base", {}), mean.get("base+stretch", {})
    need = FADE_TARGET.get(base, 0.20)
    checks: dict[str, dict[str, Any]] = {}
    change = _relative(adapted.get("fade"), plain.get("fade"))
    checks["fade_vs_base"] = {"value": change, "target": -need, "met": change is not None and change <= -need}
    if stretch:
        gap = _relative(adapted.get("fade"), stretch.get("fade"))
        checks["fade_below_base+stretch"] = {"value": gap, "target": 0.0, "met": gap is not None and gap < 0}
        for metric, sign in (("entropy", 1.0), ("piqe", -1.0)):  # entropy: higher is better; PIQE: lower
            if metric not in adapted:
                continue
            worse = _relative(adapted.get(metric), stretch.get(metric))
            worse = None if worse is None else -sign * worse
            met = worse is not None and worse <= 0.02
            checks[f"{metric}_vs_base+stretch"] = {"value": worse, "target": 0.02, "met": met}
    share = (quality.get("wins_vs_base") or {}).get("adapted", {}).get("fade")
    checks["fade_wins_vs_base"] = {"value": share, "target": 0.80, "met": share is not None and share >= 0.80}
    return checks


def adapt(images: Path, base: str, extra: list[str], run: Path, log: Path, objective: str = "prior") -> dict[str, Any]:
    """Run ``bilalora adapt`` (a subprocess, as a user would) into ``run``; returns what it took."""
    command = [sys.executable, "-m", "bilalora.cli.app", "adapt", "--images", str(images), "--backbone", base,
               "--objective", objective, "--out", str(run), *extra]  # fmt: skip
    print("$", shlex.join(command), flush=True)
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "160"})
    seconds = round(time.perf_counter() - started, 1)
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"adapt failed (exit {done.returncode}); {log}:\n" + "\n".join(tail))
    return {"command": shlex.join(command[1:]), "seconds": seconds}


def split_folder(run: Path, split: str) -> Path:
    """A folder of links to the run's ``split`` images (``val``), for bench's ``--images``."""
    from bilalora.runs import read_split

    folder = run / f"{split}_images"
    folder.mkdir(exist_ok=True)
    for path in read_split(run)[split]:
        link = folder / Path(path).name
        if not link.exists():
            link.symlink_to(Path(path).resolve())
    return folder


def evaluate(run: Path, base: str, max_side: int, threads: int, iqa: list[str], dcp: bool,
             score: str = "test") -> dict[str, Any]:
    """bench on the run's held-out split (or ``score="val"``): the "quality" and "images" records."""
    from bilalora.bench import BenchOptions, run_bench

    images = None if score == "test" else split_folder(run, score)
    options = BenchOptions(adapters=[run / "adapter.safetensors"], backbone=base, max_side=max_side, metrics=METRICS,
                           iqa=iqa, dcp=dcp, stretch=True, backends=[], threads=threads,
                           report=run / ("bench" if score == "test" else f"bench_{score}"), sheet=8,
                           images=images)  # fmt: skip
    result = run_bench(options)
    record = result.record
    quality = dict(record["quality"])
    quality.pop("per_image")  # kept in the run's bench.json; the summary keeps the per-image FADE only
    per_image = {name: {row: scores.get("fade") for row, scores in rows.items()}
                 for name, rows in record["quality"]["per_image"].items()}  # fmt: skip
    images = {k: v for k, v in record["images"].items() if k != "scored"}
    images["names"] = [i["name"] for i in record["images"]["scored"]]
    return {"quality": quality, "fade_per_image": per_image, "images": images,
            "bench": str(result.record_path), "sheet": record.get("sheet"), "figure": record.get("figure")}  # fmt: skip


def _summary(run: Path) -> dict[str, Any]:
    path = run / "summary.json"
    if not path.is_file():
        return {}
    summary = json.loads(path.read_text(encoding="utf-8"))
    keep = ("backbone", "weights", "base_fingerprint", "method", "objective", "schedule", "schedule_preset",
            "selected", "data", "precision", "device", "movement", "stages")  # fmt: skip
    return {k: summary[k] for k in keep if k in summary}


def _print_table(entry: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    quality = entry["eval"]["quality"]
    metrics = list(quality["metrics"])
    table = Table(title=f"{entry['base']} on {entry['set']}, {entry.get('scored', 'test')} split ({entry['eval']['images']['count']} images)",
                  title_justify="left")  # fmt: skip
    table.add_column("row")
    for metric in metrics:
        table.add_column(metric, justify="right")
    for row, values in quality["mean"].items():
        table.add_row(row, *[f"{values[m]:.3f}" if values.get(m) is not None else "-" for m in metrics])
    wins = quality.get("wins_vs_base", {}).get("adapted", {})
    table.add_row("adapted wins vs base", *[f"{100 * wins[m]:.0f}%" if m in wins else "" for m in metrics])
    wins = quality.get("wins_vs_base+stretch", {}).get("adapted", {})
    table.add_row("adapted wins vs base+stretch", *[f"{100 * wins[m]:.0f}%" if m in wins else "" for m in metrics])
    Console().print(table)
    for name, check in entry["targets"].items():
        value = "n/a" if check["value"] is None else f"{check['value']:+.3f}"
        print(f"  {name}: {value} (target {check['target']:+.2f}) {'met' if check['met'] else 'NOT met'}")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", default="dea-net-s,dea-net-s-synthetic", help="registered backbones")
    parser.add_argument("--sets", default="day,night", help="day (real_day), night (real_night, --night)")
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding real_day/ and real_night/")
    parser.add_argument("--objective", default="prior", help="bilalora adapt --objective (e.g. prior(colour=0))")
    parser.add_argument("--score", choices=("test", "val"), default="test",
                        help="test: the held-out split (final figures); val: the validation half (tuning)")
    parser.add_argument("--adapt-args", default="", help="extra flags for bilalora adapt (e.g. a reduced schedule)")
    parser.add_argument("--max-side", type=int, default=768, help="score images at this longer side")
    parser.add_argument("--iqa", default="piqe", help="pyiqa metrics (comma-separated; empty: none)")
    parser.add_argument("--no-dcp", action="store_true", help="leave out the dark channel prior row")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the scoring (0: default)")
    parser.add_argument("--workdir", type=Path, default=Path("runs") / "adapt_eval")
    parser.add_argument("--reuse", action="store_true", help="score existing runs in --workdir instead of adapting")
    parser.add_argument("--run", type=Path, default=None, help="score this finished adapt run (one base, one set)")
    parser.add_argument("--out", type=Path, default=RESULTS / "adapt_eval.json")
    args = parser.parse_args(argv)

    from bilalora import backbones
    from bilalora.devices import cpu_name
    from bilalora.io import write_json
    from bilalora.parsing import parse_list

    registered = {spec.name for spec in backbones.list_backbones()}
    if args.run is not None and (len(parse_list(args.bases) or []) != 1 or len(parse_list(args.sets) or []) != 1):
        parser.error("--run scores one run: give one --bases and one --sets")
    extra = shlex.split(args.adapt_args)
    record: dict[str, Any] = {
        "what": "adapt on train/val, score the held-out test split (bilalora adapt + bench)",
        "machine": f"{cpu_name()} ({os.cpu_count()} CPUs)",
        "objective": args.objective,
        "scored_split": args.score,
        "adapt_args": extra,
        "max_side": args.max_side,
        "results": [],
    }
    args.workdir.mkdir(parents=True, exist_ok=True)
    for base in parse_list(args.bases) or []:
        for name in parse_list(args.sets) or []:
            folder, flags = SETS[name]
            entry: dict[str, Any] = {"base": base, "set": name, "images": folder, "scored": args.score}
            if base not in registered:
                entry["status"] = f"skipped: {base} is not a registered backbone"
                record["results"].append(entry)
                print(entry["status"])
                continue
            run = args.run or args.workdir / f"{base}_{name}"
            try:
                if not args.reuse and args.run is None:
                    log = args.workdir / f"{base}_{name}.log"
                    entry["adapt"] = adapt(args.data / folder, base, flags + extra, run, log, args.objective)
                entry["run"] = _summary(run)
                entry["eval"] = evaluate(run, base, args.max_side, args.threads, parse_list(args.iqa) or [],
                                         not args.no_dcp, args.score)  # fmt: skip
                entry["targets"] = targets(entry["eval"]["quality"], base)
                entry["status"] = "ok"
                _print_table(entry)
            except Exception as exc:  # noqa: BLE001 - record the failure, go on with the next pair
                entry["status"] = f"failed: {type(exc).__name__}: {exc}"
                print(entry["status"])
            record["results"].append(entry)
            write_json(args.out, record)  # after every pair: a long run keeps what it measured
    write_json(args.out, record)
    print(f"saved {args.out}")
    return record


if __name__ == "__main__":
    main()
