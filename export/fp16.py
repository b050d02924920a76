"""The fp16 ONNX model: fp16 weights and compute, fp32 input and output.

Built by exporting a half copy of the network inside :class:`ExportWrapper`
with casts at the boundary (input fp32 -> fp16, output fp16 -> fp32, then the
clamp in fp32). This is what TensorRT 11 needs: it has no weak typing
(``BuilderFlag.FP16`` is gone), so an fp16 engine is built from a graph whose
tensors are fp16 already. GPUs running onnxruntime (CUDA/TensorRT providers)
use it as is; CPU onnxruntime also runs it (casting around nodes that lack an
fp16 kernel), which is how the parity gate measures it.

Why not convert the fp32 ONNX graph afterwards: onnxconverter-common's
``convert_float_to_float16(keep_io_types=True)`` (1.16) was tried on the
width-8 DEA-Net's TorchScript export and gave 12.7 dB PSNR against fp32, while
the half export keeps about 90 dB (random weights, 64x96). The parity gate
(PSNR >= 40 dB) guards either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

from .onnx_export import OnnxExport, export_onnx

__all__ = ["export_fp16", "fp32_initializers"]


def export_fp16(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int,
    fixed: Optional[tuple[int, int, int]] = None,
    dynamo: bool = False,
    fold_constants: bool = True,
    slim: bool = True,
    metadata: Optional[dict[str, Any]] = None,
    log: Optional[Callable[[str], None]] = None,
) -> OnnxExport:
    """Export ``model`` as an fp16 ONNX graph with float32 "input" and "output".

    Same arguments as :func:`bilalora.export.onnx_export.export_onnx`; ``model`` stays fp32.
    """
    return export_onnx(
        model,
        path,
        opset=opset,
        fixed=fixed,
        dynamo=dynamo,
        half=True,
        fold_constants=fold_constants,
        slim=slim,
        metadata=metadata,
        log=log,
    )


def fp32_initializers(path: str | Path) -> list[str]:
    """Names of float32 initializers left in an ONNX file (a well-formed fp16 export has none
    beyond small constants)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return [init.name for init in proto.graph.initializer if init.data_type == onnx.TensorProto.FLOAT]
