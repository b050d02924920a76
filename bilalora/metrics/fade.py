"""FADE: Fog Aware Density Evaluator (Choi, You, Bovik, IEEE TIP 2015).

A vectorised numpy re-implementation of the LIVE FADE 1.0 release, written from
``docs/metrics.md`` (FADE) (no MATLAB code was copied). It reproduces
the original code (run under Octave) to about 1e-7 on the release's test images.

**Lower FADE means less perceived fog** (better dehazing). The score is a ratio
of two Mahalanobis-like distances, ``D = Df / (Dff + 1)``, of 12 fog-aware
patch statistics (8x8 patches) to a fog-free and to a foggy multivariate
Gaussian model; the model parameters ship in ``data/fade_params.npz``
(provenance and licence: ``data/NOTICE.md``).

This module also holds the small MATLAB-semantics helpers (``matlab_round``,
``matlab_uint8``, ``to_uint8_rgb``, ``matlab_gray``) that the other metric
modules share. numpy only; no torch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

__all__ = [
    "FadeResult",
    "fade",
    "fade_details",
    "load_fade_params",
    "matlab_gray",
    "matlab_round",
    "matlab_uint8",
    "to_uint8_rgb",
]

PATCH_SIZE = 8
#: MATLAB ``rgb2gray`` weights (first row of the inverse NTSC YIQ matrix).
MATLAB_GRAY_WEIGHTS = (0.298936021293775, 0.587043074451121, 0.114020904255103)
_PARAMS_PATH = Path(__file__).resolve().parent / "data" / "fade_params.npz"

# Contrast-energy constants (Groen et al., as used by FADE), docs/metrics.md.
_CE_SIGMA = 3.25
_CE_SEMISATURATION = 0.1
_CE_TAU_GRAY = 9.225496406318721e-4 * 255
_CE_TAU_BY = 8.969246659629488e-4 * 255
_CE_TAU_RG = 2.069284034165411e-4 * 255


# ----------------------------------------------------------------------------
# MATLAB-semantics helpers
# ----------------------------------------------------------------------------


def matlab_round(x: np.ndarray) -> np.ndarray:
    """Round half away from zero (MATLAB ``round``); ``numpy.round`` rounds half to even.

    Exact for all finite doubles (no ``floor(x + 0.5)`` double-rounding error).
    """
    x = np.asarray(x)
    a = np.abs(x)
    r = np.floor(a)
    r = r + ((a - r) >= 0.5)
    return np.copysign(r, x)


def matlab_uint8(x: np.ndarray) -> np.ndarray:
    """MATLAB ``uint8(x)`` for a float array: round half away from zero, saturate to
    [0, 255], NaN -> 0. Returns ``uint8``."""
    x = np.asarray(x)
    r = matlab_round(x)
    r = np.where(np.isnan(r), 0, r)
    return np.clip(r, 0, 255).astype(np.uint8)


def to_uint8_rgb(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Convert an image to contiguous ``uint8`` of shape (H, W, 3).

    Accepted inputs:

    * ``uint8`` (H, W, 3) RGB, or (H, W, C>3) whose first three channels are used
      (e.g. RGBA);
    * (H, W) or (H, W, 1) grayscale: copied into all three channels;
    * floating point in [0, 1]: converted with MATLAB ``uint8(255*x)`` semantics
      (``im2uint8``: round half away from zero, saturate, NaN -> 0). The product is
      taken in the input's precision, as MATLAB does for single/double;
    * ``bool``: False -> 0, True -> 255;
    * other integer types whose values lie in 0..255 (cast as is).

    Raises:
        UserError: for other shapes, or integer values outside 0..255.
    """
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] >= 3:
        arr = arr[:, :, :3]
    else:
        raise UserError(f"{name}: expected an HxW gray or HxWx3 RGB image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.bool_:
        return np.ascontiguousarray(arr.astype(np.uint8) * 255)
    if np.issubdtype(arr.dtype, np.floating):
        if arr.dtype not in (np.float32, np.float64):
            arr = arr.astype(np.float32)
        return np.ascontiguousarray(matlab_uint8(arr * arr.dtype.type(255)))
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise UserError(
                f"{name}: integer image of dtype {arr.dtype} has values outside 0..255; "
                "pass uint8, or float in [0, 1]"
            )
        return np.ascontiguousarray(arr.astype(np.uint8))
    raise UserError(f"{name}: unsupported dtype {arr.dtype}; pass uint8 RGB or float in [0, 1]")


def matlab_gray(rgb_uint8: np.ndarray) -> np.ndarray:
    """MATLAB ``rgb2gray`` of a uint8 (H, W, 3) image, as float64 integers 0..255.

    ``Y = 0.298936021293775 R + 0.587043074451121 G + 0.114020904255103 B``,
    rounded half away from zero (docs/metrics.md conventions).
    """
    rgb = np.asarray(rgb_uint8, dtype=np.float64)
    wr, wg, wb = MATLAB_GRAY_WEIGHTS
    y = rgb[..., 0] * wr + rgb[..., 1] * wg + rgb[..., 2] * wb
    return matlab_round(y)


# ----------------------------------------------------------------------------
# Model parameters
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def load_fade_params() -> dict[str, np.ndarray]:
    """Load the fog-free / foggy MVG parameters (keys ``mu_fogfree`` (12,),
    ``cov_fogfree`` (12, 12), ``mu_foggy``, ``cov_foggy``) as read-only float64."""
    if not _PARAMS_PATH.is_file():
        raise UserError(f"FADE model parameters missing: {_PARAMS_PATH} (reinstall bilalora)")
    with np.load(_PARAMS_PATH) as data:
        params = {k: np.array(data[k], dtype=np.float64) for k in ("mu_fogfree", "cov_fogfree", "mu_foggy", "cov_foggy")}
    for value in params.values():
        value.setflags(write=False)
    return params


@functools.lru_cache(maxsize=1)
def _model_terms() -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, float], ...]:
    """Per model: (mu, A^-1 with A = cov/2, column sums of A^-1, u^T A^-1 u)."""
    params = load_fade_params()
    out = []
    for key in ("fogfree", "foggy"):
        mu = params[f"mu_{key}"].reshape(12)
        a_inv = np.linalg.inv(params[f"cov_{key}"] / 2.0)
        out.append((mu, a_inv, a_inv.sum(axis=0), float(a_inv.sum())))
    return tuple(out)


