"""Why does a dehazing network paint dark blotches into dense, flat haze? Measure, do not guess.

    python benchmarks/blotch_probe.py --real DATA/real_day [--backbone dea-net-s] [--count 12] [--side 768]

Flat haze is where the hazy input is bright and nearly constant (sky, distant walls):
luma ``Y > 0.45`` and a local standard deviation of Y (15x15 window) below ``--flat-std``
(default 0.012, about 3 levels of 255). Inside that mask a dehazer should stay smooth: its output
may be darker or more contrasted overall, but should not grow new low-frequency structure.
Two numbers per output, inside the mask:

* ``local_std``: mean local standard deviation (15x15) of the output luma, in 8-bit levels;
* ``blotch_frac``: the share of mask pixels whose output luma (Gaussian-blurred, sigma 2) lies
  more than ``--dark`` (default 0.06) below the median of the output luma in a 41x41 window:
  dark patches standing out from their flat surroundings.

Experiments (each isolates one suspected cause):

1. **crop size** -- the network is trained on 128x128 crops and run on whole images. The same
   photos are run whole (``whole``), as independent 128x128 tiles (``tiles128``, what training
   saw; one forward per tile batch) and whole at half the size (``half``, upsampled back).
   If blotches came from the train/test size mismatch (the channel attention's global pooling,
   receptive field), ``tiles128`` would not have them. ``blur2`` runs the whole image after a
   Gaussian blur (sigma 2) of the input: if the network only amplified pixel noise and JPEG
   blocks, the blur would remove most blotches; what survives comes from coarser variation.
2. **gain on low-amplitude noise** -- flat synthetic haze ``I = J t + A (1 - t)`` (J a flat grey
   with a faint texture, A = 0.9) at t = 0.1, 0.2, 0.4, 512x512, clean, with Gaussian noise
   (sigma 1/255) and JPEG-compressed (quality 80). If the network amplifies the sensor noise and
   compression blocks of dense haze into blotches, the noisy/JPEG rows have them and the clean
   rows do not.
3. **training data** -- the share of flat-haze pixels in training crops (synth_train pairs and
   synthesised clean_outdoor crops) against real_day photos (same mask).

Writes ``benchmarks/results/blotch_probe_<backbone>.json`` and prints tables; ``--sheet FILE.jpg``
also draws input | whole | tiles128 | half for six of the photos (research-only photos: look at the
sheet, do not commit it).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from bilalora import backbones
from bilalora.baselines import dehaze_dcp
from bilalora.devices import cpu_name
from bilalora.images import downsize, list_images, load_image
from bilalora.io import write_json
from bilalora.padding import crop_to, pad_to_multiple

RESULTS = Path(__file__).resolve().parent / "results"
console = Console(highlight=False)
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


# --------------------------------------------------------------------------- measures


def _luma(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image @ LUMA, dtype=np.float32)


def _local_std(y: np.ndarray, window: int = 15) -> np.ndarray:
    mean = cv2.blur(y, (window, window), borderType=cv2.BORDER_REFLECT)
    sq = cv2.blur(y * y, (window, window), borderType=cv2.BORDER_REFLECT)
    return np.sqrt(np.maximum(sq - mean * mean, 0.0))


def flat_haze_mask(hazy: np.ndarray, flat_std: float = 0.012, bright: float = 0.45) -> np.ndarray:
    """Boolean (H, W): bright (luma > ``bright``) and flat (15x15 local std < ``flat_std``) input pixels."""
    y = _luma(hazy)
    return (y > bright) & (_local_std(y) < flat_std)


def blotch_stats(output: np.ndarray, mask: np.ndarray, dark: float = 0.06) -> dict:
    """``local_std`` (8-bit levels) and ``blotch_frac`` of ``output`` (H, W, 3) in [0, 1] inside ``mask``."""
    if not mask.any():
        return {"local_std": float("nan"), "blotch_frac": float("nan"), "mask_frac": 0.0}
    y = _luma(np.clip(output, 0, 1))
    smooth = cv2.GaussianBlur(y, (0, 0), 2.0)
    y8 = np.round(smooth * 255).astype(np.uint8)
    median = cv2.medianBlur(y8, 41).astype(np.float32) / 255.0
    blotch = smooth < median - dark
    return {
        "local_std": float(_local_std(y)[mask].mean() * 255),
        "blotch_frac": float(blotch[mask].mean()),
        "mask_frac": float(mask.mean()),
    }


# --------------------------------------------------------------------------- inference modes


@torch.no_grad()
def run_whole(model, image: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    x, size = pad_to_multiple(x, 4)
    return crop_to(model(x), size).clamp(0, 1)[0].numpy().transpose(1, 2, 0)


@torch.no_grad()
def run_tiles(model, image: np.ndarray, tile: int = 128) -> np.ndarray:
    """Independent ``tile`` x ``tile`` tiles (reflect-padded to a multiple), stitched without blending."""
    h, w = image.shape[:2]
    ph, pw = -h % tile, -w % tile
    padded = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect")
    rows, cols = padded.shape[0] // tile, padded.shape[1] // tile
    tiles = padded.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 4, 1, 3).reshape(-1, 3, tile, tile)
    out = torch.cat([model(torch.from_numpy(np.ascontiguousarray(b))) for b in np.array_split(tiles, max(1, len(tiles) // 16))])
    out = out.clamp(0, 1).numpy().reshape(rows, cols, 3, tile, tile).transpose(0, 3, 1, 4, 2)
    return out.reshape(rows * tile, cols * tile, 3)[:h, :w]


def run_half(model, image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    small = cv2.resize(image, (max(4, w // 2), max(4, h // 2)), interpolation=cv2.INTER_AREA)
    return np.clip(cv2.resize(run_whole(model, small), (w, h), interpolation=cv2.INTER_CUBIC), 0, 1)


# --------------------------------------------------------------------------- experiments


def _sheet(panels: list[tuple[str, np.ndarray]], height: int = 240) -> np.ndarray:
    """One labelled row (uint8 BGR) of equally tall panels."""
    row = []
    for label, panel in panels:
        width = max(1, round(panel.shape[1] * height / panel.shape[0]))
        thumb = cv2.resize(np.clip(panel, 0, 1), (width, height), interpolation=cv2.INTER_AREA)
        thumb = (thumb * 255).round().astype(np.uint8)[..., ::-1].copy()
        cv2.putText(thumb, label, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(thumb, label, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
        row += [thumb, np.full((height, 4, 3), 255, np.uint8)]
    return np.concatenate(row, axis=1)


def real_photos(model, folder: Path, count: int, side: int, flat_std: float, dark: float,
                sheet: Path | None = None, only: list[str] | None = None) -> dict:
    """Experiment 1 on the ``count`` photos of ``folder`` with the most flat haze (sheet: first 6 of them)."""
    candidates = []
    for path in list_images(folder):
        image = downsize(load_image(path), side)
        mask = flat_haze_mask(image, flat_std)
        candidates.append((float(mask.mean()), path, image, mask))
    candidates.sort(key=lambda c: -c[0])
    modes = {"input": lambda m, x: x, "whole": run_whole, "tiles128": run_tiles, "half": run_half,
             "dcp": lambda m, x: dehaze_dcp(x),
             "blur2": lambda m, x: run_whole(m, cv2.GaussianBlur(x, (0, 0), 2.0))}
    if only:
        modes = {name: fn for name, fn in modes.items() if name in only or name == "input"}
    rows, sheet_rows = [], []
    for share, path, image, mask in candidates[:count]:
        row = {"image": path.name, "hw": list(image.shape[:2]), "flat_share": share}
        outputs = {name: fn(model, image) for name, fn in modes.items()}
        for name, output in outputs.items():
            row[name] = blotch_stats(output, mask, dark)
        rows.append(row)
        if sheet is not None and len(sheet_rows) < 6:
            sheet_rows.append(_sheet([(f"{name} {path.stem[:18]}" if name == "input" else name, outputs[name])
                                      for name in ("input", "whole", "tiles128", "half") if name in outputs]))
    if sheet_rows:
        width = max(r.shape[1] for r in sheet_rows)
        sheet_rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in sheet_rows]
        sheet.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(sheet), np.concatenate(sheet_rows, axis=0), [cv2.IMWRITE_JPEG_QUALITY, 85])
    summary = {
        name: {
            "local_std": float(np.mean([r[name]["local_std"] for r in rows])),
            "blotch_frac": float(np.mean([r[name]["blotch_frac"] for r in rows])),
        }
        for name in modes
    }
    return {"images": rows, "mean": summary}


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255.0


def flat_synthetic(model, size: int, dark: float, seed: int = 0) -> list[dict]:
    """Experiment 2: flat haze at three densities, clean / noisy / JPEG, whole and 128 tiles."""
    rng = np.random.default_rng(seed)
    texture = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 6.0)
    texture = 0.02 * texture / texture.std()
    scene = np.clip(0.35 + texture, 0, 1)[..., None].repeat(3, axis=2)
    mask = np.ones((size, size), bool)
    rows = []
    for t in (0.1, 0.2, 0.4):
        hazy = (scene * t + 0.9 * (1 - t)).astype(np.float32)
        variants = {
            "clean": hazy,
            "noise1": np.clip(hazy + rng.normal(0, 1 / 255, hazy.shape), 0, 1).astype(np.float32),
            "jpeg80": _jpeg(hazy, 80),
        }
        for name, image in variants.items():
            rows.append({
                "t": t, "variant": name,
                "input": blotch_stats(image, mask, dark),
                "whole": blotch_stats(run_whole(model, image), mask, dark),
                "tiles128": blotch_stats(run_tiles(model, image), mask, dark),
            })
    return rows


def training_share(pairs: Path | None, clear: Path | None, real: Path, crops: int, flat_std: float) -> dict:
    """Experiment 3: share of flat-haze pixels in training crops vs real photos."""
    from bilalora.pairs import ClearFolder, PairedFolder

    out = {}
    rng = np.random.default_rng(0)
    if pairs is not None:
        folder = PairedFolder(pairs, flag="--pairs")
        shares = [flat_haze_mask(folder.sample(int(rng.integers(len(folder))), 128, rng)[0], flat_std).mean()
                  for _ in range(crops)]
        out["pairs_crops128"] = float(np.mean(shares))
    if clear is not None:
        folder = ClearFolder(clear)
        shares = [flat_haze_mask(folder.sample(int(rng.integers(len(folder))), 128, rng)[0], flat_std).mean()
                  for _ in range(crops)]
        out["synthesised_crops128"] = float(np.mean(shares))
    shares = [flat_haze_mask(downsize(load_image(p), 768), flat_std).mean() for p in list_images(real)]
    out["real_photos_768"] = float(np.mean(shares))
    return out


# --------------------------------------------------------------------------- main


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == columns[0] else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, required=True, help="folder of real hazy photos (e.g. real_day)")
    parser.add_argument("--backbone", default="dea-net-s")
    parser.add_argument("--weights", default=None, help="weights file (default: the backbone's shipped weights)")
    parser.add_argument("--count", type=int, default=12, help="photos with the most flat haze to probe")
    parser.add_argument("--side", type=int, default=768, help="longer side the photos are downsized to")
    parser.add_argument("--flat-std", type=float, default=0.012)
    parser.add_argument("--dark", type=float, default=0.06)
    parser.add_argument("--synthetic-size", type=int, default=512, help="side of the flat synthetic haze (0: skip)")
    parser.add_argument("--modes", default="", help="comma list of whole,tiles128,half,dcp,blur2 (default: all)")
    parser.add_argument("--pairs", type=Path, default=None, help="training pairs (experiment 3)")
    parser.add_argument("--clear", type=Path, default=None, help="clear photos used for synthesis (experiment 3)")
    parser.add_argument("--crops", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=None, help="record path (default: RESULTS/blotch_probe_BACKBONE.json)")
    parser.add_argument("--sheet", type=Path, default=None, help="contact sheet to draw (JPEG; not for committing)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    model = backbones.load(args.backbone, weights=args.weights)

    only = [m for m in args.modes.split(",") if m] or None
    real = real_photos(model, args.real, args.count, args.side, args.flat_std, args.dark, args.sheet, only)
    modes = list(real["mean"])
    _table(f"experiment 1: {args.count} photos of {args.real.name} with the most flat haze (mean in the mask)",
           ["mode", "local std (levels)", "blotch share"],
           [[m, f"{real['mean'][m]['local_std']:.2f}", f"{real['mean'][m]['blotch_frac']:.4f}"] for m in modes])
    synthetic = flat_synthetic(model, args.synthetic_size, args.dark) if args.synthetic_size else []
    if synthetic:
        _table("experiment 2: flat synthetic haze (A = 0.9), whole image", ["t / variant", "input std", "whole std",
               "tiles128 std", "whole blotch", "tiles128 blotch"],
               [[f"{r['t']} {r['variant']}", f"{r['input']['local_std']:.2f}", f"{r['whole']['local_std']:.2f}",
                 f"{r['tiles128']['local_std']:.2f}", f"{r['whole']['blotch_frac']:.4f}",
                 f"{r['tiles128']['blotch_frac']:.4f}"] for r in synthetic])
    share = training_share(args.pairs, args.clear, args.real, args.crops, args.flat_std)
    _table("experiment 3: share of flat-haze pixels", ["source", "share"], [[k, f"{v:.4f}"] for k, v in share.items()])

    record = {
        "benchmark": "blotch_probe",
        "backbone": args.backbone,
        "weights": str(args.weights or backbones.shipped_weights(args.backbone)),
        "definitions": {
            "flat_mask": f"input luma > 0.45 and 15x15 local std of luma < {args.flat_std}",
            "local_std": "mean 15x15 local std of the output luma inside the mask, 8-bit levels",
            "blotch_frac": f"share of mask pixels whose output luma (Gaussian sigma 2) is more than {args.dark} "
            "below the 41x41 median of the output luma",
        },
        "real": {"folder": str(args.real), "side": args.side, **real},
        "synthetic_flat": synthetic,
        "flat_share": share,
        "sheet": str(args.sheet) if args.sheet else None,
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "seconds": round(time.time() - started, 1),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = args.out or args.results / f"blotch_probe_{args.backbone}.json"
    write_json(out, record)
    console.print(f"[green]saved[/] {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
