"""Which sites lower held-out haze when adapted alone, and does the search find them?

The site search ranks the candidate sites by their gates. ``search_oracle.py`` checked
that ranking against the objective's own drop on held-out crops; this benchmark asks
the question the product cares about: adapted *alone*, how much does each site lower
the judge (FADE) on the run's validation half, and does the objective's drop on whole
validation images, or the search's gate value, rank the sites the same way?

For every seed (each draws its own train/val/test split of ``--images``):

1. ``bilalora.adapt`` with ``method="manual"`` on one site at a time (the cpu preset's
   batch, crops and learning rate; ``--steps`` fine-tuning steps, 60 by default);
2. the adapted and the base network on the validation half (whole images, longer side
   ``--max-side``): FADE, entropy and the objective (the run's loss on whole images);
3. optionally (``--search``) a default bilevel run of the same seed: its gate values.

Printed and saved per seed: each site's drop of the objective and of FADE, FADE win
rate, entropy change; Spearman correlations between the objective's drop and FADE's
drop over the sites, and between the search's gates and FADE's drop; mean FADE drop per
level.

    nice python benchmarks/site_judge.py --seeds 0,1,2 --search \
        --out benchmarks/results/site_judge_real_day.json

Validation halves only (the test splits stay held out for the final figures).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data" / "real_day"


def spearman(a: list[float], b: list[float]) -> Optional[float]:
    """Spearman rank correlation (scipy's, average ranks for ties); None for fewer than 3 pairs."""
    from scipy.stats import spearmanr

    return None if len(a) < 3 else float(spearmanr(a, b).statistic)


def score(model: torch.nn.Module, images: list[tuple[str, np.ndarray]], objective) -> dict[str, list[float]]:
    """FADE, entropy and the objective of ``model``'s outputs, per image (uint8 RGB inputs)."""
    from bilalora.bench.quality import torch_dehazer
    from bilalora.metrics.entropy import entropy
    from bilalora.metrics.fade import fade

    run = torch_dehazer(model, "cpu")
    out: dict[str, list[float]] = {"fade": [], "entropy": [], "objective": []}
    for _, image in images:
        dehazed = run(image)
        out["fade"].append(float(fade(dehazed)))
        out["entropy"].append(float(entropy(dehazed)))
        with torch.no_grad():
            hazy = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255.0)
            result = torch.from_numpy(dehazed).permute(2, 0, 1)[None].float().div(255.0)
            if hasattr(objective, "terms"):  # the prior: each weighted term, to see which one a site lowers
                weighted = {term: objective.weights[f"{term}_weight"] * float(value.mean())
                            for term, value in objective.terms(result, hazy).items()}
                for term, value in weighted.items():
                    out.setdefault(f"term.{term}", []).append(value)
                out["objective"].append(sum(weighted.values()))  # the prior's total, as its forward sums it
            else:
                out["objective"].append(float(objective(result, hazy)))
    return out


def level_of(site: str) -> str:
    """``down_level1_block2`` -> ``level1``; names without a level give themselves."""
    for part in site.split("_"):
        if part.startswith("level"):
            return part
    return site


