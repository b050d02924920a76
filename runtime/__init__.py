"""Torch-free runtime for cameras and drones: exported bilalora models on uint8 frames.

    from bilalora.runtime import Dehazer
    dehaze = Dehazer("runs/adapt/exp/export")       # model.json folder, .onnx, .xml or .engine
    clear = dehaze(frame)                            # uint8 HxWx3 BGR (or RGB, grey, BGRA) in, same out

    from bilalora.runtime import ModelSwitch, LuminanceRule
    switch = ModelSwitch({"day": Dehazer("day/export"), "night": Dehazer("night/export")}, LuminanceRule())

    from bilalora.runtime import open_source, open_sink, process
    report = process(open_source("flight.mp4"), open_sink("out.mp4", source), dehaze)

Needs numpy, OpenCV, Pillow and onnxruntime (OpenVINO for ``model.xml`` and bf16/int8 on
CPUs; TensorRT and cuda-python for ``.engine`` files); it never imports torch nor the
exporter. Names are imported on first use.
"""

from __future__ import annotations

from bilalora.lazy import lazy_exports

_EXPORTS = {
    "Dehazer": "dehazer",
    "resolve_model": "select",
    "Candidate": "select",
    "OnnxBackend": "backends",
    "TensorRTBackend": "backends",
    "OpenVinoBackend": "ov_backend",
    "cpu_has_bf16": "ov_backend",
    "DEFAULT_PROVIDERS": "providers",
    "tensorrt_provider_options": "providers",
    "trt_cache_dir": "cache",
    "RunOptions": "session",
    "RunSession": "session",
    "read_frame": "decode",
    "UnreadableImage": "decode",
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
    "load_record": "model_json",
    "validate_record": "model_json",
    "resolve_artefact": "model_json",
    "write_sidecar": "model_json",
    "engine_mismatch": "model_json",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
