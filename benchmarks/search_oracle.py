"""Does the site search find the sites that help? An oracle comparison (issue 10.4).

Oracle: every candidate site is adapted *alone* (ungated LoRA on that site only,
the same steps, batches and learning rate), and the drop of the objective on
held-out crops (images used neither for training nor for the search's upper
level) ranks the sites. That ranking is the truth a search should find.

Search: the gated search over all candidate sites with a given hypergradient
(``ift``, ``release``, ``direct``) and gate optimiser, or the naive ``joint``
search, for several seeds. Reported per variant:

* Spearman correlation of the final gate values with the oracle's drops;
* |top-k ∩ oracle top-k| / k;
* top-k overlap across seeds (mean pairwise |A ∩ B| / k);
* the gap between the k-th and (k+1)-th gate against the spread of the gates
  over the last quarter of the search (the noise level of the ranking);
* the held-out objective after stage B (top-k LoRA kept, gates fixed, fine-tuned).

Three sub-commands so the oracle and the searches can run as two processes;
``report`` merges their JSON into the final record and prints a Markdown table:

    nice -n 10 python benchmarks/search_oracle.py oracle --out oracle.json
    nice -n 10 python benchmarks/search_oracle.py search --out search.json
    python benchmarks/search_oracle.py report --oracle oracle.json --search search.json \
        --out benchmarks/results/search_oracle.json

Data: the photos of ``--images`` are downsized to ``--max-side``, split with a
fixed seed into train (1/2: f and the oracle's training), validation (1/4: the
search's F) and held-out (1/4: evaluation only); batches are random square
crops, a pure function of (seed, step).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bilalora import backbones, lora, sites
from bilalora.images import downsize, list_images, load_image
from bilalora.io import write_json
from bilalora.objectives import build_objective
from bilalora.search import (
    OptimConfig,
    bilevel_step,
    joint_step,
    make_gate_optimizer,
    make_lora_optimizer,
    train_step,
)


# ------------------------------------------------------------------ data
class Crops:
    """Random square crops (N, 3, c, c) in [0, 1] of a list of (H, W, 3) images; batch = f(seed, step)."""

    def __init__(self, images, crop: int, batch: int, seed: int):
        self.images, self.crop, self.batch, self.seed = images, crop, batch, seed

    def get(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step])
        out = []
        for _ in range(self.batch):
            image = self.images[rng.integers(len(self.images))]
            h, w, _ = image.shape
            y, x = rng.integers(h - self.crop + 1), rng.integers(w - self.crop + 1)
            patch = image[y : y + self.crop, x : x + self.crop]
            if rng.random() < 0.5:
                patch = patch[:, ::-1]
            out.append(np.ascontiguousarray(patch))
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def load_split(folder: str, max_side: int, crop: int):
    paths = list_images(folder)
    rng = np.random.default_rng(1234)
    order = rng.permutation(len(paths))
    images = [downsize(load_image(paths[i]), max_side) for i in order]
    images = [im for im in images if min(im.shape[:2]) >= crop]
    n = len(images)
    train, val, held = images[: n // 2], images[n // 2 : (3 * n) // 4], images[(3 * n) // 4 :]
    return train, val, held


def heldout_batches(images, crop: int, batch: int, count: int) -> list[torch.Tensor]:
    crops = Crops(images, crop, batch, seed=999)
    return [crops.get(i) for i in range(count)]


@torch.no_grad()
def evaluate(model, objective, batches) -> float:
    model.eval()
    total = sum(float(objective(model(b), b)) * len(b) for b in batches)
    return total / sum(len(b) for b in batches)


# ------------------------------------------------------------------ runs
def fresh_model(base):
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def oracle(args) -> None:
    torch.set_num_threads(args.threads)
    base = backbones.load(args.backbone).eval()
    objective = build_objective(args.objective)
    train, val, held = load_split(args.images, args.max_side, args.crop)
    held_batches = heldout_batches(held, args.crop, args.batch, args.heldout_batches)
    base_loss = evaluate(base, objective, held_batches)
    candidates = [s.name for s in sites.default_sites(base)]
    record = {"kind": "oracle", "config": vars(args), "base_heldout": base_loss, "sites": {},
              "data": {"train": len(train), "val": len(val), "heldout": len(held)}}
    config = OptimConfig(lr=args.lr)
    crops = Crops(train, args.crop, args.batch, seed=args.seed)
    for name in candidates:
        started = time.time()
        torch.manual_seed(args.seed)
        model = fresh_model(base)
        lora.inject(model, sites.by_name(model, [name]), args.rank, args.lora_alpha, gated=False)
        lora.freeze_base(model)
        optimizer = make_lora_optimizer(lora.lora_parameters(model), config)
        for step in range(args.oracle_steps):
            train_step(model, objective, crops.get(step), optimizer, config)
        after = evaluate(model, objective, held_batches)
        record["sites"][name] = {"heldout": after, "drop": base_loss - after, "seconds": round(time.time() - started, 1)}
        print(f"oracle {name}: held-out {after:.5f} (drop {base_loss - after:+.5f})", flush=True)
        write_json(Path(args.out), record)


def search(args) -> None:
    torch.set_num_threads(args.threads)
    base = backbones.load(args.backbone).eval()
    objective = build_objective(args.objective)
    train, val, held = load_split(args.images, args.max_side, args.crop)
    held_batches = heldout_batches(held, args.crop, args.batch, args.heldout_batches)
    record = {"kind": "search", "config": vars(args), "base_heldout": evaluate(base, objective, held_batches),
              "runs": []}
    if Path(args.out).is_file() and args.resume:
        record = json.loads(Path(args.out).read_text())
    done = {(r["variant"], r["seed"]) for r in record["runs"]}
    for variant, seed in itertools.product(args.variants.split(","), [int(s) for s in args.seeds.split(",")]):
        if (variant, seed) in done:
            continue
        spec, _, gate_lr = variant.partition("@")  # e.g. ift:normalized@0.03
        method, _, gate_opt = spec.partition(":")
        gate_opt = gate_opt or "adam"
        gate_lr = float(gate_lr) if gate_lr else args.gate_lr
        config = OptimConfig(lr=args.lr, gate_lr=gate_lr, gate_optimizer=gate_opt,
                             hypergradient=method if method != "joint" else "ift")
        started = time.time()
        torch.manual_seed(seed)
        model = fresh_model(base)
        lora.inject(model, sites.default_sites(model), args.rank, args.lora_alpha, gated=True)
        lora.freeze_base(model)
        lora_opt = make_lora_optimizer(lora.lora_parameters(model), config)
        gate_opt_ = make_gate_optimizer(lora.gate_parameters(model), config)
        train_crops = Crops(train, args.crop, args.batch, seed=100 + seed)
        val_crops = Crops(val, args.crop, args.batch, seed=200 + seed)
        trajectory, losses = [], []
        for step in range(args.search_steps):
            batch = train_crops.get(step)
            if gate_opt == "sgd" and step == 1:
                # plain SGD: scale the rate so this step moves the gates by gate_lr (RMS). Not at step 0:
                # there B = 0, the deltas are zero and so is every gate gradient.
                gate_opt_.param_groups[0]["lr"] = gate_lr / _gate_grad_rms(model, objective, batch, val_crops.get(step),
                                                                           args.lr, method)
            if method == "joint":
                result = joint_step(model, objective, batch, lora_opt, gate_opt_, config)
            else:
                result = bilevel_step(model, objective, batch, val_crops.get(step), lora_opt, gate_opt_, config)
            trajectory.append(result.gates)
            losses.append(result.train_loss)
        names = list(lora.site_gates(model))
        gates = torch.stack(trajectory).tolist()
        final = dict(zip(names, gates[-1]))
        ranking = sorted(names, key=lambda n: -final[n])
        top = ranking[: args.top_k]
        search_heldout = evaluate(model, objective, held_batches)
        lora.keep_sites(model, top)
        stage_b = make_lora_optimizer(lora.lora_parameters(model), config)
        for step in range(args.finetune_steps):
            train_step(model, objective, train_crops.get(args.search_steps + step), stage_b, config)
        after = evaluate(model, objective, held_batches)
        run = {"variant": variant, "seed": seed, "sites": names, "gates_final": final, "ranking": ranking,
               "top_k": top, "gate_trajectory": gates, "train_loss": torch.stack(losses).tolist(),
               "heldout_after_search": search_heldout, "heldout_after_stage_b": after,
               "gate_lr_used": gate_opt_.param_groups[0]["lr"], "seconds": round(time.time() - started, 1)}
        record["runs"].append(run)
        print(f"{variant} seed {seed}: top-{args.top_k} {top}, held-out after B {after:.5f} "
              f"({run['seconds']} s)", flush=True)
        write_json(Path(args.out), record)


def _gate_grad_rms(model, objective, train_batch, val_batch, eta, method) -> float:
    """RMS of the gate gradient on these batches (for plain SGD's rate), without changing the model."""
    from bilalora.search import hypergradient

    if method == "joint":
        loss = objective(model(train_batch), train_batch)
        grads = torch.autograd.grad(loss, lora.gate_parameters(model))
    else:
        grads, *_ = hypergradient(model, objective, train_batch, val_batch, eta=eta, variant=method)
    stacked = torch.stack([g.detach() for g in grads])
    return float(stacked.pow(2).mean().sqrt()) + 1e-12


# ------------------------------------------------------------------ report
def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def report(args) -> None:
    oracles = [json.loads(Path(path).read_text()) for path in args.oracle.split(",")]
    oracle_rec = oracles[0]
    records = [json.loads(Path(path).read_text()) for path in args.search.split(",")]
    runs = {}
    for rec in records:  # a (variant, seed) run found in several files counts once (the first)
        for run in rec["runs"]:
            runs.setdefault((run["variant"], run["seed"]), run)
    search_rec = {"config": records[0]["config"], "runs": list(runs.values())}
    k = search_rec["config"]["top_k"]
    # the oracle's drops averaged over its seeds; their agreement is the ceiling of any search's agreement
    drops = {name: float(np.mean([o["sites"][name]["drop"] for o in oracles])) for name in oracle_rec["sites"]}
    oracle_self = [spearman([a["sites"][n]["drop"] for n in drops], [b["sites"][n]["drop"] for n in drops])
                   for a, b in itertools.combinations(oracles, 2)]
    oracle_rank = sorted(drops, key=lambda n: -drops[n])
    oracle_top = set(oracle_rank[:k])
    variants = {}
    for run in search_rec["runs"]:
        names = [n for n in run["sites"] if n in drops]
        gates = run["gates_final"]
        traj = np.array(run["gate_trajectory"])
        tail = traj[-max(2, len(traj) // 4):]
        ordered = sorted(run["sites"], key=lambda n: -gates[n])
        gap = gates[ordered[k - 1]] - gates[ordered[k]]
        noise = float(np.median(tail.max(0) - tail.min(0)))
        entry = variants.setdefault(run["variant"], {"runs": []})
        entry["runs"].append({
            "seed": run["seed"],
            "spearman": spearman([gates[n] for n in names], [drops[n] for n in names]),
            "topk_overlap_oracle": len(set(run["top_k"]) & oracle_top) / k,
            "top_k": run["top_k"],
            "gap_k": gap,
            "gate_spread_last_quarter": noise,
            "gap_above_noise": gap > noise,
            "heldout_after_search": run["heldout_after_search"],
            "heldout_after_stage_b": run["heldout_after_stage_b"],
        })
    for name, entry in variants.items():
        runs = entry["runs"]
        tops = [set(r["top_k"]) for r in runs]
        pairs = list(itertools.combinations(tops, 2))
        entry["summary"] = {
            "seeds": len(runs),
            "spearman_mean": float(np.mean([r["spearman"] for r in runs])),
            "spearman_std": float(np.std([r["spearman"] for r in runs])),
            "topk_overlap_oracle_mean": float(np.mean([r["topk_overlap_oracle"] for r in runs])),
            "topk_overlap_across_seeds": float(np.mean([len(a & b) / k for a, b in pairs])) if pairs else None,
            "gap_above_noise_fraction": float(np.mean([r["gap_above_noise"] for r in runs])),
            "heldout_after_stage_b_mean": float(np.mean([r["heldout_after_stage_b"] for r in runs])),
        }
    out = {
        "benchmark": "search_oracle",
        "how": "python benchmarks/search_oracle.py oracle|search|report (see the module docstring)",
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "threads": search_rec["config"]["threads"]},
        "config": {"oracle": oracle_rec["config"], "search": [rec["config"] for rec in records]},
        "data": oracle_rec["data"],
        "base_heldout": oracle_rec["base_heldout"],
        "oracle": {"drops": drops, "ranking": oracle_rank, "top_k": oracle_rank[:k], "seeds": len(oracles),
                   "spearman_between_seeds": oracle_self,
                   "drops_per_seed": [{n: o["sites"][n]["drop"] for n in drops} for o in oracles]},
        "variants": variants,
    }
    write_json(Path(args.out), out)
    print(f"oracle top-{k}: {', '.join(oracle_rank[:k])}; base held-out objective {oracle_rec['base_heldout']:.5f}; "
          f"Spearman between oracle seeds: {', '.join(f'{x:+.2f}' for x in oracle_self) or 'n/a'}")
    print("| variant | Spearman vs oracle | top-k ∩ oracle | top-k ∩ across seeds | gap > noise | held-out after B |")
    print("|---|---|---|---|---|---|")
    for name, entry in variants.items():
        s = entry["summary"]
        across = "n/a" if s["topk_overlap_across_seeds"] is None else f"{s['topk_overlap_across_seeds']:.2f}"
        print(f"| {name} | {s['spearman_mean']:+.2f} ± {s['spearman_std']:.2f} | {s['topk_overlap_oracle_mean']:.2f} | "
              f"{across} | {s['gap_above_noise_fraction']:.2f} | {s['heldout_after_stage_b_mean']:.5f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("oracle", "search"):
        p = sub.add_parser(name)
        p.add_argument("--images", default=os.environ.get("BILALORA_REAL_DAY", str(ROOT.parent / "shared/data/real_day")))
        p.add_argument("--backbone", default="dea-net-s")
        p.add_argument("--objective", default="prior")
        p.add_argument("--crop", type=int, default=64)
        p.add_argument("--batch", type=int, default=4)
        p.add_argument("--max-side", type=int, default=192)
        p.add_argument("--rank", type=int, default=8)
        p.add_argument("--lora-alpha", type=float, default=16.0)
        p.add_argument("--lr", type=float, default=1e-3)
        p.add_argument("--heldout-batches", type=int, default=4)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--out", required=True)
        if name == "oracle":
            p.add_argument("--oracle-steps", type=int, default=20)
            p.add_argument("--seed", type=int, default=0, help="LoRA initialisation and batch order")
        else:
            p.add_argument("--search-steps", type=int, default=20)
            p.add_argument("--finetune-steps", type=int, default=10)
            p.add_argument("--gate-lr", type=float, default=3e-3)
            p.add_argument("--top-k", type=int, default=3)
            p.add_argument("--seeds", default="0,1,2")
            p.add_argument("--variants", default="ift,release,direct,joint,ift:normalized,ift:sgd",
                           help="METHOD[:GATE_OPTIMIZER][@GATE_LR], comma-separated")
            p.add_argument("--resume", action="store_true")
    p = sub.add_parser("report")
    p.add_argument("--oracle", required=True, help="one or more oracle JSON files (seeds), comma-separated")
    p.add_argument("--search", required=True, help="one or more search JSON files, comma-separated")
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    {"oracle": oracle, "search": search, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
