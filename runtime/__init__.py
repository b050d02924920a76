"""Torch-free runtime for cameras and drones: exported bilalora models on uint8 frames.

    from bilalora.runtime import Dehazer
    dehaze = Dehazer("runs/adapt/exp/export")       # model.json folder, .onnx or .engine
    clear = dehaze(frame)                            # uint8 HxWx3 BGR (or RGB, grey, BGRA) in, same out

    from bilalora.runtime import ModelSwitch, LuminanceRule
    switch = ModelSwitch({"day": Dehazer("day/export"), "night": Dehazer("night/export")}, LuminanceRule())

    from bilalora.runtime import open_source, open_sink, process
    report = process(open_source("flight.mp4"), open_sink("out.mp4", source), dehaze)

Needs numpy, OpenCV and onnxruntime (TensorRT and cuda-python for ``.engine``
files); it never imports torch. Names are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Dehazer": "dehazer",
    "resolve_model": "dehazer",
    "OnnxBackend": "backends",
    "TensorRTBackend": "backends",
    "DEFAULT_PROVIDERS": "backends",
    "ModelSwitch": "switch",
    "LuminanceRule": "switch",
    "HazeRule": "switch",
    "mean_luminance": "switch",
    "haze_density": "switch",
    "Frame": "streams",
    "FrameSource": "streams",
    "open_source": "streams",
    "open_sink": "streams",
    "ImageSink": "streams",
    "VideoSink": "streams",
    "process": "streams",
    "StreamReport": "streams",
    "frame_to_rgb01": "frames",
    "rgb01_to_frame": "frames",
    "plan_tiles": "frames",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bilalora.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
