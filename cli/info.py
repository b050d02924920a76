"""``bilalora info``: versions and what this machine can do."""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import platform

from rich.markup import escape
from rich.table import Table

from .common import console, user_errors


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@user_errors
def info_command() -> None:
    """Print versions and available accelerators, runtimes and weights."""
    import bilalora
    from bilalora import backbones

    table = Table(title=f"bilalora {bilalora.__version__}", show_header=True)
    table.add_column("component")
    table.add_column("status")
    table.add_row("python", platform.python_version())
    for dist in ("torch", "torchvision", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "open_clip_torch", "pyiqa",
                 "opencv-python", "opencv-python-headless", "safetensors", "typer", "rich"):
        version = _version(dist)
        if version or dist in ("torch", "onnxruntime", "open_clip_torch", "pyiqa"):
            table.add_row(dist, version or "[yellow]not installed[/]")
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        table.add_row("CUDA", f"{torch.version.cuda}, {props.name} (sm_{props.major}{props.minor})")
    else:
        table.add_row("CUDA", "no GPU visible (CPU only)")
    try:
        import onnxruntime

        table.add_row("onnxruntime providers", ", ".join(onnxruntime.get_available_providers()))
    except ImportError:
        table.add_row("onnxruntime providers", "[yellow]onnxruntime not installed[/]")
    try:
        trt = importlib.import_module("tensorrt")
        table.add_row("tensorrt", str(getattr(trt, "__version__", "?")))
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        table.add_row("tensorrt", "[yellow]not installed[/] " + escape("(pip install 'bilalora[trt]' on a CUDA machine)"))
    try:
        from bilalora.runtime.backends import import_cudart

        import_cudart()
        table.add_row("cuda-python", "installed (the runtime's .engine path)")
    except Exception:  # noqa: BLE001 - UserError when absent
        table.add_row("cuda-python", "[yellow]not installed[/] (only the runtime's .engine path needs it)")
    from bilalora.runtime.cuda_stack import cuda_majors, stack_problem

    majors = cuda_majors(torch.version.cuda)
    for name, entry in majors.items():
        major = f"CUDA {entry['major']}" if entry["major"] is not None else "-"
        table.add_row(f"CUDA major: {name}", f"{major}  ({escape(entry['detail'])})")
    try:
        from bilalora.runtime.ov_backend import cpu_has_bf16

        table.add_row("CPU bf16 (OpenVINO)", "yes (AMX or AVX512-BF16)" if cpu_has_bf16() else "no")
    except Exception:  # noqa: BLE001 - informational only
        pass
    for spec in backbones.list_backbones():
        shipped = backbones.shipped_weights(spec.name)
        if spec.weights_file:
            table.add_row(f"weights {spec.name}", str(shipped) if shipped else "[yellow]not shipped[/]")
    table.add_row("default backbone", backbones.default_backbone())
    console.print(table)
    problem = stack_problem(majors)
    if problem:
        console.print(f"[yellow]warning:[/] {escape(problem)}", soft_wrap=True)
