"""What a camera adds to a hazy photo after the haze: grain, 8-bit quantisation, JPEG.

The scattering model (:mod:`bilalora.synthesis`) makes hazy inputs in which every
variation under dense haze is attenuated scene: amplifying it by ``1 / t`` is always
right, so a network trained on them learns to dig. In a real photo much of that
variation is the camera's: demosaiced sensor grain (spatially correlated, partly
chromatic), 8-bit steps in smooth gradients, and JPEG's 8x8 blocks and ringing.
Amplified, they become the dark, irregular blotches a dehazer paints into fog and
sky (``benchmarks/blotch_probe.py``: one level of noise on flat synthetic haze takes
the shipped base's output variation from 2.06 to 3.86 levels). Training pairs whose
hazy side carries them, with the clear side untouched, teach the network to leave
them flat.

numpy + OpenCV only. Images are float32 ``(H, W, 3)`` RGB in ``[0, 1]``; every
random choice comes from the generator passed in, so a sample stays a pure
function of its seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from .errors import UserError

__all__ = ["CameraArtifacts", "apply_camera_artifacts"]


@dataclass(frozen=True)
class CameraArtifacts:
    """The distribution :func:`apply_camera_artifacts` draws from.

    Attributes:
        p_grain: probability of sensor grain.
        grain_std: (low, high) of the grain's standard deviation (of 1.0) after blurring.
        grain_blur: (low, high) of the Gaussian blur (pixels) that correlates the grain
            (demosaicing and in-camera denoising spread it over neighbouring pixels).
        grain_chroma: share of the grain that differs between channels (the rest is
            common to R, G and B).
        p_jpeg: probability of JPEG compression (always after quantisation to 8 bits).
        jpeg_quality: (low, high) of the JPEG quality, inclusive (OpenCV, 4:2:0 chroma).
    """

    p_grain: float = 0.7
    grain_std: tuple[float, float] = (0.002, 0.012)
    grain_blur: tuple[float, float] = (0.0, 1.2)
    grain_chroma: float = 0.3
    p_jpeg: float = 0.7
    jpeg_quality: tuple[int, int] = (35, 95)

    def check(self) -> None:
        """Raise a UserError on probabilities outside [0, 1] or reversed ranges."""
        for name in ("p_grain", "p_jpeg", "grain_chroma"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"camera artifacts: {name} must be in [0, 1], got {value}")
        for name in ("grain_std", "grain_blur", "jpeg_quality"):
            low, high = getattr(self, name)
            if low < 0 or high < low:
                raise UserError(f"camera artifacts: {name} must be (low, high) with 0 <= low <= high, got {(low, high)}")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise UserError(f"camera artifacts: jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")

    def as_dict(self) -> dict:
        """JSON-ready copy."""
        return asdict(self)


def _grain(shape: tuple[int, int], rng: np.random.Generator, std: float, blur: float, chroma: float) -> np.ndarray:
    """Correlated grain, float32 (H, W, 3), zero mean, standard deviation ``std`` per channel."""
    height, width = shape
    common = rng.standard_normal((height, width, 1)).astype(np.float32)
    per_channel = rng.standard_normal((height, width, 3)).astype(np.float32)
    noise = np.sqrt(1.0 - chroma) * common + np.sqrt(chroma) * per_channel
    if blur > 0.05:
        noise = cv2.GaussianBlur(noise, (0, 0), sigmaX=blur, borderType=cv2.BORDER_REFLECT)
    spread = float(noise.std())
    return noise * np.float32(std / spread) if spread > 0 else noise


def apply_camera_artifacts(
    hazy: np.ndarray, rng: np.random.Generator, artifacts: CameraArtifacts = CameraArtifacts()
) -> tuple[np.ndarray, dict]:
    """Add grain (sometimes), quantise to 8 bits (always) and JPEG-compress (sometimes).

    Args:
        hazy: float32 (H, W, 3) RGB in [0, 1], the hazy side of a training pair.
        rng: draws whether and how much of each artifact.
        artifacts: the distribution.

    Returns:
        (float32 (H, W, 3) RGB in [0, 1] on the 8-bit grid, the draw as a dict:
        ``grain_std`` (0: none), ``grain_blur``, ``jpeg_quality`` (0: none)).
    """
    image = np.asarray(hazy, dtype=np.float32)
    if image.ndim != 3 or image.shape[2] != 3:
        raise UserError(f"camera artifacts expect an HxWx3 image, got shape {image.shape}")
    draw = {"grain_std": 0.0, "grain_blur": 0.0, "jpeg_quality": 0}
    if rng.uniform() < artifacts.p_grain:
        draw["grain_std"] = float(rng.uniform(*artifacts.grain_std))
        draw["grain_blur"] = float(rng.uniform(*artifacts.grain_blur))
        image = image + _grain(image.shape[:2], rng, draw["grain_std"], draw["grain_blur"], artifacts.grain_chroma)
    quantised = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    if rng.uniform() < artifacts.p_jpeg:
        low, high = artifacts.jpeg_quality
        draw["jpeg_quality"] = int(rng.integers(low, high + 1))
        ok, encoded = cv2.imencode(".jpg", quantised[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, draw["jpeg_quality"]])
        if not ok:  # pragma: no cover - OpenCV's JPEG encoder does not fail on a valid uint8 image
            raise RuntimeError("OpenCV could not JPEG-encode a training sample")
        quantised = cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1]
    return quantised.astype(np.float32) / 255.0, draw
