"""Build ``.carry/pretrain/``: the pretraining data for a lent GPU, under the 64 MiB carry limit.

    python benchmarks/prepare_gpu_pretrain.py [--shared ../shared/data] [--outdoor 120] [--val 10] [--budget-mib 40]
    # then: run(command="bash benchmarks/gpu_pretrain.sh", carry=[".carry"], timeout_s=560)
    # (benchmarks/gpu_session.sh --prepare calls it with the budget left beside real_day and the repository)

What goes in (sizes for the shared data of this project):

* ``synth_train/hazy``: all 450 hazy SOTS-indoor training images (22 MB), unchanged.
* ``synth_train/clear``: the 45 distinct clear images (2.8 MB), named by scene
  (``sots_in_1400.jpg``); the shared folder holds each one 10 times under the hazy
  stems, and the pairing falls back to the RESIDE rule (stem before the last ``_``).
* ``clean_outdoor/rgb``: the first ``--outdoor`` clear outdoor photos, unchanged, as many as
  fit in ``--budget-mib`` after everything else.
* ``val``: ``--val`` synth_test pairs (PNG, lossless; the full 50-pair evaluation runs
  on the CPU afterwards with ``benchmarks/pretrain_eval.py``).
* ``work/last.pt``: copied from ``--resume-from`` (a previous call's ``$OUT/work/last.pt``).

Prints the total size and refuses to go over the limit (64 MiB, or ``--budget-mib``).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

LIMIT = 64 * 2**20
REPO = Path(__file__).resolve().parents[1]


def _copy(source: Path, target: Path) -> int:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)
    return target.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--outdoor", type=int, default=120, help="clear outdoor photos to carry")
    parser.add_argument("--val", type=int, default=10, help="synth_test pairs to validate on")
    parser.add_argument("--resume-from", type=Path, help="a last.pt from a previous call")
    parser.add_argument("--out", type=Path, default=REPO / ".carry" / "pretrain")
    parser.add_argument("--budget-mib", type=float, default=LIMIT / 2**20, help="size this folder may take")
    args = parser.parse_args()
    budget = int(args.budget_mib * 2**20)

    if args.out.exists():
        shutil.rmtree(args.out)
    total = 0
    for hazy in sorted((args.shared / "synth_train" / "hazy").iterdir()):
        total += _copy(hazy, args.out / "synth_train" / "hazy" / hazy.name)
    seen: set[str] = set()
    for clear in sorted((args.shared / "synth_train" / "clear").iterdir()):
        scene = clear.stem.rsplit("_", 1)[0]
        if scene in seen:
            continue
        seen.add(scene)
        total += _copy(clear, args.out / "synth_train" / "clear" / f"{scene}{clear.suffix}")
    test_hazy = sorted((args.shared / "synth_test" / "hazy").iterdir())
    step = max(1, len(test_hazy) // max(1, args.val))
    for hazy in test_hazy[::step][: args.val]:
        total += _copy(hazy, args.out / "val" / "hazy" / hazy.name)
        total += _copy(args.shared / "synth_test" / "clear" / hazy.name, args.out / "val" / "clear" / hazy.name)
    if args.resume_from:
        total += _copy(args.resume_from, args.out / "work" / "last.pt")
    outdoor = []
    for photo in sorted((args.shared / "clean_outdoor" / "rgb").iterdir())[: args.outdoor]:
        if total + photo.stat().st_size > budget:
            break
        total += _copy(photo, args.out / "clean_outdoor" / "rgb" / photo.name)
        outdoor.append(photo)
    print(f"{args.out}: {total / 2**20:.1f} MiB ({len(seen)} clear scenes, {len(outdoor)} outdoor photos, "
          f"{args.val} validation pairs{', a checkpoint' if args.resume_from else ''})")  # fmt: skip
    if total > min(LIMIT, budget):
        raise SystemExit(f"over the {min(LIMIT, budget) / 2**20:.1f} MiB budget: lower --val or drop --resume-from")
    if not outdoor:
        raise SystemExit("no room left for a single clear outdoor photo: raise --budget-mib")


if __name__ == "__main__":
    main()
