"""What a benchmark compares: the unadapted base and one or more adapted networks (or exports).

A :class:`Subject` is a plain PyTorch network (base, or base with an adapter
merged in) plus, when one exists and matches it, the export folder whose
artefacts (ONNX, TensorRT) are timed too.

Defaults chain like the other commands: without ``adapters`` and ``models`` the
newest ``runs/adapt/<run>`` gives the adapter; the base network is the run's
backbone and weights (``summary.json``); ``<run>/export`` and
``<run>/export-base`` are used when their model.json matches the adapter and the
base weights (a stale export is passed over with a note).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

from ..errors import UserError

__all__ = ["Subject", "resolve_subjects", "subject_from_export"]


@dataclass
class Subject:
    """One network under test.

    Attributes:
        name: label in tables ("base", "adapted", a run or file name).
        role: "base", "adapted" or "export".
        model: the plain network in eval mode on the CPU (None: only the export can run).
        export: export folder with model.json whose artefacts are timed, or None.
        adapter: the adapter file merged into ``model``, or None.
        fingerprint: of ``model``'s weights (None without a model).
        info: JSON-ready facts (backbone, weights, adapter sites and gates, ...).
    """

    name: str
    role: str
    model: Optional[nn.Module]
    export: Optional[Path] = None
    adapter: Optional[Path] = None
    fingerprint: Optional[str] = None
    info: dict[str, Any] = field(default_factory=dict)


def _read_record(folder: Path) -> Optional[dict]:
    """The folder's validated model.json record, or None when it has none.

    Raises:
        UserError: model.json exists but is unreadable or malformed (one line naming the field).
    """
    from bilalora.runtime.model_json import load_record

    return load_record(folder)


def subject_from_export(folder: Path, name: Optional[str] = None) -> Subject:
    """A subject from an export folder: its merged weights (or base weights) when model.json names them."""
    from bilalora import backbones
    from bilalora.adapter import fingerprint

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--model {folder}: not a folder (give an export folder with model.json)")
    record = _read_record(folder)
    if record is None:
        raise UserError(f"--model {folder}: no readable model.json (run `bilalora export` to make one)")
    model, weights = None, None
    merged = folder / "merged.safetensors"
    if merged.is_file():
        weights = str(merged)
    elif record.get("weights") not in (None, "") and (record.get("adapter") is None):
        weights = str(record["weights"])
    backbone = record.get("backbone")
    if backbone and weights and (weights == "random" or Path(weights).is_file()):
        name = backbones.registered_name(backbone, f"{folder}/model.json")  # a recorded factory is never imported
        model = backbones.load(name, weights=weights, input_norm=record.get("input_norm") or "none")
    label = name or (f"{folder.parent.name}/{folder.name}" if folder.parent.name else folder.name)
    return Subject(
        name=label,
        role="export",
        model=model,
        export=folder,
        adapter=None,
        fingerprint=fingerprint(model) if model is not None else None,
        info={"backbone": backbone, "weights": weights, "export": str(folder),
              "adapter": (record.get("adapter") or {}).get("path")},
    )  # fmt: skip


def _matching_export(folder: Path, adapter: Optional[Path], base_fingerprint: str, notes: list[str]) -> Optional[Path]:
    """``folder`` when its model.json was exported from this adapter (or this base), else None (with a note)."""
    from bilalora.runtime.model_json import sha256_of

    try:
        record = _read_record(folder)
    except UserError as exc:
        notes.append(f"{folder} not timed: {exc}")
        return None
    if record is None:
        return None
    if record.get("base_fingerprint") != base_fingerprint:
        notes.append(f"{folder} was exported from other base weights; not timed (re-run `bilalora export`)")
        return None
    recorded = record.get("adapter")
    if adapter is None:
        return folder if recorded is None else None
    if recorded is None or recorded.get("sha256") != sha256_of(adapter):
        notes.append(f"{folder} does not hold {adapter.name} as it is now; not timed (re-run `bilalora export`)")
        return None
    if record.get("merged") is False:
        notes.append(f"{folder} is an unmerged gated graph; its latency is listed as such")
    return folder


def resolve_subjects(
    adapters: Sequence[Path] = (),
    models: Sequence[Path] = (),
    backbone: Optional[str] = None,
    weights: Optional[str] = None,
    include_base: bool = True,
    runs_root: Optional[Path] = None,
    input_norm: Optional[str] = None,
) -> tuple[list[Subject], Optional[Path], list[str]]:
    """The subjects to compare, the adapt run they came from (or None) and lines saying what was picked.

    Args:
        adapters: adapter files (none: the newest run's, unless ``models`` are given; with no run at all
            and ``backbone`` or ``weights`` given, the base alone).
        models: export folders, benchmarked as they are.
        backbone, weights: the base network (default: from the first adapter's run summary).
        include_base: add the unadapted base as the first subject.
        runs_root: folder of adapt runs (default ``runs/adapt``).
        input_norm: what the base weights expect (``--input-norm``; default: the run's or the file's record).
    """
    from bilalora.adapter import Adapter, fingerprint
    from bilalora.export.merge import merge_adapter
    from bilalora.sources import resolve_source

    notes: list[str] = []
    subjects: list[Subject] = []
    adapters = [Path(a) for a in adapters]
    if models and not adapters:
        subjects = [subject_from_export(Path(m)) for m in models]
        return subjects, None, notes

    from bilalora.runs import adapt_root, latest_adapter_run

    base_only = not adapters and (backbone or weights) is not None and latest_adapter_run(adapt_root(runs_root)) is None
    first = resolve_source(adapter=adapters[0] if adapters else None, base=base_only, backbone=backbone,
                           weights=weights, runs_root=runs_root, input_norm=input_norm)  # fmt: skip
    notes.extend(first.picked)
    if base_only:
        notes.append(f"no adapt run under {adapt_root(runs_root)}: benchmarking the base {first.backbone} alone")
        include_base = True
    adapter_paths = [] if base_only else (adapters or [first.adapter])
    base = first.load_base()
    base_fp = fingerprint(base)
    base_info = {"backbone": first.backbone, "weights": first.weights or base.bilalora_info.get("weights")}
    if include_base:
        export = _matching_export(first.run / "export-base", None, base_fp, notes) if first.run else None
        subjects.append(Subject("base", "base", base, export, None, base_fp, base_info))
    names = set()
    for path in adapter_paths:
        adapter = Adapter.load(path)
        merged, report = merge_adapter(adapter, base)
        run = path.parent if (path.parent / "summary.json").is_file() else None
        name = "adapted" if len(adapter_paths) == 1 else (run.name if run is not None else path.stem)
        while name in names:
            name += "'"
        names.add(name)
        export = _matching_export(run / "export", path, base_fp, notes) if run is not None else None
        info = {**base_info, "adapter": str(path), **adapter.summary(), "parameters_gated": report.parameters_gated}
        subjects.append(Subject(name, "adapted", merged, export, path, report.merged_fingerprint, info))
    subjects.extend(subject_from_export(Path(m)) for m in models)
    return subjects, first.run, notes
