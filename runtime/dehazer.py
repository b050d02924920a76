"""``Dehazer``: uint8 frames in, uint8 frames out, with an exported model. No torch.

    from bilalora.runtime import Dehazer
    dehaze = Dehazer("runs/adapt/exp/export")        # folder with model.json, or a .onnx / .engine
    clear = dehaze(frame)                             # uint8 (H, W, 3) BGR -> same shape, dtype, order

The folder form reads ``model.json`` (:mod:`bilalora.runtime.model_json`) for the pad
multiple and picks an artefact: the TensorRT engine when TensorRT can load it
here, else the ONNX graph (``precision="fp16"`` prefers ``model_fp16.onnx``) in
onnxruntime with the TensorRT, CUDA, then CPU providers that it has. Frames of
any size are padded to the multiple (reflect, bottom-right), run and cropped
back (windows under four pad multiples, 16 px for DEA-Net, are edge-padded up
to that: the network's deepest reflect padding needs it); frames larger than the model takes (an engine's profile maximum, a static
graph's size, or ``tile``) are cut into overlapping tiles blended with linear
ramps.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from bilalora.errors import UserError

from .backends import Backend, OnnxBackend, TensorRTBackend
from .frames import COLOR_ORDERS, blend_window, frame_to_rgb01, pad_to_multiple, plan_tiles, rgb01_to_frame

__all__ = ["Dehazer", "resolve_model"]

_PREFER = ("auto", "engine", "onnx")
_PRECISIONS = ("fp32", "fp16")


def _read_record(folder: Path) -> Optional[dict[str, Any]]:
    from bilalora.runtime.model_json import SIDECAR_NAME, read_sidecar

    path = folder / SIDECAR_NAME
    if not path.is_file():
        return None
    try:
        return read_sidecar(path)
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: {exc}") from None


def _artefact(folder: Path, record: Optional[dict], name: str) -> Optional[Path]:
    """``folder/name`` when it exists and model.json does not mark it removed (failed gate)."""
    entry = (record or {}).get("artefacts", {}).get(name)
    if entry is not None and entry.get("removed"):
        return None
    path = folder / (entry.get("path", name) if entry else name)
    return path if path.is_file() else None


def resolve_model(model: str | Path, prefer: str = "auto", precision: str = "fp32") -> tuple[list[Path], Optional[dict]]:
    """The model files to try, in order, and the model.json record (None when there is none).

    Args:
        model: an export folder (with model.json), or a ``.onnx`` / ``.engine`` file.
        prefer: "auto" (engine, then ONNX), "engine" or "onnx".
        precision: "fp32" or "fp16": which ONNX graph comes first.
    """
    if prefer not in _PREFER:
        raise UserError(f"--prefer {prefer}: use one of {', '.join(_PREFER)}")
    if precision not in _PRECISIONS:
        raise UserError(f"--precision {precision}: use fp32 or fp16")
    path = Path(model)
    if not path.exists():
        raise UserError(f"--model {path}: no such file or folder (an export folder, a .onnx or a .engine)")
    if path.is_file():
        if path.suffix.lower() not in (".onnx", ".engine", ".plan", ".trt"):
            raise UserError(f"--model {path}: not a .onnx or .engine file")
        return [path], _read_record(path.parent)
    record = _read_record(path)
    onnx_names = ["model_fp16.onnx", "model.onnx"] if precision == "fp16" else ["model.onnx", "model_fp16.onnx"]
    engines = [p for p in [_artefact(path, record, "model.engine")] if p]
    graphs = [p for p in (_artefact(path, record, n) for n in onnx_names) if p]
    if record is None and not graphs and not engines:
        graphs = sorted(path.glob("*.onnx"))
        engines = sorted(path.glob("*.engine"))
    order = {"auto": engines + graphs, "engine": engines, "onnx": graphs}[prefer]
    if not order:
        wanted = {"auto": "model.engine or model.onnx", "engine": "model.engine", "onnx": "model.onnx"}[prefer]
        raise UserError(f"--model {path}: no {wanted} in this folder (run `bilalora export` to make one)")
    return order, record


def _round_down(value: int, multiple: int) -> int:
    return max(multiple, value - value % multiple)


class Dehazer:
    """Dehaze frames with an exported bilalora model.

    Args:
        model: export folder (model.json + artefacts), or a ``.onnx`` / ``.engine`` file.
        color: channel order of 3/4-channel frames: "bgr" (OpenCV, default) or "rgb".
        providers: onnxruntime providers in order of preference (None: TensorRT, CUDA, CPU
            as available).
        prefer: "auto" (an engine TensorRT can load here, else ONNX), "engine" or "onnx".
        precision: "fp32" or "fp16" (which ONNX graph to prefer).
        tile: largest tile side in pixels (None: only where the model requires it).
        overlap: overlap of neighbouring tiles in pixels.
        threads: onnxruntime intra-op threads (0: its default).

    Attributes:
        backend: the :class:`~.backends.Backend` in use; ``path`` is its file.
        notes: one line per artefact that was passed over and why.
        last_ms: wall time of the last call in milliseconds.
    """

    def __init__(
        self,
        model: str | Path,
        color: str = "bgr",
        providers: Optional[Sequence[str]] = None,
        prefer: str = "auto",
        precision: str = "fp32",
        tile: Optional[int] = None,
        overlap: int = 32,
        threads: int = 0,
        _trt=None,
        _cudart=None,
    ):
        color = color.lower()
        if color not in COLOR_ORDERS:
            raise UserError(f"--color {color}: use bgr or rgb")
        candidates, record = resolve_model(model, prefer, precision)
        self.model = Path(model)
        self.record = record
        self.color = color
        self.notes: list[str] = []
        spec = (record or {}).get("input", {})
        self.pad_multiple = int(spec.get("pad_multiple", 4))
        self.pad_mode = str(spec.get("pad_mode", "reflect"))
        # DEA-Net's 7x7 reflect conv at 1/4 resolution needs at least 16 px: windows smaller
        # than four pad multiples are edge-padded up to it (and cropped back)
        self.min_side = 4 * self.pad_multiple
        self.backend: Backend = self._open(candidates, providers, threads, _trt, _cudart)
        self.path = self.backend.path
        if tile is not None and tile < 2 * self.pad_multiple:
            raise UserError(f"--tile {tile}: use at least {2 * self.pad_multiple} pixels")
        self.tile = tile
        self.overlap = int(overlap)
        if self.overlap < 0:
            raise UserError(f"--overlap {overlap}: must be 0 or more")
        self.last_ms = 0.0
        self.frames = 0

    def _open(self, candidates: list[Path], providers, threads: int, trt, cudart) -> Backend:
        """The first candidate that loads; the ones passed over go to ``notes``."""
        for path in candidates[:-1]:
            try:
                return self._open_one(path, providers, threads, trt, cudart)
            except UserError as exc:
                self.notes.append(f"skipped {path.name}: {exc}")
        return self._open_one(candidates[-1], providers, threads, trt, cudart)

    def _open_one(self, path: Path, providers, threads: int, trt, cudart) -> Backend:
        if path.suffix.lower() == ".onnx":
            return OnnxBackend(path, providers=providers, threads=threads)
        return TensorRTBackend(path, record=self.record, trt=trt, cudart=cudart)

    # ------------------------------------------------------------------ info

    def describe(self) -> dict[str, Any]:
        """What runs: backend, device, file, pad multiple, tiling, notes (JSON-ready)."""
        return {
            "model": str(self.model),
            "file": str(self.path),
            "backend": self.backend.name,
            "device": self.backend.device,
            "pad_multiple": self.pad_multiple,
            "fixed_hw": list(self.backend.fixed_hw) if self.backend.fixed_hw else None,
            "max_hw": list(self.backend.max_hw) if self.backend.max_hw else None,
            "tile": self.tile,
            "overlap": self.overlap,
            "color": self.color,
            "adapter": ((self.record or {}).get("adapter") or {}).get("path"),
            "base_fingerprint": (self.record or {}).get("base_fingerprint"),
            "notes": list(self.notes),
        }

    # ------------------------------------------------------------------ inference

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """Dehaze one frame.

        Args:
            frame: uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) in the ``color`` order.

        Returns:
            uint8 array of the same shape; grey frames come back grey, alpha is kept.
        """
        started = time.perf_counter()
        try:
            rgb = frame_to_rgb01(frame, self.color)
        except ValueError as exc:
            raise UserError(f"frame: {exc}") from None
        out = rgb01_to_frame(self.dehaze_rgb(rgb), frame, self.color)
        self.last_ms = 1000.0 * (time.perf_counter() - started)
        self.frames += 1
        return out

    def dehaze_rgb(self, rgb: np.ndarray) -> np.ndarray:
        """float32 (3, H, W) RGB in [0, 1] -> float32 (3, H, W) in [0, 1] (tiled where needed)."""
        height, width = rgb.shape[1:]
        tile_h, tile_w = self._tile_size()
        if height <= tile_h and width <= tile_w:
            return self._run_window(rgb)
        overlap = min(self.overlap, tile_h // 2, tile_w // 2)
        total = np.zeros((3, height, width), dtype=np.float32)
        weight = np.zeros((height, width), dtype=np.float32)
        for tile in plan_tiles(height, width, tile_h, tile_w, overlap):
            window = rgb[:, tile.top : tile.top + tile.height, tile.left : tile.left + tile.width]
            ramp = blend_window(tile.height, tile.width, overlap)
            total[:, tile.top : tile.top + tile.height, tile.left : tile.left + tile.width] += (
                self._run_window(window) * ramp
            )
            weight[tile.top : tile.top + tile.height, tile.left : tile.left + tile.width] += ramp
        return total / weight

    def _tile_size(self) -> tuple[int, int]:
        """Largest (H, W) window run at once (multiples of the pad multiple)."""
        limit_h = limit_w = 1 << 30
        backend = self.backend
        for bound in (backend.fixed_hw, backend.max_hw):
            if bound:
                limit_h, limit_w = min(limit_h, bound[0]), min(limit_w, bound[1])
        if self.tile:
            limit_h, limit_w = min(limit_h, self.tile), min(limit_w, self.tile)
        if limit_h == 1 << 30:
            return limit_h, limit_w
        return _round_down(limit_h, self.pad_multiple), _round_down(limit_w, self.pad_multiple)

    def _run_window(self, rgb: np.ndarray) -> np.ndarray:
        """Pad one window to what the backend takes, run it, crop back. (3, h, w) -> (3, h, w)."""
        height, width = rgb.shape[1:]
        padded = pad_to_multiple(rgb, self.pad_multiple, self.pad_mode)
        target_h, target_w = padded.shape[1:]
        backend = self.backend
        if backend.fixed_hw:
            target_h, target_w = backend.fixed_hw
        else:
            low_h, low_w = backend.min_hw or (self.min_side, self.min_side)
            target_h, target_w = max(target_h, low_h, self.min_side), max(target_w, low_w, self.min_side)
        if (target_h, target_w) != padded.shape[1:]:
            extra = ((0, 0), (0, target_h - padded.shape[1]), (0, target_w - padded.shape[2]))
            padded = np.pad(padded, extra, mode="edge")
        out = backend.run(padded[None])[0]
        return out[:, :height, :width]

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Release the backend (GPU memory, sessions)."""
        self.backend.close()

    def __enter__(self) -> "Dehazer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
