"""Does adaptation move the model? LoRA learning rate sweep with one objective on real photos.

    python benchmarks/adapt_lr.py --images ../shared/data/real_day --lrs 1e-6,1e-4,1e-3 \\
        --epochs 6 --search-epochs 2 --batch 8 --crop 128

For each learning rate: a full bilevel run (search + top-k fine-tune) into a
temporary folder, then, on the validation half at full size (longest side
``--eval-side``): mean |adapted - base| output change, FADE, colourfulness and
mean brightness of base and adapted outputs (and of the hazy input). Prints a
table, writes ``benchmarks/results/adapt_lr_<objective>.json`` and a contact
sheet PNG (input | base | adapted per learning rate) for looking at the images.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from bilalora import backbones
from bilalora.adapt import AdaptConfig, adapt
from bilalora.adapter import Adapter
from bilalora.data import load_image
from bilalora.metrics import colourfulness, fade, mean_brightness
from bilalora.metrics.fade import to_uint8_rgb
from bilalora.objectives import build_objective
from bilalora.padding import crop_to, pad_to_multiple
from bilalora.runs import read_split

RESULTS = Path(__file__).parent / "results"


def _resize(image: np.ndarray, side: int) -> np.ndarray:
    scale = side / max(image.shape[:2])
    if scale >= 1:
        return image
    size = (max(4, round(image.shape[1] * scale)), max(4, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


@torch.no_grad()
def _dehaze(model, image: np.ndarray) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    padded, size = pad_to_multiple(tensor, 4)
    return crop_to(model(padded), size)[0].clamp(0, 1).numpy().transpose(1, 2, 0)


def _scores(images: list[np.ndarray]) -> dict:
    u8 = [to_uint8_rgb(im) for im in images]
    return {
        "fade": float(np.nanmean([fade(im) for im in u8])),
        "colourfulness": float(np.mean([colourfulness(im) for im in u8])),
        "brightness": float(np.mean([mean_brightness(im) for im in u8])),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True)
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--objective", default="prior")
    parser.add_argument("--lrs", default="1e-6,1e-4,1e-3")
    parser.add_argument("--gate-lr", type=float, default=3e-4)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--search-epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--eval-side", type=int, default=384)
    parser.add_argument("--sheet-images", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    args = parser.parse_args(argv)
    backbone = args.backbone or backbones.default_backbone()
    lrs = [float(x) for x in args.lrs.split(",")]
    objective = build_objective(args.objective)
    def load():
        torch.manual_seed(args.seed)  # identical bases even with --weights random
        return backbones.load(backbone, weights=args.weights)

    base = load().eval()
    record = {"backbone": backbone, "weights": base.bilalora_info["weights"], "objective": objective.describe(),
              "images": args.images, "device": f"CPU {platform.machine()} x{torch.get_num_threads()} threads",
              "schedule": {k: getattr(args, k) for k in ("epochs", "search_epochs", "batch", "crop", "gate_lr",
                                                         "max_side", "eval_side", "seed")},
              "runs": []}
    sheet_rows = None
    base_outputs = None
    with tempfile.TemporaryDirectory() as tmp:
        for lr in lrs:
            config = AdaptConfig(epochs=args.epochs, search_epochs=args.search_epochs, batch=args.batch,
                                 crop=args.crop, seed=args.seed, max_side=args.max_side, workers=1,
                                 checkpoint_every=0, test_fraction=0.0)  # the sweep's 50/50 split
            config.optim.lr = lr
            config.optim.gate_lr = args.gate_lr
            model = load()
            started = time.time()
            result = adapt(model, args.images, objective, config, Path(tmp) / f"lr{lr:g}")
            seconds = time.time() - started
            val = [_resize(load_image(p), args.eval_side) for p in read_split(Path(tmp) / f"lr{lr:g}")["val"]]
            adapted = Adapter.load(result.artefact).merge_into(load()).eval()
            if base_outputs is None:
                base_outputs = [_dehaze(base, im) for im in val]
                record["hazy"] = _scores(val)
                record["base"] = _scores(base_outputs)
                sheet_rows = [[im, out] for im, out in zip(val[: args.sheet_images], base_outputs)]
            outputs = [_dehaze(adapted, im) for im in val]
            change = float(np.mean([np.abs(a - b).mean() for a, b in zip(outputs, base_outputs)]))
            run = {"lr": lr, "seconds": round(seconds, 1), "selected": result.summary["selected"],
                   "ranking": result.summary["ranking"][:6], "movement_crops": result.summary["movement"],
                   "mean_abs_change_full_images": change, **_scores(outputs)}
            record["runs"].append(run)
            for row, out in zip(sheet_rows, outputs):
                row.append(out)
            print(f"lr {lr:g}: change {change:.4f}  FADE {run['fade']:.3f}  colourfulness "
                  f"{run['colourfulness']:.1f}  brightness {run['brightness']:.3f}  ({seconds:.0f} s)")
    print(f"hazy: FADE {record['hazy']['fade']:.3f}; base: FADE {record['base']['fade']:.3f}, colourfulness "
          f"{record['base']['colourfulness']:.1f}, brightness {record['base']['brightness']:.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"adapt_lr_{args.objective.replace('+', '_').replace(':', '')}{args.tag}"
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    height = 160
    rows = []
    for row in sheet_rows:
        tiles = [cv2.resize(to_uint8_rgb(im), (round(im.shape[1] * height / im.shape[0]), height)) for im in row]
        rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
    cv2.imwrite(str(RESULTS / f"{name}.png"), sheet[..., ::-1])
    print(f"saved {RESULTS / name}.json and .png (columns: hazy, base, then lr {', '.join(map(str, lrs))})")
    return record


if __name__ == "__main__":
    main()
