"""Export a dehazing network to ONNX (after segment-anything's ``utils/onnx.py`` wrapper).

The graph exported is :class:`ExportWrapper` around the network:

    input  "input":  float32 (N, 3, H, W), RGB in [0, 1], H and W multiples of 4
    output "output": float32 (N, 3, H, W), RGB, clamped to [0, 1] in the graph

N, H and W are dynamic unless a fixed shape is asked for. Padding to a
multiple of 4 and cropping back happen outside the graph (in the runtime), so
the graph has no data-dependent shapes. The clamp is part of the graph: it is
one cheap Clip node, it makes fp16 outputs safe to cast to uint8, and every
backend then returns the same range (model.json records ``output.clamped``).

Exporters: the TorchScript exporter (``torch.onnx.export(dynamo=False)``) by
default, the ``torch.export``-based one with ``dynamo=True``. Then
``onnx.checker``, initializer names without the wrapper prefix (so engine
weight names map to state-dict keys for refitting), onnxslim when installed
(a failure only warns), metadata, and an atomic write.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from bilalora.errors import UserError
from bilalora.io import atomic_path

__all__ = [
    "DEFAULT_OPSET",
    "ExportWrapper",
    "OnnxExport",
    "export_onnx",
    "onnx_parameter_count",
    "initializer_names",
]

DEFAULT_OPSET = 17
_PREFIX = "model."


class ExportWrapper(nn.Module):
    """The exported forward: optional fp16 casts at the boundary and a clamp to [0, 1].

    Args:
        model: the network, (N, 3, H, W) -> (N, 3, H, W).
        half_compute: the network's weights are fp16; the input is cast to fp16 and
            the output back to fp32 inside the graph (I/O stays fp32, compute is fp16).
        clamp: clamp the output to [0, 1] (in fp32, after the cast).

    Input: float32 (N, 3, H, W) in [0, 1]. Output: float32 (N, 3, H, W) in [0, 1].
    """

    def __init__(self, model: nn.Module, half_compute: bool = False, clamp: bool = True):
        super().__init__()
        self.model = model
        self.half_compute = half_compute
        self.clamp = clamp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x.half() if self.half_compute else x)
        if self.half_compute:
            y = y.float()
        return y.clamp(0.0, 1.0) if self.clamp else y


@dataclass
class OnnxExport:
    """Result of :func:`export_onnx`.

    Attributes:
        path: the written .onnx file.
        precision: "fp32" or "fp16" (weights and compute; I/O are always fp32).
        exporter: "torchscript" or "dynamo".
        opset: the default-domain opset of the written model.
        parameters: number of elements in the graph's initializers.
        slim: what onnxslim did ("onnxslim 0.1.x", "not installed", "skipped: ...", "failed: ...").
        seconds: wall time of export, checks and writing.
        warnings: one-line warnings for the user (e.g. onnxslim failed).
    """

    path: Path
    precision: str
    exporter: str
    opset: int
    parameters: int
    slim: str
    seconds: float
    warnings: list[str]


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    fixed: Optional[tuple[int, int, int]] = None,
    dynamo: bool = False,
    half: bool = False,
    fold_constants: bool = True,
    slim: bool = True,
    metadata: Optional[dict[str, Any]] = None,
    log: Optional[Callable[[str], None]] = None,
) -> OnnxExport:
    """Export ``model`` (wrapped in :class:`ExportWrapper`) to ``path``.

    Args:
        model: a float32 network on the CPU, (N, 3, H, W) -> (N, 3, H, W); not modified
            (a copy is halved when ``half``).
        path: destination .onnx file (written atomically).
        opset: ONNX opset of the default domain.
        fixed: (N, H, W) for a fully static graph; None: dynamic N, H, W.
        dynamo: use the ``torch.export``-based exporter instead of TorchScript.
        half: export fp16 weights and compute with fp32 input/output (see :mod:`.fp16`).
        fold_constants: constant folding (off for the unmerged LoRA graph, which would
            otherwise be folded back into merged weights).
        slim: run onnxslim when installed (also skipped when ``fold_constants`` is off).
        metadata: JSON-able dict stored as the model's ``bilalora`` metadata property.
        log: receives one-line warnings.

    Raises:
        UserError: the exporter or the checker failed (one line, with what to try).
    """
    import onnx

    start = time.perf_counter()
    path = Path(path)
    notes: list[str] = []
    network = copy.deepcopy(model).eval()
    if half:
        network = network.half()
    wrapper = ExportWrapper(network, half_compute=half).eval()
    batch, height, width = fixed if fixed is not None else (2, 64, 96)
    example = torch.rand(batch, 3, height, width)
    exporter = "dynamo" if dynamo else "torchscript"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                proto = _export_dynamo(wrapper, example, opset, fixed is None, fold_constants)
            else:
                proto = _export_torchscript(wrapper, example, opset, fixed is None, fold_constants)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporter errors become one line with a hint
        other = "--dynamo" if not dynamo else "the default TorchScript exporter (no --dynamo)"
        raise UserError(
            f"ONNX export of {path.name} failed ({exporter} exporter, opset {opset}): {_first_line(exc)}; "
            f"try {other} or another --opset"
        ) from None
    _strip_initializer_prefix(proto.graph, _PREFIX)
    if fixed is not None:
        _fix_output_dims(proto.graph, (batch, 3, height, width))
    _check(proto, path.name)
    if not slim:
        slim_note = "skipped"
    elif not fold_constants:
        slim_note = "skipped: unmerged graph keeps the LoRA factors apart"
    else:
        proto, slim_note = _slim(proto, path.name, notes)
    if _default_opset(proto) != opset:
        notes.append(
            f"{path.name}: asked for opset {opset}, the {exporter} exporter wrote opset {_default_opset(proto)}"
        )
    if metadata is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = "bilalora", json.dumps(metadata)
    proto.producer_name = "bilalora"
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    if log:
        for note in notes:
            log(note)
    return OnnxExport(
        path=path,
        precision="fp16" if half else "fp32",
        exporter=exporter,
        opset=_default_opset(proto),
        parameters=onnx_parameter_count(proto),
        slim=slim_note,
        seconds=time.perf_counter() - start,
        warnings=notes,
    )


def _export_torchscript(wrapper: nn.Module, example: torch.Tensor, opset: int, dynamic: bool, fold: bool):
    import io

    import onnx

    axes = {0: "N", 2: "H", 3: "W"}
    buffer = io.BytesIO()
    torch.onnx.export(
        wrapper,
        (example,),
        buffer,
        input_names=["input"],
        output_names=["output"],
        opset_version=opset,
        dynamic_axes={"input": axes, "output": axes} if dynamic else None,
        do_constant_folding=fold,
        dynamo=False,
    )
    return onnx.load_from_string(buffer.getvalue())


def _export_dynamo(wrapper: nn.Module, example: torch.Tensor, opset: int, dynamic: bool, fold: bool):
    dynamic_shapes = None
    if dynamic:
        from torch.export import Dim

        batch = Dim("N", min=1, max=1024)
        height, width = Dim("h", min=2, max=4096), Dim("w", min=2, max=4096)
        dynamic_shapes = ({0: batch, 2: 4 * height, 3: 4 * width},)
    program = torch.onnx.export(
        wrapper,
        (example,),
        None,
        input_names=["input"],
        output_names=["output"],
        opset_version=opset,
        dynamic_shapes=dynamic_shapes,
        optimize=fold,
        dynamo=True,
        verbose=False,
    )
    proto = program.model_proto
    if dynamic:
        _name_dims(proto.graph, {0: "N", 2: "H", 3: "W"})
    return proto


def _name_dims(graph, names: dict[int, str]) -> None:
    """Give the graph input/output's symbolic dims readable names (the dynamo exporter writes "4*h")."""
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        for index, name in names.items():
            if index < len(dims) and dims[index].HasField("dim_param"):
                dims[index].dim_param = name


