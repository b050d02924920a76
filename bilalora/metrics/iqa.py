"""Bridge to pyiqa's no-reference metrics (MUSIQ, NIQE, BRISQUE, PIQE, ...): torch, imported lazily.

    from bilalora.metrics.iqa import PyiqaMetric
    musiq = PyiqaMetric("musiq", device="cuda")
    score = musiq(uint8_rgb)                 # float; musiq.direction is "higher"

pyiqa downloads a metric's weights on first use into its cache
(``~/.cache/torch/hub/pyiqa`` by default, or ``$TORCH_HOME/hub/pyiqa``). On a
machine without network, copy the weights file there first; a metric whose
weights cannot be had is a one-line :class:`~bilalora.errors.UserError` naming
the folder, never a silent random model. PIQE needs no weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import UserError

__all__ = ["PyiqaMetric", "available_pyiqa_metrics", "pyiqa_cache_dir"]


def pyiqa_cache_dir() -> Path:
    """Where pyiqa looks for (and downloads) metric weights."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    return Path(torch_home) / "hub" / "pyiqa"


def available_pyiqa_metrics() -> list[str]:
    """Names pyiqa knows (empty when pyiqa is not installed)."""
    try:
        import pyiqa
    except Exception:  # noqa: BLE001 - pyiqa missing or broken
        return []
    return sorted(pyiqa.list_models())


class PyiqaMetric:
    """One pyiqa no-reference metric as ``image -> float``.

    Args:
        name: a pyiqa metric name (``musiq``, ``niqe``, ``piqe``, ...).
        device: torch device string.

    Attributes:
        direction: "lower" or "higher" (which way is better), from pyiqa's ``lower_better``.
    """

    def __init__(self, name: str, device: str = "cpu"):
        try:
            import pyiqa
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"--iqa {name}: pyiqa cannot be imported ({type(exc).__name__}: {exc})") from None
        known = set(pyiqa.list_models())
        if name not in known:
            raise UserError(f"--iqa {name}: pyiqa has no such metric (e.g. musiq, niqe, brisque, piqe, clipiqa)")
        try:
            self.metric = pyiqa.create_metric(name, device=device, as_loss=False)
        except Exception as exc:  # noqa: BLE001 - network errors, missing files, bad checkpoints
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"--iqa {name}: pyiqa could not load its weights ({first}); on a machine without network copy "
                f"the file into {pyiqa_cache_dir()} (or set TORCH_HOME), or leave {name} out of --iqa"
            ) from None
        self.name = name
        self.device = device
        self.direction = "lower" if bool(getattr(self.metric, "lower_better", False)) else "higher"

    def __call__(self, image: np.ndarray) -> float:
        """Score a uint8 (H, W, 3) RGB image (or float RGB in [0, 1])."""
        import torch

        array = np.asarray(image)
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255.0
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None].float().to(self.device)
        with torch.no_grad():
            return float(self.metric(tensor.clamp(0, 1)).mean())