def run_seed(args, seed: int, workdir: Path) -> dict[str, Any]:
    from bilalora import backbones
    from bilalora.adapt import AdaptConfig, adapt, candidate_sites
    from bilalora.adapter import Adapter
    from bilalora.bench.quality import load_images
    from bilalora.objectives import build_objective
    from bilalora.runs import read_split

    objective = build_objective(args.objective)
    probe = backbones.load(args.backbone)
    names = [site.name for site in candidate_sites(probe, AdaptConfig())]
    if args.sites:
        names = [n for n in names if n in args.sites.split(",")]
    record: dict[str, Any] = {"seed": seed, "sites": {}}

    search_ranking: dict[str, float] = {}
    if args.search:
        run = workdir / f"seed{seed}_search"
        torch.manual_seed(seed)
        result = adapt(backbones.load(args.backbone), args.images, objective, AdaptConfig(seed=seed), run,
                       exist_ok=True)  # fmt: skip
        search_ranking = {name: float(value) for name, value in result.summary["ranking"]}
        record["search"] = {"selected": result.summary["selected"], "ranking": result.summary["ranking"],
                            "seconds": result.summary["stages"]}  # fmt: skip

    base_scores = None
    images = None
    for index, name in enumerate(names):
        run = workdir / f"seed{seed}_{name}"
        started = time.perf_counter()
        torch.manual_seed(seed)
        config = AdaptConfig(method="manual", sites=[name], seed=seed, steps=args.steps)
        adapt(backbones.load(args.backbone), args.images, objective, config, run, exist_ok=True)
        seconds_adapt = time.perf_counter() - started
        if base_scores is None:  # the split is the seed's: the first run wrote it
            images, _ = load_images(read_split(run)["val"], args.max_side)
            base_scores = score(backbones.load(args.backbone), images, objective)
            record["val_images"] = [n for n, _ in images]
            record["base"] = {k: float(np.mean(v)) for k, v in base_scores.items()}
        model = Adapter.load(run / "adapter.safetensors").merge_into(backbones.load(args.backbone))
        scores = score(model, images, objective)
        fade_base, fade_new = np.asarray(base_scores["fade"]), np.asarray(scores["fade"])
        entry = {
            "level": level_of(name),
            "objective_drop": float(np.mean(base_scores["objective"]) - np.mean(scores["objective"])),
            "fade": float(fade_new.mean()),
            "fade_change": float(fade_new.mean() / fade_base.mean() - 1.0),
            "fade_wins": float((fade_new < fade_base).mean()),
            "entropy_change": float(np.mean(scores["entropy"]) - np.mean(base_scores["entropy"])),
            "term_drops": {k[5:]: float(np.mean(base_scores[k]) - np.mean(v)) for k, v in scores.items()
                           if k.startswith("term.")},
            "gate": search_ranking.get(name),
            "seconds_adapt": round(seconds_adapt, 1),
        }
        record["sites"][name] = entry
        print(f"seed {seed} [{index + 1}/{len(names)}] {name}: objective -{entry['objective_drop']:.4f}, "
              f"FADE {100 * entry['fade_change']:+.1f} % ({100 * entry['fade_wins']:.0f} % better), "
              f"entropy {entry['entropy_change']:+.3f}, gate {entry['gate']}", flush=True)  # fmt: skip
    sites = record["sites"]
    fade_drop = [-sites[n]["fade_change"] for n in sites]
    record["spearman_objective_vs_fade"] = spearman([sites[n]["objective_drop"] for n in sites], fade_drop)
    if search_ranking:
        record["spearman_gate_vs_fade"] = spearman([sites[n]["gate"] for n in sites], fade_drop)
        record["spearman_gate_vs_objective"] = spearman([sites[n]["gate"] for n in sites],
                                                        [sites[n]["objective_drop"] for n in sites])
    levels: dict[str, list[float]] = {}
    for entry in sites.values():
        levels.setdefault(entry["level"], []).append(entry["fade_change"])
    record["fade_change_by_level"] = {k: float(np.mean(v)) for k, v in levels.items()}
    by_objective = sorted(sites, key=lambda n: -sites[n]["objective_drop"])
    by_fade = sorted(sites, key=lambda n: sites[n]["fade_change"])
    record["top3_by_objective"] = by_objective[:3]
    record["top3_by_fade"] = by_fade[:3]
    print(f"seed {seed}: Spearman(objective drop, FADE drop) {record['spearman_objective_vs_fade']}, "
          f"gate vs FADE {record.get('spearman_gate_vs_fade')}; FADE change by level "
          f"{ {k: round(100 * v, 1) for k, v in record['fade_change_by_level'].items()} }; "
          f"top-3 by objective {by_objective[:3]}, by FADE {by_fade[:3]}", flush=True)  # fmt: skip
    return record


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DATA)
    parser.add_argument("--backbone", default="dea-net-s")
    parser.add_argument("--objective", default="prior")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sites", default="", help="comma-separated site names (default: the candidates)")
    parser.add_argument("--steps", type=int, default=60,
                        help="fine-tuning steps per site (60: the cpu preset's total when the record was measured)")
    parser.add_argument("--max-side", type=int, default=512, help="score validation images at this longer side")
    parser.add_argument("--search", action="store_true", help="also run the default bilevel search per seed")
    parser.add_argument("--workdir", type=Path, default=Path("runs") / "site_judge")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "site_judge.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from bilalora.devices import cpu_name
    from bilalora.io import write_json

    record: dict[str, Any] = {
        "what": "each candidate site adapted alone (manual LoRA, cpu preset's fine-tuning) and scored on the "
                "seed's validation half: objective drop (whole images), FADE change and win rate, entropy "
                "change; the default search's gate per site; Spearman correlations over the sites",
        "how": "python benchmarks/site_judge.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{cpu_name()} ({os.cpu_count()} CPUs)",
        "backbone": args.backbone, "objective": args.objective, "steps": args.steps, "max_side": args.max_side,
        "seeds": [],
    }  # fmt: skip
    args.workdir.mkdir(parents=True, exist_ok=True)
    for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
        record["seeds"].append(run_seed(args, seed, args.workdir))
        write_json(args.out, record)
    print(f"saved {args.out}")
    return record


if __name__ == "__main__":
    main()
