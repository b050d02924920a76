"""Haze synthesis with the atmospheric scattering model.

    I = J * t + A * (1 - t),    t = exp(-beta * d)

J is a clear image, d a relative depth (0 near, 1 far), beta the scattering
coefficient and A the airlight colour. numpy + OpenCV only, no torch.

Conventions: images are ``float32`` ``(H, W, 3)`` RGB in ``[0, 1]``; depth and
transmission maps are ``float32`` ``(H, W)``; depth is relative, in ``[0, 1]``
(brighter = farther in a depth image, as Monodepth-style maps are stored).

When no depth map exists, :func:`synthetic_depth` makes a plausible one: a
vertical gradient (the bottom of a photo is near, the horizon and sky far)
blended with smooth random fields. :func:`sample_haze` draws beta and A per
sample, including yellowish and bluish-grey airlight and non-homogeneous haze
(beta modulated by a smooth random field). Every function takes an explicit
``numpy.random.Generator``, so a sample is a pure function of its seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from .errors import UserError

__all__ = [
    "HazeParams",
    "HazeRanges",
    "apply_haze",
    "depth_from_image",
    "sample_haze",
    "smooth_field",
    "synthesize",
    "synthetic_depth",
]


@dataclass(frozen=True)
class HazeRanges:
    """The distribution :func:`sample_haze` draws from.

    Attributes:
        beta: (low, high) of the scattering coefficient for depth in [0, 1]
            (t at the farthest point is exp(-beta)).
        airlight: (low, high) of the airlight brightness.
        p_yellow: probability of a yellowish airlight (R > G > B, smog/dust).
        p_blue: probability of a bluish-grey airlight.
        p_nonhomogeneous: probability that beta varies over the image.
        near: (low, high) of the depth offset of the nearest point (haze even up close).
        noise: (low, high) of the std of Gaussian sensor noise added to the hazy image
            (applied with probability 1/2).
        t_min: lower bound of the transmission.
        airlight_unevenness: (low, high) of the relative amplitude by which the airlight
            varies smoothly over the image (real fog and sky are not one colour; under
            dense haze, where I is nearly A, a dehazer that reads such drift as scene
            amplifies it by 1 / t into blotches). (0, 0): uniform airlight.
    """

    beta: tuple[float, float] = (0.5, 2.8)
    airlight: tuple[float, float] = (0.68, 1.0)
    p_yellow: float = 0.3
    p_blue: float = 0.15
    p_nonhomogeneous: float = 0.35
    near: tuple[float, float] = (0.0, 0.25)
    noise: tuple[float, float] = (0.0, 0.012)
    t_min: float = 0.04
    airlight_unevenness: tuple[float, float] = (0.0, 0.0)


@dataclass
class HazeParams:
    """One draw of haze parameters.

    Attributes:
        beta: scattering coefficient (scalar; multiplied by ``beta_field`` when set).
        airlight: RGB airlight, 3 floats in [0, 1].
        near: depth offset added before scaling: ``d' = near + (1 - near) * d``.
        nonhomogeneous: whether beta varies over the image.
        field_seed: seed of the smooth field that modulates beta (non-homogeneous haze).
        noise: std of the Gaussian noise added to the hazy image (0: none).
        airlight_unevenness: relative amplitude of the airlight's smooth variation (0: none).
        kind: ``"grey"``, ``"yellow"`` or ``"blue"`` (airlight colour family).
    """

    beta: float
    airlight: tuple[float, float, float]
    near: float = 0.0
    nonhomogeneous: bool = False
    field_seed: int = 0
    noise: float = 0.0
    kind: str = "grey"
    airlight_unevenness: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready copy."""
        return asdict(self)


