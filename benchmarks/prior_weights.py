"""Check that the Prior objective's weights rank dehazed images above hazy and degenerate ones.

For every real hazy image I in ``--images``, score these candidate outputs with
``Prior(...)(output, I)`` (lower is better):

    hazy         the input itself (no dehazing)
    dcp          dark channel prior dehazing (bilalora.baselines.dcp) -- the reference
    black        all zeros
    washed       all 0.95
    washed_blend 0.4 * dcp + 0.6 * 0.95 (low-contrast, bright)
    blurred      dcp with a Gaussian blur (sigma 3)
    colour_cast  dcp with its existing cast amplified: the channel with the highest
                 mean times 1.15, the lowest times 0.85, clipped
    dim          0.4 * dcp (under-exposed)
    hue_swap     dcp with its chroma negated: 2 * lum(dcp) - dcp, clipped
    oversat      dcp with its chroma tripled: lum + 3 * (dcp - lum), clipped

and report, per candidate, the mean of each term and the fraction of images on
which ``dcp`` scores strictly better. Writes ``--out`` (JSON) and prints a table.

``--fit K`` also trains, on each of K images (every n-th), a small residual CNN
(3 convs, identity at start) for ``--fit-steps`` Adam steps on the Prior alone
and reports FADE, mean brightness, average gradient and colourfulness of the
result next to the hazy input and DCP: a check that minimising the Prior gives a
dehazed image and not an exploit of it (CPU: about a minute per image at 160 px).

    python benchmarks/prior_weights.py --images ../shared/data/real_day [--fit 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from bilalora.baselines.dcp import dehaze_dcp
from bilalora.io import write_json
from bilalora.objectives.prior import Prior

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
CANDIDATES = ("hazy", "dcp", "black", "washed", "washed_blend", "blurred", "colour_cast", "dim", "hue_swap",
              "oversat")


def load_images(folder: Path, max_side: int) -> list[tuple[str, np.ndarray]]:
    images = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in SUFFIXES:
            continue
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            print(f"skipped unreadable {path}", file=sys.stderr)
            continue
        h, w = bgr.shape[:2]
        scale = max_side / max(h, w)
        if scale < 1:
            bgr = cv2.resize(bgr, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        images.append((path.name, bgr[..., ::-1].astype(np.float32) / 255.0))
    return images


def _cast_gains(image: np.ndarray) -> np.ndarray:
    means = image.reshape(-1, 3).mean(axis=0)
    gains = np.ones(3, dtype=np.float32)
    gains[int(np.argmax(means))] = 1.15
    gains[int(np.argmin(means))] = 0.85
    return gains


def candidates(hazy: np.ndarray) -> dict[str, np.ndarray]:
    dcp = dehaze_dcp(hazy)
    lum = dcp.mean(axis=2, keepdims=True)
    out = {
        "hazy": hazy,
        "dcp": dcp,
        "black": np.zeros_like(hazy),
        "washed": np.full_like(hazy, 0.95),
        "washed_blend": 0.4 * dcp + 0.6 * 0.95,
        "blurred": cv2.GaussianBlur(dcp, (0, 0), 3.0),
        "colour_cast": np.clip(dcp * _cast_gains(dcp), 0, 1),
        "dim": 0.4 * dcp,
        "hue_swap": np.clip(2 * lum - dcp, 0, 1),
        "oversat": np.clip(lum + 3 * (dcp - lum), 0, 1),
    }
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)


def raw_terms(prior: Prior, pairs) -> dict[str, dict[str, np.ndarray]]:
    """{candidate: {term: (n_images,) array}} of the unweighted terms, for (hazy, candidates) pairs."""
    table = {c: {} for c in CANDIDATES}  # only the terms the prior computes (a weight-0 optional term is not)
    for hazy, outputs in pairs:
        x = to_tensor(hazy)
        for cand, image in outputs.items():
            with torch.no_grad():
                terms = prior.terms(to_tensor(image), x)
            for t, v in terms.items():
                table[cand].setdefault(t, []).append(float(v))
    return {c: {t: np.array(v) for t, v in d.items()} for c, d in table.items()}


def rank(prior: Prior, pairs, label: str) -> tuple[dict, dict]:
    """Print a table for ``prior``; return (rows per candidate, per-image totals)."""
    terms = raw_terms(prior, pairs)
    weights = {t: prior.weights[f"{t}_weight"] for t in terms[CANDIDATES[0]]}
    totals = {c: sum(weights[t] * terms[c][t] for t in weights) for c in CANDIDATES}
    print(f"\n{label}: {prior.describe()}")
    print(f"{'candidate':<13}" + "".join(f"{t:>10}" for t in weights) + f"{'total':>10}{'dcp wins':>10}")
    rows = {}
    for cand in CANDIDATES:
        wins = float(np.mean(totals["dcp"] < totals[cand])) if cand != "dcp" else None
        rows[cand] = {**{t: float(terms[cand][t].mean()) for t in weights},
                      "total": float(totals[cand].mean()), "dcp_better_fraction": wins}
        print(f"{cand:<13}" + "".join(f"{rows[cand][t]:>10.4f}" for t in weights)
              + f"{rows[cand]['total']:>10.4f}" + (f"{wins:>10.2f}" if wins is not None else f"{'-':>10}"))
    return rows, totals


def fit_check(images, count: int, steps: int, side: int = 160) -> list[dict]:
    """Minimise the default Prior with a tiny residual CNN per image; measure the result."""
    from torch import nn

    from bilalora.metrics import average_gradient, colourfulness, fade, mean_brightness

    def measure(image: np.ndarray) -> dict:
        return {"fade": fade(image), "brightness": mean_brightness(image),
                "avg_gradient": average_gradient(image), "colourfulness": colourfulness(image)}

    picked = images[:: max(1, len(images) // max(1, count))][:count]
    records = []
    print(f"\nfit check: tiny residual CNN, {steps} Adam steps (lr 2e-3) on the default Prior, max side {side}")
    print(f"{'image':<28}{'':>6}{'FADE':>8}{'bright':>8}{'grad':>8}{'colour':>8}")
    for name, hazy in picked:
        h, w = hazy.shape[:2]
        scale = min(1.0, side / max(h, w))
        small = cv2.resize(hazy, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        torch.manual_seed(0)
        body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 3, 3, padding=1))
        nn.init.zeros_(body[-1].weight)
        nn.init.zeros_(body[-1].bias)
        prior, x = Prior(), to_tensor(small)
        optimiser = torch.optim.Adam(body.parameters(), lr=2e-3)
        for _ in range(steps):
            loss = prior(x + body(x), x)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            fitted = (x + body(x)).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        rec = {"image": name, "hazy": measure(small), "prior_fit": measure(fitted),
               "dcp": measure(dehaze_dcp(small)), "terms": prior.last_terms}
        records.append(rec)
        for label in ("hazy", "prior_fit", "dcp"):
            m = rec[label]
            print(f"{name[:27]:<28}{label[:6]:>6}{m['fade']:>8.3f}{m['brightness']:>8.3f}"
                  f"{m['avg_gradient']:>8.2f}{m['colourfulness']:>8.1f}")
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of real hazy images")
    parser.add_argument("--max-side", type=int, default=384, help="resize so the longer side is at most this")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--fit", type=int, default=0, help="also run the fit check on this many images")
    parser.add_argument("--fit-steps", type=int, default=120, help="Adam steps per image in the fit check")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prior_weights.json")
    args = parser.parse_args(argv)
    if not args.images.is_dir():
        print(f"--images: no such folder {args.images}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, args.threads))
    start = time.time()
    images = load_images(args.images, args.max_side)
    if not images:
        print(f"--images: no readable images in {args.images}", file=sys.stderr)
        return 2
    pairs = [(hazy, candidates(hazy)) for _, hazy in images]
    print(f"{len(images)} images from {args.images} (max side {args.max_side}); lower is better; "
          "'dcp wins' = fraction of images where DCP's output scores strictly lower")
    default = Prior()
    rows, totals = rank(default, pairs, "default weights")
    fixed = Prior(exposure_relative=0)
    fixed_rows, _ = rank(fixed, pairs, "same weights, fixed exposure target E=0.6 (Zero-DCE)")
    record = {
        "images": str(args.images),
        "count": len(images),
        "max_side": args.max_side,
        "prior": default.describe(),
        "candidates": rows,
        "per_image_total": {c: totals[c].round(6).tolist() for c in CANDIDATES},
        "names": [name for name, _ in images],
        "fixed_exposure": {"prior": fixed.describe(), "candidates": fixed_rows},
        "fit_check": fit_check(images, args.fit, args.fit_steps) if args.fit > 0 else None,
        "seconds": round(time.time() - start, 2),
    }
    write_json(args.out, record)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
