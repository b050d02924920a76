"""How much of a LoRA delta survives bf16 autocast, and what it costs (issue 12.1), on the CPU.

Two ways to run a LoRA'd conv under bf16 autocast:

* ``naive``: ``conv(x, W + delta)`` (the sum is rounded to bf16 by the conv);
* ``branch`` (bilalora's): ``float(conv(x, W)) + float(conv(x, delta))``.

For every LoRA'd layer of the backbone (16 sites, 32 convs), with B scaled so
that |delta| = ``--rel`` x |W|, the layer's input as the bf16 network hands it
over is captured, and the realised output delta (layer with B minus layer with
B = 0, both under autocast) is compared with the exact one
(float32 ``conv(x, delta)``): survival = 1 - |realised - exact| / |exact|.
Also: the cosine between the prior objective's gradient with respect to the
LoRA factors and gates under bf16 autocast and in float32, and the seconds of
one forward+backward under autocast either way.

    nice -n 10 python benchmarks/lora_precision.py --out benchmarks/results/lora_precision.json
"""

from __future__ import annotations

import argparse
import contextlib
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
from bilalora.search import _loss


def naive_forward(self, x):
    """The pre-branch forward: the delta added to W, the sum run (and rounded) by the conv."""
    if self.merged or not self.enabled:
        return self.base(x)
    return self._apply_weight(x, self.effective_weight(), self.base.bias)


BRANCH_FORWARD = lora.LoRALayer.forward


@contextlib.contextmanager
def mode(name):
    lora.LoRALayer.forward = naive_forward if name == "naive" else BRANCH_FORWARD
    try:
        yield
    finally:
        lora.LoRALayer.forward = BRANCH_FORWARD


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", default=str(ROOT.parent / "shared/data/real_day"))
    parser.add_argument("--backbone", default="dea-net-s")
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rel", type=float, nargs="+", default=[1e-3, 1e-2])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    paths = list_images(args.images)[: args.batch]
    crops = []
    for path in paths:
        image = downsize(load_image(path), 2 * args.crop)
        h, w, _ = image.shape
        y, x = (h - args.crop) // 2, (w - args.crop) // 2
        crops.append(np.ascontiguousarray(image[y : y + args.crop, x : x + args.crop]))
    batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    model = backbones.load(args.backbone).eval()
    lora.inject(model, sites.default_sites(model), rank=8, lora_alpha=16)
    lora.freeze_base(model)
    layers = lora.lora_layers(model)
    direction = {}
    with torch.no_grad():
        for path, layer in layers.items():
            layer.lora_B.normal_()
            direction[path] = layer.lora_B / layer.get_delta_weight().norm() * layer.base.weight.norm()

    def set_b(rel):
        with torch.no_grad():
            for path, layer in layers.items():
                layer.lora_B.copy_(direction[path] * rel)

    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    record = {"benchmark": "lora_precision", "how": "python benchmarks/lora_precision.py", "backbone": args.backbone,
              "images": len(paths), "crop": args.crop, "machine": platform.machine(), "torch": torch.__version__,
              "layers": len(layers), "survival": {}, "gradient_cosine_vs_fp32": {}, "seconds_fwd_bwd_bf16": {}}
    for rel in args.rel:
        for name in ("naive", "branch"):
            with mode(name):
                inputs = {}
                hooks = [layer.register_forward_pre_hook(lambda m, a, p=path: inputs.__setitem__(p, a[0]))
                         for path, layer in layers.items()]
                set_b(rel)
                with torch.no_grad(), bf16():
                    model(batch)
                for hook in hooks:
                    hook.remove()
                survivals = []
                for path, layer in layers.items():
                    x = inputs[path]
                    with torch.no_grad():
                        set_b(rel)
                        exact = layer.base._conv_forward(x.float(), layer.get_delta_weight(), None)
                        with bf16():
                            with_delta = layer(x).float()
                            set_b(0.0)
                            without = layer(x).float()
                    survivals.append(1 - float((with_delta - without - exact).norm() / exact.norm()))
            record["survival"][f"{name}@{rel:g}"] = {"mean": float(np.mean(survivals)), "min": float(np.min(survivals))}
            print(f"delta {rel:g} x |W|, {name}: survival mean {np.mean(survivals):.4f}, min {np.min(survivals):.4f}",
                  flush=True)
    set_b(1e-3)
    objective = build_objective("prior")
    params = lora.lora_parameters(model) + lora.gate_parameters(model)
    reference = torch.cat([g.flatten() for g in torch.autograd.grad(
        _loss(model, objective, batch, contextlib.nullcontext), params)])
    for name in ("naive", "branch"):
        with mode(name):
            times = []
            for _ in range(3):
                started = time.perf_counter()
                loss = _loss(model, objective, batch, bf16)
                grads = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
                times.append(time.perf_counter() - started)
        cosine = float(torch.nn.functional.cosine_similarity(grads, reference, dim=0))
        record["gradient_cosine_vs_fp32"][name] = cosine
        record["seconds_fwd_bwd_bf16"][name] = float(np.median(times))
        print(f"{name}: prior gradient cosine vs fp32 {cosine:.4f}, fwd+bwd {np.median(times):.2f} s (bf16, CPU)",
              flush=True)
    if args.out:
        write_json(Path(args.out), record)
    return record


if __name__ == "__main__":
    main()
