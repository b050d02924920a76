"""``Dehazer``: uint8 frames in, uint8 frames out, with an exported model. No torch.

    from bilalora.runtime import Dehazer
    dehaze = Dehazer("runs/adapt/exp/export")        # folder with model.json, or a .onnx / .xml / .engine
    clear = dehaze(frame)                             # uint8 (H, W, 3) BGR -> same shape, dtype, order
    clears = dehaze.run_frames([f1, f2, f3, f4])      # several frames at once (fixed-batch exports)

The folder form reads ``model.json`` (:mod:`bilalora.runtime.model_json`) for the pad
multiple and picks the fastest artefact that passed its gate for this machine
(:mod:`.select`: TensorRT engine, OpenVINO bf16 on CPUs with bf16 units, then the ONNX graph
in onnxruntime with the TensorRT, CUDA, then CPU providers that it has). When the chosen
backend fails to open or to run (a CUDA error, a missing driver, out of memory, a foreign
engine), the Dehazer falls back to the next candidate, ending with ``model.onnx``, and says
why in :attr:`Dehazer.notes` (and through ``on_note``). Frames of any size are padded to
the multiple (reflect, bottom-right), run and cropped back (windows under four pad
multiples, 16 px for DEA-Net, are edge-padded up to that: the network's deepest reflect
padding needs it); frames larger than the model takes (an engine's profile maximum, a
static graph's size, or ``tile``) are cut into overlapping tiles blended with linear ramps.
An export with a fixed batch N is always sent exactly N windows: frames (and tiles) are
grouped by N and the last group is padded with copies of its last window.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from bilalora.errors import UserError

from .backends import Backend, OnnxBackend, TensorRTBackend, first_line
from .frames import COLOR_ORDERS, Tile, blend_window, frame_to_rgb01, pad_to_multiple, plan_tiles, rgb01_to_frame
from .select import Candidate, resolve_model

__all__ = ["Dehazer", "resolve_model"]


def _round_down(value: int, multiple: int) -> int:
    return max(multiple, value - value % multiple)


class Dehazer:
    """Dehaze frames with an exported bilalora model.

    Args:
        model: export folder (model.json + artefacts), or a ``.onnx`` / ``.xml`` / ``.engine`` file.
        color: channel order of 3/4-channel frames: "bgr" (OpenCV, default) or "rgb".
        providers: onnxruntime providers in order of preference (None: TensorRT, CUDA, CPU
            as available).
        prefer: "auto" (an engine TensorRT can load here, else the rest), "engine" or "onnx".
        precision: "auto" (fastest that passed its gate here), "fp32", "fp16", "bf16" or "int8".
        tile: largest tile side in pixels (None: only where the model requires it).
        overlap: overlap of neighbouring tiles in pixels.
        threads: onnxruntime / OpenVINO CPU threads (0: their default).
        verify: check artefacts' sha256 against model.json before use.
        on_note: called with each fallback line as it happens (e.g. to print it).

    Attributes:
        backend: the :class:`~.backends.Backend` in use; ``path`` is its file.
        candidate: the :class:`~.select.Candidate` in use; ``candidates`` the whole ordered list.
        notes: one line per artefact that was passed over or failed, and why.
        batch_size: windows per backend call (the fixed batch of a static export, else 1).
        last_ms: wall time of the last call in milliseconds.
    """

    def __init__(
        self,
        model: str | Path,
        color: str = "bgr",
        providers: Optional[Sequence[str]] = None,
        prefer: str = "auto",
        precision: str = "auto",
        tile: Optional[int] = None,
        overlap: int = 32,
        threads: int = 0,
        verify: bool = True,
        on_note: Optional[Callable[[str], None]] = None,
        _trt=None,
        _cudart=None,
    ):
        color = color.lower()
        if color not in COLOR_ORDERS:
            raise UserError(f"--color {color}: use bgr or rgb")
        self.notes: list[str] = []
        self.on_note = on_note
        passed_over: list[str] = []
        candidates, record = resolve_model(model, prefer, precision, verify, list(providers or []), passed_over)
        for line in passed_over:
            self._note(line)
        self.model = Path(model)
        self.record = record
        self.color = color
        self.precision = precision
        self.providers = list(providers) if providers else None
        self.threads = int(threads)
        self._fakes = (_trt, _cudart)
        spec = (record or {}).get("input", {})
        self.pad_multiple = int(spec.get("pad_multiple", 4))
        self.pad_mode = str(spec.get("pad_mode", "reflect"))
        # DEA-Net's 7x7 reflect conv at 1/4 resolution needs at least 16 px: windows smaller
        # than four pad multiples are edge-padded up to it (and cropped back)
        self.min_side = 4 * self.pad_multiple
        if tile is not None and tile < 2 * self.pad_multiple:
            raise UserError(f"--tile {tile}: use at least {2 * self.pad_multiple} pixels")
        if int(overlap) < 0:
            raise UserError(f"--overlap {overlap}: must be 0 or more")
        self.tile = tile
        self.overlap = int(overlap)
        self.last_ms = 0.0
        self.frames = 0
        self.candidates = list(candidates)
        self._remaining = list(candidates)
        self.backend: Backend = self._open_next()

    # ------------------------------------------------------------------ backends

    def _note(self, line: str) -> None:
        self.notes.append(line)
        if self.on_note is not None:
            self.on_note(line)

    def _open_next(self) -> Backend:
        """Open the next candidate that loads; each one passed over goes to ``notes``."""
        while self._remaining:
            candidate = self._remaining.pop(0)
            try:
                backend = self._open_one(candidate)
            except Exception as exc:  # noqa: BLE001 - any failure to open falls back (CUDA, driver, OOM, I/O)
                if not self._remaining:
                    if isinstance(exc, UserError):
                        raise
                    raise UserError(f"{candidate.path}: cannot open it ({first_line(exc)})") from None
                self._note(f"skipped {candidate.label()}: {first_line(exc)}")
                continue
            self.candidate = candidate
            self.path = backend.path
            return backend
        raise UserError(f"--model {self.model}: nothing left to run")  # pragma: no cover - guarded above

    def _open_one(self, candidate: Candidate) -> Backend:
        if candidate.backend == "tensorrt":
            return TensorRTBackend(candidate.path, record=self.record, trt=self._fakes[0], cudart=self._fakes[1])
        if candidate.backend == "openvino":
            from .ov_backend import OpenVinoBackend

            hint = {"bf16": "bf16", "int8": None}.get(candidate.precision, "f32")
            backend = OpenVinoBackend(candidate.path, precision=hint, threads=self.threads)
            backend.precision = candidate.precision
            return backend
        return OnnxBackend(candidate.path, providers=self.providers, threads=self.threads, record=self.record,
                           precision=candidate.precision)  # fmt: skip

    def _run_backend(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch; on any failure fall back to the next candidate and run it there."""
        while True:
            try:
                return self.backend.run(batch)
            except Exception as exc:  # noqa: BLE001 - CUDA errors, OOM, foreign shapes: fall back
                if not self._remaining:
                    raise
                failed = self.candidate
                try:
                    self.backend.close()
                except Exception:  # noqa: BLE001 - a broken backend may fail to close too
                    pass
                self._note(f"{failed.label()} failed while running ({first_line(exc)}); falling back")
                self.backend = self._open_next()
                self._note(f"now running {self.candidate.label()}")

    @property
    def batch_size(self) -> int:
        """Windows per backend call: the export's fixed batch N, else 1."""
        return int(self.backend.fixed_batch or 1)

    # ------------------------------------------------------------------ info

    def describe(self) -> dict[str, Any]:
        """What runs: backend, precision, device, file, pad multiple, tiling, batching, notes (JSON-ready)."""
        return {
            "model": str(self.model),
            "file": str(self.path),
            "backend": self.backend.name,
            "precision": self.candidate.precision,
            "precision_asked": self.precision,
            "device": self.backend.device,
            "candidates": [c.label() for c in self.candidates],
            "pad_multiple": self.pad_multiple,
            "fixed_hw": list(self.backend.fixed_hw) if self.backend.fixed_hw else None,
            "max_hw": list(self.backend.max_hw) if self.backend.max_hw else None,
            "batch": self.batch_size,
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
        return self.run_frames([frame])[0]

    def run_frames(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Dehaze several frames in as few backend calls as the export allows (``batch_size`` windows each).

        Same contract per frame as :meth:`__call__`; ``last_ms`` is the wall time of the whole call.
        """
        started = time.perf_counter()
        rgbs = []
        for frame in frames:
            try:
                rgbs.append(frame_to_rgb01(frame, self.color))
            except ValueError as exc:
                raise UserError(f"frame: {exc}") from None
        outs = [rgb01_to_frame(out, frame, self.color) for out, frame in zip(self.dehaze_rgb_many(rgbs), frames)]
        self.last_ms = 1000.0 * (time.perf_counter() - started)
        self.frames += len(outs)
        return outs

    def dehaze_rgb(self, rgb: np.ndarray) -> np.ndarray:
        """float32 (3, H, W) RGB in [0, 1] -> float32 (3, H, W) in [0, 1] (tiled where needed)."""
        return self.dehaze_rgb_many([rgb])[0]

    def dehaze_rgb_many(self, rgbs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Several float32 (3, H, W) images in [0, 1] -> the same shapes dehazed, windows batched together."""
        tile_h, tile_w = self._tile_size()
        overlap = min(self.overlap, tile_h // 2, tile_w // 2)
        jobs: list[tuple[int, Optional[Tile]]] = []
        windows: list[np.ndarray] = []
        for index, rgb in enumerate(rgbs):
            height, width = rgb.shape[1:]
            if height <= tile_h and width <= tile_w:
                jobs.append((index, None))
                windows.append(rgb)
                continue
            for tile in plan_tiles(height, width, tile_h, tile_w, overlap):
                jobs.append((index, tile))
                windows.append(rgb[:, tile.top : tile.top + tile.height, tile.left : tile.left + tile.width])
        results = self._run_windows(windows)
        outs: list[Optional[np.ndarray]] = [None] * len(rgbs)
        totals: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for (index, tile), result in zip(jobs, results):
            if tile is None:
                outs[index] = result
                continue
            if index not in totals:
                height, width = rgbs[index].shape[1:]
                totals[index] = (np.zeros((3, height, width), np.float32), np.zeros((height, width), np.float32))
            total, weight = totals[index]
            ramp = blend_window(tile.height, tile.width, overlap)
            total[:, tile.top : tile.top + tile.height, tile.left : tile.left + tile.width] += result * ramp
            weight[tile.top : tile.top + tile.height, tile.left : tile.left + tile.width] += ramp
        for index, (total, weight) in totals.items():
            outs[index] = total / weight
        return outs  # type: ignore[return-value]

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

    def _pad_window(self, rgb: np.ndarray) -> np.ndarray:
        """Pad one (3, h, w) window to what the backend takes (multiple, minimum side, fixed size)."""
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
        return padded

    def _run_windows(self, windows: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run (3, h, w) windows, grouped by padded size in batches of ``batch_size``; crop each back."""
        padded = [self._pad_window(w) for w in windows]
        results: list[Optional[np.ndarray]] = [None] * len(windows)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, window in enumerate(padded):
            groups.setdefault(tuple(window.shape[1:]), []).append(index)
        for members in groups.values():
            size = self.batch_size
            for start in range(0, len(members), size):
                chunk = members[start : start + size]
                stack = [padded[i] for i in chunk]
                if self.backend.fixed_batch:
                    stack += [stack[-1]] * (self.backend.fixed_batch - len(stack))  # pad the last batch
                out = self._run_backend(np.stack(stack))
                for position, index in enumerate(chunk):
                    height, width = windows[index].shape[1:]
                    results[index] = out[position, :, :height, :width]
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Release the backend (GPU memory, sessions)."""
        self.backend.close()

    def __enter__(self) -> "Dehazer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