def smooth_field(shape: tuple[int, int], rng: np.random.Generator, cells: int | None = None) -> np.ndarray:
    """A smooth random field in [0, 1]: Gaussian noise on a coarse grid, bicubic-upsampled.

    Args:
        shape: (H, W) of the output.
        rng: the generator.
        cells: grid cells along the longer side (default: random 2..6).

    Returns:
        float32 (H, W), min 0 and max 1 (constant 0.5 when the field is flat).
    """
    height, width = int(shape[0]), int(shape[1])
    if cells is None:
        cells = int(rng.integers(2, 7))
    scale = max(height, width) / cells
    grid_h = max(2, round(height / scale) + 1)
    grid_w = max(2, round(width / scale) + 1)
    coarse = rng.standard_normal((grid_h, grid_w)).astype(np.float32)
    out = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    low, high = float(out.min()), float(out.max())
    if high - low < 1e-6:
        return np.full((height, width), 0.5, np.float32)
    return ((out - low) / (high - low)).astype(np.float32)


def synthetic_depth(
    shape: tuple[int, int],
    rng: np.random.Generator,
    window: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """A plausible relative depth for an outdoor photo without a depth map.

    A vertical gradient (near at the bottom, far at a random horizon and above)
    is blended with a smooth random field (objects, terrain) and a little
    horizontal tilt. ``window`` lets a crop see the part of the full photo's
    gradient it was cut from.

    Args:
        shape: (H, W) of the output.
        rng: the generator.
        window: (top, left, height, width) of the output inside the full photo,
            as fractions of the photo's height and width; default the whole photo.

    Returns:
        float32 (H, W) in [0, 1]: 0 near, 1 far.
    """
    height, width = int(shape[0]), int(shape[1])
    top, left, frac_h, frac_w = window if window is not None else (0.0, 0.0, 1.0, 1.0)
    ys = top + frac_h * (np.arange(height, dtype=np.float32) + 0.5) / height  # 0 = top of the photo
    xs = left + frac_w * (np.arange(width, dtype=np.float32) + 0.5) / width
    horizon = float(rng.uniform(0.25, 0.65))
    gamma = float(rng.uniform(0.6, 1.6))
    below = np.clip((1.0 - ys) / max(1.0 - horizon, 1e-3), 0.0, 1.0) ** gamma  # 1 at the horizon
    tilt = float(rng.uniform(-0.15, 0.15))
    gradient = np.clip(below[:, None] + tilt * (xs[None, :] - 0.5), 0.0, 1.0)
    blend = float(rng.uniform(0.1, 0.45))
    depth = (1.0 - blend) * gradient + blend * smooth_field((height, width), rng)
    return np.clip(depth, 0.0, 1.0).astype(np.float32)


def depth_from_image(depth_image: np.ndarray) -> np.ndarray:
    """Turn a decoded depth image into relative depth in [0, 1] (brighter = farther).

    Args:
        depth_image: (H, W) or (H, W, C) float array (e.g. from :func:`bilalora.images.load_image`).

    Returns:
        float32 (H, W), min-max normalised (zeros when the map is constant).
    """
    depth = np.asarray(depth_image, dtype=np.float32)
    if depth.ndim == 3:
        depth = depth.mean(axis=2)
    low, high = float(depth.min()), float(depth.max())
    if high - low < 1e-6:
        return np.zeros_like(depth, dtype=np.float32)
    return ((depth - low) / (high - low)).astype(np.float32)


def sample_haze(rng: np.random.Generator, ranges: HazeRanges = HazeRanges()) -> HazeParams:
    """Draw beta, airlight colour, near offset, non-homogeneity and noise for one sample."""
    beta = float(rng.uniform(*ranges.beta))
    level = float(rng.uniform(*ranges.airlight))
    pick = float(rng.uniform())
    if pick < ranges.p_yellow:
        kind = "yellow"
        rgb = (level, level * rng.uniform(0.86, 0.97), level * rng.uniform(0.62, 0.86))
    elif pick < ranges.p_yellow + ranges.p_blue:
        kind = "blue"
        rgb = (level * rng.uniform(0.86, 0.97), level * rng.uniform(0.93, 1.0), level)
    else:
        kind = "grey"
        rgb = tuple(level * (1.0 + rng.uniform(-0.03, 0.03)) for _ in range(3))
    airlight = tuple(float(np.clip(c, 0.0, 1.0)) for c in rgb)
    nonhomogeneous = bool(rng.uniform() < ranges.p_nonhomogeneous)
    noise = float(rng.uniform(*ranges.noise)) if rng.uniform() < 0.5 else 0.0
    low, high = ranges.airlight_unevenness
    unevenness = float(rng.uniform(low, high)) if high > 0 else 0.0  # no draw: old seeds keep their samples
    return HazeParams(
        beta=beta,
        airlight=airlight,  # type: ignore[arg-type]
        near=float(rng.uniform(*ranges.near)),
        nonhomogeneous=nonhomogeneous,
        field_seed=int(rng.integers(0, 2**31 - 1)),
        noise=noise,
        kind=kind,
        airlight_unevenness=unevenness,
    )


def apply_haze(
    clear: np.ndarray,
    depth: np.ndarray,
    params: HazeParams,
    t_min: float = HazeRanges.t_min,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply I = J t + A (1 - t), t = exp(-beta d'), d' = near + (1 - near) d.

    Args:
        clear: J, float32 (H, W, 3) in [0, 1].
        depth: float (H, W) in [0, 1].
        params: the haze draw.
        t_min: lower bound of t.

    Returns:
        (hazy float32 (H, W, 3) in [0, 1], transmission float32 (H, W) in [t_min, 1]).
    """
    clear = np.asarray(clear, dtype=np.float32)
    if clear.ndim != 3 or clear.shape[2] != 3:
        raise UserError(f"haze synthesis expects an HxWx3 image, got shape {clear.shape}")
    if depth.shape != clear.shape[:2]:
        raise UserError(f"depth map {depth.shape} does not match image {clear.shape[:2]}")
    d = params.near + (1.0 - params.near) * np.clip(depth.astype(np.float32), 0.0, 1.0)
    beta = np.float32(params.beta)
    if params.nonhomogeneous:
        rng = np.random.default_rng(params.field_seed)
        beta = beta * (0.35 + 1.3 * smooth_field(d.shape, rng))  # 0.35x .. 1.65x
    t = np.clip(np.exp(-beta * d), t_min, 1.0).astype(np.float32)
    airlight = np.asarray(params.airlight, dtype=np.float32)
    if params.airlight_unevenness > 0:
        drift = 2.0 * smooth_field(d.shape, np.random.default_rng(params.field_seed + 2)) - 1.0  # [-1, 1]
        airlight = np.clip(airlight * (1.0 + params.airlight_unevenness * drift[..., None]), 0.0, 1.0)
    hazy = clear * t[..., None] + airlight * (1.0 - t[..., None])
    if params.noise > 0:
        rng = np.random.default_rng(params.field_seed + 1)
        hazy = hazy + rng.normal(0.0, params.noise, hazy.shape).astype(np.float32)
    return np.clip(hazy, 0.0, 1.0).astype(np.float32), t


def synthesize(
    clear: np.ndarray,
    rng: np.random.Generator,
    depth: np.ndarray | None = None,
    ranges: HazeRanges = HazeRanges(),
    window: tuple[float, float, float, float] | None = None,
) -> tuple[np.ndarray, HazeParams]:
    """Make a hazy version of ``clear`` with randomly drawn haze.

    Args:
        clear: float32 (H, W, 3) RGB in [0, 1].
        rng: the generator (draws the depth when ``depth`` is None, then the haze).
        depth: relative depth (H, W) in [0, 1]; None: :func:`synthetic_depth`.
        ranges: the parameter distribution.
        window: passed to :func:`synthetic_depth` (where ``clear`` sits in its photo).

    Returns:
        (hazy float32 (H, W, 3) in [0, 1], the :class:`HazeParams` drawn).
    """
    if depth is None:
        depth = synthetic_depth(clear.shape[:2], rng, window)
    params = sample_haze(rng, ranges)
    hazy, _ = apply_haze(clear, depth, params, ranges.t_min)
    return hazy, params
