"""Host syncs and kernel launches per adapt step, counted on the CPU (issue 12.3).

What a CPU run can count of a step's cost on a GPU:

* **host syncs**: every call that reads a tensor's value back to Python
  (``Tensor.item``, ``tolist``, ``__bool__``, ``__float__``, ``__int__``,
  ``numpy``, ``cpu``; on a GPU each waits for the queue to drain). Counted by
  wrapping those methods during the step.
* **host-built tensors**: tensors made from Python data inside the step
  (``aten::lift_fresh``, e.g. indexing with a Python list): on a GPU each is a
  blocking host-to-device copy.
  Reads of a non-capturable Adam's step counters (host tensors on a GPU too)
  are listed apart (``host_step_counter``) and not counted as syncs.
* **advanced indexing** (``aten::index``): DEConv indexed its kernel with a
  Python list, which on a GPU copies the index to the device on every call
  (a blocking copy); a device buffer with ``index_select`` does not.
* **kernel launches**: leaf ``aten::`` operators in the profiler trace (operators
  that call no other operator), less those that only allocate or re-describe
  memory (``empty``, ``view``, ``as_strided``, ...); on a GPU each is roughly one
  kernel launch.

Steps measured: the bilevel search step (2 and 3 passes), the joint search
step, and the fine-tuning step, on a LoRA'd backbone with the prior objective.
``--tree`` runs the same count against another checkout of the package (for a
before/after comparison), e.g. ``git worktree add ../bilalora-old <commit>``.

    nice -n 10 python benchmarks/step_profile.py --out benchmarks/results/step_profile.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")

#: Leaf operators that only allocate or re-describe memory: no kernel on a GPU.
NO_KERNEL = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::as_strided", "aten::as_strided_", "aten::view",
    "aten::_reshape_alias", "aten::reshape", "aten::resize_", "aten::resolve_conj", "aten::resolve_neg",
    "aten::expand", "aten::t", "aten::transpose", "aten::permute", "aten::alias", "aten::detach", "aten::detach_",
    "aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::select", "aten::_unsafe_view", "aten::lift_fresh",
    "aten::set_", "aten::result_type", "aten::unbind", "aten::split", "aten::narrow", "aten::flatten",
    "aten::contiguous", "aten::_to_copy_meta", "aten::is_nonzero", "aten::size", "aten::stride", "aten::numel",
    "aten::dim", "aten::to", "aten::_has_compatible_shallow_copy_type", "aten::requires_grad_",
}


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="dea-net-s")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tree", default=None, help="import bilalora from this folder instead of the repository")
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--out", default=None, help="write/extend this JSON file (one entry per --label)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = _parse(argv)
    sys.path.insert(0, str(Path(args.tree).resolve() if args.tree else ROOT))
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bilalora import backbones, lora, search, sites
    from bilalora.objectives import build_objective

    torch.manual_seed(0)
    torch.set_num_threads(1)
    base = backbones.load(args.backbone).eval()
    objective = build_objective("prior")
    generator = torch.Generator().manual_seed(0)
    batches = [torch.rand(args.batch, 3, args.crop, args.crop, generator=generator) * 0.6 + 0.3 for _ in range(2)]
    train, val = batches
    config = search.OptimConfig()

    def searching():
        model = _copy(base)
        lora.inject(model, sites.default_sites(model), 8, 16.0)
        lora.freeze_base(model)
        return (model, search.make_lora_optimizer(lora.lora_parameters(model), config),
                search.make_gate_optimizer(lora.gate_parameters(model), config))

    def finetuning():
        model, lora_opt, _ = searching()
        lora.keep_sites(model, [s for s in list(lora.site_gates(model))[:3]])
        return model, search.make_lora_optimizer(lora.lora_parameters(model), config), None

    def deconv():
        from bilalora.backbones.deconv import DEConv

        return DEConv(16), None, None

    feature = torch.rand(args.batch, 16, args.crop, args.crop, generator=generator)
    cases = {
        "bilevel_2pass": (searching, lambda m, lo, go: search.bilevel_step(m, objective, train, val, lo, go, config, 2)),
        "bilevel_3pass": (searching, lambda m, lo, go: search.bilevel_step(m, objective, train, val, lo, go, config, 3)),
        "joint": (searching, lambda m, lo, go: search.joint_step(m, objective, train, lo, go, config)),
        "finetune": (finetuning, lambda m, lo, go: search.train_step(m, objective, train, lo, config)),
        # pretraining's DEConv (training form): the angular kernel's index on the host or on the device
        "deconv_forward_backward": (deconv, lambda m, lo, go: m(feature).sum().backward()),
    }
    results = {}
    for name, (build, step) in cases.items():
        model, lora_opt, gate_opt = build()
        for _ in range(args.warmup):
            step(model, lora_opt, gate_opt)
        syncs: Counter = Counter()
        # Adam's step counters stay on the host for non-capturable optimisers: reading them is not a device sync
        host_state = {id(state["step"]) for opt in (lora_opt, gate_opt) if opt is not None
                      for state in opt.state.values() if "step" in state}
        originals = {m: getattr(torch.Tensor, m) for m in SYNC_METHODS}

        def wrap(method):
            original = originals[method]

            def counted(self, *a, **k):
                syncs[method if id(self) not in host_state else "host_step_counter"] += 1
                return original(self, *a, **k)

            return counted

        for method in SYNC_METHODS:
            setattr(torch.Tensor, method, wrap(method))
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    step(model, lora_opt, gate_opt)
        finally:
            for method, original in originals.items():
                setattr(torch.Tensor, method, original)
        leaves = Counter()
        lifted = list_index = 0
        for event in prof.events():
            if event.name == "aten::lift_fresh":
                lifted += 1
            if event.name == "aten::index" and not any(c.name == "aten::index_select" for c in event.cpu_children):
                list_index += 1
            if event.name.startswith("aten::") and not event.cpu_children and event.name not in NO_KERNEL:
                leaves[event.name] += 1
        results[name] = {
            "host_syncs_per_step": sum(v for k, v in syncs.items() if k != "host_step_counter") / args.steps,
            "host_syncs_by_call": {k: v / args.steps for k, v in sorted(syncs.items())},
            "host_built_tensors_per_step": lifted / args.steps,
            "kernel_launches_per_step": sum(leaves.values()) / args.steps,
            "advanced_index_ops_per_step": list_index / args.steps,
            "top_ops": {k: v / args.steps for k, v in leaves.most_common(8)},
        }
        print(f"{args.label} {name}: {results[name]['host_syncs_per_step']:g} host syncs "
              f"{dict(results[name]['host_syncs_by_call'])}, {results[name]['host_built_tensors_per_step']:g} "
              f"host-built tensors, {results[name]['advanced_index_ops_per_step']:g} advanced-index ops, "
              f"{results[name]['kernel_launches_per_step']:g} kernel launches per step", flush=True)
    entry = {"label": args.label, "tree": args.tree or "repository", "torch": torch.__version__,
             "machine": platform.machine(), "backbone": args.backbone, "crop": args.crop, "batch": args.batch,
             "sites": 16, "rank": 8, "steps": args.steps, "results": results}
    if args.out:
        out = Path(args.out)
        record = json.loads(out.read_text()) if out.is_file() else {
            "benchmark": "step_profile", "how": "python benchmarks/step_profile.py (see its docstring)", "runs": []}
        record["runs"] = [r for r in record["runs"] if r["label"] != args.label] + [entry]
        sys.path.insert(0, str(ROOT))
        from bilalora.io import write_json

        write_json(out, record)
    return entry


def _copy(model):
    import copy

    return copy.deepcopy(model)


if __name__ == "__main__":
    main()