def _fix_output_dims(graph, shape: tuple[int, ...]) -> None:
    """A static export's output has the input's shape (the exporter can leave it symbolic after Pad)."""
    dims = graph.output[0].type.tensor_type.shape.dim
    if len(dims) == len(shape):
        for dim, value in zip(dims, shape):
            dim.Clear()
            dim.dim_value = int(value)


def _strip_initializer_prefix(graph, prefix: str) -> None:
    """Rename initializers ``model.x.weight`` -> ``x.weight`` (the state-dict key) everywhere in ``graph``."""
    taken = {init.name for init in graph.initializer}
    mapping = {}
    for init in graph.initializer:
        if init.name.startswith(prefix):
            new = init.name[len(prefix) :]
            if new and new not in taken:
                mapping[init.name] = new
                taken.add(new)
    if not mapping:
        return
    for init in graph.initializer:
        init.name = mapping.get(init.name, init.name)
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in mapping:
                node.input[index] = mapping[name]
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        if value.name in mapping:
            value.name = mapping[value.name]


def _check(proto, name: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"onnx.checker rejected {name}: {_first_line(exc)}") from None


def _slim(proto, name: str, notes: list[str]):
    """onnxslim when installed; any failure keeps the unslimmed model and adds a warning."""
    try:
        import onnxslim
    except ImportError:
        return proto, "not installed"
    version = getattr(onnxslim, "__version__", "?")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slimmed = onnxslim.slim(proto)
        if slimmed is None:
            raise RuntimeError("onnxslim returned nothing")
        _check(slimmed, name)
    except Exception as exc:  # noqa: BLE001 - slimming is optional
        notes.append(f"onnxslim {version} failed on {name} ({_first_line(exc)}); keeping the unslimmed graph")
        return proto, f"failed: {_first_line(exc)}"
    return slimmed, f"onnxslim {version}"


def _default_opset(proto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return -1


def onnx_parameter_count(proto_or_path) -> int:
    """Number of elements in a model's initializers (its parameters plus folded constants)."""
    import onnx

    proto = (
        onnx.load(str(proto_or_path), load_external_data=False)
        if isinstance(proto_or_path, (str, Path))
        else proto_or_path
    )
    total = 0
    for init in proto.graph.initializer:
        count = 1
        for dim in init.dims:
            count *= int(dim)
        total += count
    return total


def initializer_names(proto_or_path) -> list[str]:
    """Names of a model's initializers, in graph order."""
    import onnx

    proto = (
        onnx.load(str(proto_or_path), load_external_data=False)
        if isinstance(proto_or_path, (str, Path))
        else proto_or_path
    )
    return [init.name for init in proto.graph.initializer]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
