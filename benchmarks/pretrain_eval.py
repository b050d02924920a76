"""Evaluate pretrained dehazing weights against DCP on a paired folder; optional real-haze contact sheet.

    python benchmarks/pretrain_eval.py --weights bilalora/weights/dea-net.safetensors \
        --pairs DATA/synth_test [--real DATA/real_day] [--update-card]

Both methods see the same whole images (the network's input is reflect-padded to a
multiple of 4 and cropped back); PSNR/SSIM as in :mod:`bilalora.metrics.reference`
(outputs clamped to [0, 1], SSIM with an 11x11 Gaussian window over RGB).
Prints a table and writes ``benchmarks/results/pretrain_eval_<weights stem>.json``;
``--real DIR`` also writes ``benchmarks/results/real_day_sheet_<weights stem>.jpg``
(input | DCP | model for 12 images); ``--update-card`` adds the numbers to the
weights' JSON card (the ``evaluation`` key).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from bilalora import backbones
from bilalora.adapter import fingerprint
from bilalora.baselines import dehaze_dcp
from bilalora.devices import cpu_name
from bilalora.images import list_images, load_image
from bilalora.io import read_json, write_json
from bilalora.padding import crop_to, pad_to_multiple
from bilalora.pairs import PairedFolder
from bilalora.validation import evaluate_pairs

RESULTS = Path(__file__).resolve().parent / "results"
console = Console(highlight=False)


@torch.no_grad()
def run_model(model: torch.nn.Module, image: np.ndarray, device: str) -> np.ndarray:
    """(H, W, 3) float32 [0, 1] -> dehazed (H, W, 3) float32 [0, 1]."""
    x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None].to(device)
    x, size = pad_to_multiple(x, 4)
    out = crop_to(model(x), size).clamp(0, 1)[0].cpu().numpy().transpose(1, 2, 0)
    return np.ascontiguousarray(out, dtype=np.float32)


def contact_sheet(model, folder: Path, out: Path, device: str, count: int = 12, height: int = 210) -> list[str]:
    """Write a JPEG grid of ``count`` images (input | DCP | model), 2 triplets per row. Returns the names."""
    paths = list_images(folder)
    picks = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, count).round()]
    tiles = []
    for path in picks:
        image = load_image(path)
        scale = min(1.0, 1024 / max(image.shape[:2]))
        if scale < 1:
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        panels = [image, dehaze_dcp(image), run_model(model, image, device)]
        width = max(1, round(image.shape[1] * height / image.shape[0]))
        width = min(width, int(height * 1.6))
        row = []
        for label, panel in zip(("input", "DCP", "model"), panels):
            thumb = cv2.resize(panel, (width, height), interpolation=cv2.INTER_AREA)
            thumb = (np.clip(thumb, 0, 1) * 255).round().astype(np.uint8)[..., ::-1].copy()
            cv2.putText(thumb, label, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 3, cv2.LINE_AA)
            cv2.putText(thumb, label, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
            row.append(thumb)
        tiles.append(np.concatenate(row + [np.full((height, 6, 3), 255, np.uint8)], axis=1))
    tile_width = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, 4), (0, tile_width - t.shape[1]), (0, 0)), constant_values=255) for t in tiles]
    rows = [np.concatenate(tiles[i : i + 2], axis=1) for i in range(0, len(tiles), 2)]
    sheet = np.concatenate(rows, axis=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), sheet, [cv2.IMWRITE_JPEG_QUALITY, 88])
    return [p.name for p in picks]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--weights", required=True, type=Path, help="plain .safetensors (a JSON card beside it is read)"
    )
    parser.add_argument("--backbone", default=None, help="registry name (default: from the card, else dea-net)")
    parser.add_argument("--pairs", type=Path, required=True, help="paired folder (hazy/ + clear/), e.g. synth_test")
    parser.add_argument("--real", type=Path, default=None, help="folder of real hazy photos for the contact sheet")
    parser.add_argument("--sheet-count", type=int, default=12)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--update-card", action="store_true", help="write the numbers into the weights' card")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    card_path = args.weights.with_suffix(".json")
    card = read_json(card_path) if card_path.is_file() else {}
    backbone = args.backbone or card.get("backbone") or "dea-net"
    model = backbones.load(backbone, weights=args.weights).to(args.device)
    weights_fp = fingerprint(model)
    if card.get("fingerprint") and card["fingerprint"] != weights_fp:
        console.print(f"[yellow]warning[/]: card fingerprint {card['fingerprint']} != weights {weights_fp}")
    pairs = PairedFolder(args.pairs, flag="--pairs")
    console.print(
        f"evaluating {args.weights} ({backbone}, fingerprint {weights_fp}) on {len(pairs)} pairs of {args.pairs}"
    )

    started = time.time()
    model_scores = evaluate_pairs(model, pairs, args.device, crop=0)
    model_seconds = time.time() - started
    started = time.time()
    dcp_scores = evaluate_pairs(None, pairs, dehaze=dehaze_dcp)
    dcp_seconds = time.time() - started

    table = Table(title=f"{args.pairs.name}: {len(pairs)} pairs, whole images")
    for column in ("method", "PSNR (dB)", "SSIM", "seconds"):
        table.add_column(column, justify="left" if column == "method" else "right")
    table.add_row(
        f"{backbone} ({args.weights.name})",
        f"{model_scores['psnr']:.2f}",
        f"{model_scores['ssim']:.4f}",
        f"{model_seconds:.1f}",
    )
    table.add_row(
        "DCP (bilalora.baselines.dcp)", f"{dcp_scores['psnr']:.2f}", f"{dcp_scores['ssim']:.4f}", f"{dcp_seconds:.1f}"
    )
    console.print(table)
    delta = model_scores["psnr"] - dcp_scores["psnr"]
    console.print(
        f"model - DCP: {delta:+.2f} dB PSNR, {model_scores['ssim'] - dcp_scores['ssim']:+.4f} SSIM "
        f"(acceptance: >= +6 dB: {'met' if delta >= 6 else 'NOT met'})"
    )

    record = {
        "benchmark": "pretrain_eval",
        "weights": str(args.weights),
        "backbone": backbone,
        "fingerprint": weights_fp,
        "pairs": str(args.pairs),
        "n_pairs": len(pairs),
        "protocol": "whole images, network input reflect-padded to a multiple of 4; outputs clamped to [0, 1]; "
        "PSNR per image then averaged; SSIM 11x11 Gaussian (sigma 1.5) over RGB",
        "model": {**model_scores, "seconds": round(model_seconds, 1)},
        "dcp": {**dcp_scores, "seconds": round(dcp_seconds, 1), "params": "patch 15, omega 0.95, t0 0.1, guided r 60"},
        "delta_psnr_db": delta,
        "delta_ssim": model_scores["ssim"] - dcp_scores["ssim"],
        "acceptance_6db_met": bool(delta >= 6),
        "device": args.device,
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "training": {k: card.get(k) for k in ("steps_done", "selected")} if card else None,
    }
    if args.real is not None:
        sheet = args.results / f"real_day_sheet_{args.weights.stem}.jpg"
        record["contact_sheet"] = {
            "file": sheet.name,
            "images": contact_sheet(model, args.real, sheet, args.device, args.sheet_count),
        }
        console.print(f"contact sheet: {sheet}")
    out = args.results / f"pretrain_eval_{args.weights.stem}.json"
    write_json(out, record)
    console.print(f"[green]saved[/] {out}")
    if args.update_card and card:
        card["evaluation"] = {
            args.pairs.name: {
                "n_pairs": len(pairs),
                "protocol": record["protocol"],
                "model": {"psnr": model_scores["psnr"], "ssim": model_scores["ssim"]},
                "dcp": {"psnr": dcp_scores["psnr"], "ssim": dcp_scores["ssim"]},
                "delta_psnr_db": delta,
                "record": f"benchmarks/results/{out.name}",
            }
        }
        write_json(card_path, card)
        console.print(f"updated card {card_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
