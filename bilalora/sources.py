"""Which network an export or a benchmark is about: an adapter, a run's adapter, or the base.

    source = resolve_source()                          # newest runs/adapt/<name>/adapter.safetensors
    source = resolve_source(adapter="day.safetensors")
    source = resolve_source(base=True, backbone="dea-net-s")

Rules (shared by ``bilalora export`` and ``bilalora bench``):

* ``adapter`` (a file): that adapter; its run is the folder holding it when it
  is named ``adapter.safetensors`` or sits beside a ``summary.json``.
* ``base``: the unadapted backbone; with neither ``backbone`` nor ``weights``
  given, the backbone and weights of the newest adapt run (the bench's baseline).
* neither: the newest adapt run's adapter (a one-line error says what to do when
  there is none).

The base network is rebuilt from ``backbone``/``weights``, else from the run's
``summary.json`` (``backbone``, ``weights``; a weights path is tried as written,
then relative to the run folder), else from the adapter's metadata (registered
names only), else the default backbone. Every default that was picked is
described in ``Source.picked`` (the commands print those lines).

This module does not import the exporter; it imports torch only through
:class:`bilalora.adapter.Adapter` when an adapter's metadata must be read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from bilalora.errors import UserError

__all__ = ["Source", "resolve_source", "read_summary", "default_out_dir"]


@dataclass
class Source:
    """Where the network comes from.

    Attributes:
        mode: "adapter" or "base".
        adapter: the adapter file (None for base).
        run: the adapt run folder it belongs to, if any.
        backbone: registry name (or ``package.module:factory`` given on the command line).
        weights: base weights file, "random", or None (the backbone's shipped weights).
        picked: one-line notes on defaults that were picked (printed by the CLI).
        input_norm: what the base expects: ``--input-norm``, else the run's record, else the
            adapter's; None (base without a run): what the weights file records, else [0, 1].
            See :func:`bilalora.backbones.load`.
    """

    mode: str
    adapter: Optional[Path]
    run: Optional[Path]
    backbone: str
    weights: Optional[str]
    picked: list[str] = field(default_factory=list)
    input_norm: Any = None

    def load_base(self):
        """The base network (eval mode, CPU), with its input normalisation folded in."""
        from bilalora import backbones

        return backbones.load(self.backbone, weights=self.weights, input_norm=self.input_norm)


def resolve_source(
    adapter: Optional[str | Path] = None,
    base: bool = False,
    backbone: Optional[str] = None,
    weights: Optional[str] = None,
    runs_root: Optional[str | Path] = None,
    input_norm: Optional[str] = None,
) -> Source:
    """Decide what network is meant (see the module docstring).

    Raises:
        UserError: ``adapter`` with ``base``, a missing adapter file, no adapt run to
            default to, or an unreadable ``summary.json`` (one line, with what to do).
    """
    from bilalora.runs import ADAPTER_NAME, adapt_root, latest_adapter_run

    if adapter is not None and base:
        raise UserError("--adapter and --base exclude each other: export an adapter, or the unadapted backbone")
    picked: list[str] = []
    root = adapt_root(runs_root)
    if adapter is not None:
        path: Optional[Path] = Path(adapter)
        if not path.is_file():
            raise UserError(f"adapter file not found: {path} (--adapter)")
        run = path.parent if (path.name == ADAPTER_NAME or (path.parent / "summary.json").is_file()) else None
        mode = "adapter"
    elif base:
        path = None
        run = latest_adapter_run(root) if backbone is None and weights is None else None
        mode = "base"
        if run is not None:
            picked.append(f"base: the backbone and weights of {run} (newest run under {root}; the bench's baseline)")
    else:
        run = latest_adapter_run(root)
        if run is None:
            raise UserError(
                f"nothing to export: no finished adapt run under {root}/ (a folder with {ADAPTER_NAME}); "
                "run `bilalora adapt --images DIR` first, pass --adapter FILE, "
                "or export the unadapted backbone with --base"
            )
        path = run / ADAPTER_NAME
        mode = "adapter"
        picked.append(f"adapter: {path} (newest run under {root}; --adapter FILE picks another)")

    summary = read_summary(run)
    chosen = backbone
    if chosen is None and summary.get("backbone") is not None:
        from bilalora.backbones import registered_name

        chosen = registered_name(summary["backbone"], f"{run}/summary.json")  # never imports a recorded factory
    if chosen is None and path is not None:
        chosen = _adapter_backbone(path)
    if chosen is None:
        from bilalora.backbones import default_backbone

        chosen = default_backbone()
        picked.append(
            f"backbone: {chosen} (default: the registered DEA-Net with shipped weights; --backbone NAME picks another)"
        )
    elif backbone is None:
        origin = f"{run}/summary.json" if summary.get("backbone") else "the adapter file"
        picked.append(f"backbone: {chosen} (from {origin})")
    resolved = weights
    if resolved is None and summary.get("weights") not in (None, ""):
        resolved = _resolve_weights(str(summary["weights"]), run)
        picked.append(f"weights: {resolved} (from {run}/summary.json)")
    norm: Any = input_norm
    if norm is None and "input_norm" in summary:
        norm = summary["input_norm"] or "none"
    if norm is None and path is not None:
        from bilalora.adapter import Adapter

        norm = Adapter.load(path).input_norm or "none"  # the adapter records what its base expects
    return Source(mode, path, run, chosen, resolved, picked, norm)


def read_summary(run: Optional[Path]) -> dict[str, Any]:
    """A run's ``summary.json`` as a dict ({} when there is no run or no file)."""
    if run is None or not (run / "summary.json").is_file():
        return {}
    try:
        data = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{run / 'summary.json'} is not readable JSON ({exc}); pass --backbone and --weights") from None
    return data if isinstance(data, dict) else {}


def _adapter_backbone(path: Path) -> Optional[str]:
    from bilalora.adapter import Adapter

    return Adapter.load(path).backbone_for(where=f"adapter {path}")  # registered names only: never imports


def _resolve_weights(weights: str, run: Optional[Path]) -> str:
    """A weights path from summary.json: as written, else relative to the run folder."""
    if weights == "random" or Path(weights).is_file() or run is None:
        return weights
    beside = run / weights
    return str(beside) if beside.is_file() else weights


def default_out_dir(source: Source) -> Path:
    """The export folder when ``--out`` is not given.

    ``<run>/export`` for a run's adapter, ``<adapter stem>-export`` beside a loose
    adapter file, ``<run>/export-base`` for the base next to a run, else
    ``runs/export/<backbone>-base``.
    """
    if source.mode == "adapter":
        if source.run is not None:
            return source.run / "export"
        return source.adapter.parent / f"{source.adapter.stem}-export"
    if source.run is not None:
        return source.run / "export-base"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", source.backbone).strip("-") or "model"
    return Path("runs") / "export" / f"{slug}-base"
