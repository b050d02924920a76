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

from bilalora.lazy import lazy_exports

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
    "read_sidecar": "model_json",
    "write_sidecar": "model_json",
    "engine_mismatch": "model_json",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
