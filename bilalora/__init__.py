"""bilalora: adapt image-dehazing networks to real haze with bilevel-positioned LoRA.

This module stays light: importing ``bilalora`` does not import torch, so that
``bilalora.runtime`` can be embedded with numpy, OpenCV and onnxruntime alone.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