# ----------------------------------------------------------------------------
# Filters
# ----------------------------------------------------------------------------


@functools.cache
def _fspecial_gaussian(size: int = 7, sigma: float = 7.0 / 6.0) -> np.ndarray:
    """MATLAB ``fspecial('gaussian', size, sigma)``, renormalised as FADE does."""
    half = (size - 1) / 2.0
    x = np.arange(-half, half + 1.0)
    xx, yy = np.meshgrid(x, x)
    h = np.exp(-(xx * xx + yy * yy) / (2.0 * sigma * sigma))
    h[h < np.finfo(np.float64).eps * h.max()] = 0.0
    h = h / h.sum()
    return h / h.sum()


def _imfilter_replicate(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlation with an odd square kernel, replicate borders (MATLAB ``imfilter(...,'replicate')``)."""
    k = kernel.shape[0]
    r = k // 2
    h, w = img.shape[-2:]
    pad_width = [(0, 0)] * (img.ndim - 2) + [(r, r), (r, r)]
    padded = np.pad(img, pad_width, mode="edge")
    out = np.zeros(img.shape, dtype=np.float64)
    for a in range(k):
        for b in range(k):
            wgt = kernel[a, b]
            if wgt != 0.0:
                out += wgt * padded[..., a : a + h, b : b + w]
    return out


@functools.lru_cache(maxsize=1)
def _ce_kernel() -> np.ndarray:
    """Groen et al. second-derivative-of-Gaussian kernel (20 taps, docs/metrics.md)."""
    sigma = _CE_SIGMA
    half = 3.0 * sigma
    n = int(np.floor(2.0 * half)) + 1  # -9.75:1:9.75 -> 20 samples, last 9.25
    x = -half + np.arange(n, dtype=np.float64)
    g = 1.0 / (np.sqrt(2.0 * np.pi) * sigma) * np.exp((x * x) / (-2.0 * sigma * sigma))
    g = g / g.sum()
    h = (x * x / sigma**4 - 1.0 / sigma**2) * g
    h = h - h.sum() / n
    h = h / np.sum(0.5 * x * x * h)
    return h


def _block_pad(x: np.ndarray, border: int, axis: int) -> np.ndarray:
    """Block-copy padding: first ``border`` slices before, last ``border`` after.

    The original code needs at least ``border`` rows/columns; for smaller inputs
    (an 8-pixel side) the copies are extended by edge replication.
    """
    n = x.shape[axis]
    head = np.take(x, np.arange(min(border, n)), axis=axis)
    tail = np.take(x, np.arange(max(n - border, 0), n), axis=axis)
    if n < border:
        extra = border - n
        head = np.concatenate([np.repeat(np.take(head, [0], axis=axis), extra, axis=axis), head], axis=axis)
        tail = np.concatenate([tail, np.repeat(np.take(tail, [-1], axis=axis), extra, axis=axis)], axis=axis)
    return np.concatenate([head, x, tail], axis=axis)


def _conv_same_even(x: np.ndarray, h: np.ndarray, axis: int) -> np.ndarray:
    """MATLAB ``conv2(..., 'same')`` along ``axis`` on a block-padded copy, cropped back.

    With n = len(h) = 20 and a 10-sample block padding p: out[i] = sum_k h[k] p[i + 10 - k]
    on the padded signal, i.e. for the cropped output j: sum_k h[k] p[j + 20 - k].
    """
    n = h.shape[0]
    border = n // 2
    padded = _block_pad(x, border, axis)
    length = x.shape[axis]
    padded = np.moveaxis(padded, axis, -1)
    out = np.zeros(padded.shape[:-1] + (length,), dtype=np.float64)
    for k in range(n):
        start = 2 * border - k
        out += h[k] * padded[..., start : start + length]
    return np.moveaxis(out, -1, axis)


def _contrast_energy(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contrast-energy maps (gray, yellow-blue, red-green), docs/metrics.md, on float64 RGB 0..255."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    channels = np.stack(
        [0.299 * r + 0.587 * g + 0.114 * b, 0.5 * r + 0.5 * g - b, r - g], axis=0
    )
    h = _ce_kernel()
    cx = _conv_same_even(channels, h, axis=2)  # h along rows
    cy = _conv_same_even(channels, h, axis=1)  # h^T along columns
    c = np.sqrt(cx * cx + cy * cy)
    out = []
    for i, tau in enumerate((_CE_TAU_GRAY, _CE_TAU_BY, _CE_TAU_RG)):
        ci = c[i]
        m = ci.max()
        with np.errstate(invalid="ignore", divide="ignore"):
            rr = (ci * m) / (ci + m * _CE_SEMISATURATION) - tau
        out.append(np.where(rr > 1e-7, rr, 0.0))
    return out[0], out[1], out[2]


# ----------------------------------------------------------------------------
# Patch statistics (MATLAB nan-semantics)
# ----------------------------------------------------------------------------


def _patches(a: np.ndarray, nr: int, nc: int) -> np.ndarray:
    """(nr*8, nc*8) -> (nr, nc, 64); each patch's 64 values in column-major order."""
    ps = PATCH_SIZE
    return a.reshape(nr, ps, nc, ps).transpose(0, 2, 3, 1).reshape(nr, nc, ps * ps)


def _nanvar(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """MATLAB ``nanvar`` (N-1): one sample -> 0, no samples -> NaN."""
    valid = ~np.isnan(x)
    n = valid.sum(axis=axis)
    xz = np.where(valid, x, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = xz.sum(axis=axis) / n
        dev = np.where(valid, x - np.expand_dims(mean, axis), 0.0)
        var = (dev * dev).sum(axis=axis) / (n - 1)
    var = np.where(n == 1, 0.0, var)
    return np.where(n == 0, np.nan, var)


def _var(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Sample variance (N-1), like MATLAB ``var`` (NaN propagates)."""
    return np.var(x, axis=axis, ddof=1)


def _patch_entropy(gray_patches: np.ndarray) -> np.ndarray:
    """MATLAB ``entropy`` (256 bins, log2) of each patch of integer gray values."""
    shape = gray_patches.shape[:-1]
    npix = gray_patches.shape[-1]
    flat = gray_patches.reshape(-1, npix).astype(np.int64)
    n = flat.shape[0]
    idx = (np.arange(n, dtype=np.int64)[:, None] * 256 + flat).ravel()
    counts = np.bincount(idx, minlength=n * 256).reshape(n, 256)
    p = counts / npix
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(counts > 0, p * np.log2(np.where(counts > 0, p, 1.0)), 0.0)
    return (-terms.sum(axis=1)).reshape(shape)


# ----------------------------------------------------------------------------
# FADE
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FadeResult:
    """Full FADE output.

    Attributes:
        D: the FADE score, ``Df / (Dff + 1)`` (lower = less fog); NaN if no valid patch.
        Df: nanmean over patches of the distance to the fog-free model.
        Dff: nanmean over patches of the distance to the foggy model.
        D_map, Df_map, Dff_map: per-patch maps, float64 (H // 8, W // 8); map[r, c]
            is the patch in rows 8r..8r+7, columns 8c..8c+7 (NaN for skipped patches).
        log_features: float64 (H // 8, W // 8, 12), ``ln(1 + f1..f12)`` per patch.
        n_patches: number of 8x8 patches.
        n_nan_patches: patches skipped because a feature was NaN.
    """

    D: float
    Df: float
    Dff: float
    D_map: np.ndarray
    Df_map: np.ndarray
    Dff_map: np.ndarray
    log_features: np.ndarray
    n_patches: int
    n_nan_patches: int


def _patch_features(rgb_u8: np.ndarray) -> np.ndarray:
    """The 12 fog-aware features (before the log) per 8x8 patch: (nr, nc, 12).

    ``rgb_u8`` must already be cropped to multiples of 8 and hold at least one patch.
    """
    ps = PATCH_SIZE
    hgt, wid = rgb_u8.shape[:2]
    nr, nc = hgt // ps, wid // ps
    rgb = rgb_u8.astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    ig = matlab_gray(rgb_u8)

    rn, gn, bn = r / 255.0, g / 255.0, b / 255.0
    id_ = np.minimum(np.minimum(rn, gn), bn)
    vmax = np.maximum(np.maximum(rn, gn), bn)
    delta = vmax - id_
    with np.errstate(invalid="ignore", divide="ignore"):
        sat = np.where((delta > 0) & (vmax > 0), delta / vmax, 0.0)
    rg = r - g
    by = 0.5 * (r + g) - b

    window = _fspecial_gaussian(7, 7.0 / 6.0)
    filt = _imfilter_replicate(np.stack([ig, ig * ig]), window)
    mu = filt[0]
    sigma = np.sqrt(np.abs(filt[1] - mu * mu))
    mscn = (ig - mu) / (sigma + 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cv = sigma / mu
    cv[~np.isfinite(cv)] = np.nan  # 0/0 in black areas; guard +-Inf likewise (docs/metrics.md, f5)
    ce_gray, ce_by, ce_rg = _contrast_energy(rgb)

    pair = mscn * np.roll(mscn, 1, axis=0)  # circular: row 0 pairs with the last row

    def pat(a: np.ndarray) -> np.ndarray:
        return _patches(a, nr, nc)

    pair_p = pat(pair)
    rg_p, by_p = pat(rg), pat(by)
    feats = np.empty((nr, nc, 12), dtype=np.float64)
    feats[..., 0] = _nanvar(pat(mscn))
    feats[..., 1] = _nanvar(np.where(pair_p < 0, np.nan, pair_p))  # right: P >= 0
    feats[..., 2] = _nanvar(np.where(pair_p > 0, np.nan, pair_p))  # left: P <= 0
    feats[..., 3] = pat(sigma).mean(axis=-1)
    feats[..., 4] = pat(cv).mean(axis=-1)
    feats[..., 5] = pat(ce_gray).mean(axis=-1)
    feats[..., 6] = pat(ce_by).mean(axis=-1)
    feats[..., 7] = pat(ce_rg).mean(axis=-1)
    feats[..., 8] = _patch_entropy(pat(ig))
    feats[..., 9] = pat(id_).mean(axis=-1)
    feats[..., 10] = pat(sat).mean(axis=-1)
    feats[..., 11] = np.sqrt(_var(rg_p) + _var(by_p)) + 0.3 * np.sqrt(
        rg_p.mean(axis=-1) ** 2 + by_p.mean(axis=-1) ** 2
    )
    return feats


def _distances(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Df_p and Dff_p for log-feature rows ``x`` (P, 12), via Sherman-Morrison.

    Follows the release code: the test patch "covariance" is the scalar sample
    variance ``s_p`` of its own 12 log-features (NaN ignored) times the all-ones matrix.
    """
    s = _nanvar(x, axis=1)
    c = s / 2.0
    out = []
    for mu, a_inv, col_sums, u_ainv_u in _model_terms():
        m = mu[None, :] - x
        quad = np.einsum("pi,ij,pj->p", m, a_inv, m)
        um = m @ col_sums
        d2 = quad - c * um * um / (1.0 + c * u_ainv_u)
        out.append(np.sqrt(np.maximum(d2, 0.0)))
    return out[0], out[1]


def fade_details(image: np.ndarray) -> FadeResult:
    """FADE with all intermediates; see :func:`fade` for the input contract."""
    rgb = to_uint8_rgb(image, "FADE input")
    ps = PATCH_SIZE
    nr, nc = rgb.shape[0] // ps, rgb.shape[1] // ps
    if nr == 0 or nc == 0:
        empty = np.zeros((nr, nc), dtype=np.float64)
        return FadeResult(
            D=float("nan"), Df=float("nan"), Dff=float("nan"),
            D_map=empty, Df_map=empty.copy(), Dff_map=empty.copy(),
            log_features=np.zeros((nr, nc, 12)), n_patches=0, n_nan_patches=0,
        )
    rgb = rgb[: nr * ps, : nc * ps]
    feats = _patch_features(rgb)
    logf = np.log(1.0 + feats)
    df_map, dff_map = (d.reshape(nr, nc) for d in _distances(logf.reshape(-1, 12)))
    d_map = df_map / (dff_map + 1.0)
    valid = ~np.isnan(d_map)
    n_valid = int(valid.sum())
    if n_valid:
        df = float(np.mean(df_map[valid]))
        dff = float(np.mean(dff_map[valid]))
        score = df / (dff + 1.0)
    else:
        df = dff = score = float("nan")
    return FadeResult(
        D=score, Df=df, Dff=dff, D_map=d_map, Df_map=df_map, Dff_map=dff_map,
        log_features=logf, n_patches=nr * nc, n_nan_patches=nr * nc - n_valid,
    )


def fade(image_uint8_rgb: np.ndarray, return_map: bool = False) -> float | tuple[float, np.ndarray]:
    """FADE perceptual fog density of one image. **Lower is better** (less fog).

    Args:
        image_uint8_rgb: ``uint8`` (H, W, 3) RGB, 0..255 (extra channels such as alpha
            are dropped). A gray (H, W) image is copied into all three channels (the
            original code rejects gray input). Float input is taken as [0, 1] and
            converted with MATLAB ``uint8(255*x)`` (round half away from zero, clip);
            FADE depends on the 8-bit quantisation. The image is cropped to the top-left
            ``8*floor(H/8)`` x ``8*floor(W/8)`` pixels.
        return_map: also return the per-patch map.

    Returns:
        ``D`` (float >= 0, NaN when the image holds no 8x8 patch or every patch is
        invalid), or ``(D, D_map)`` with ``D_map`` float64 of shape (H // 8, W // 8)
        (NaN entries mark patches skipped, e.g. in black borders).
    """
    res = fade_details(image_uint8_rgb)
    if return_map:
        return res.D, res.D_map
    return res.D
