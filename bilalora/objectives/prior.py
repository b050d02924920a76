"""Prior: a CLIP-free, no-reference dehazing objective (works air-gapped).

All terms take the output ``y`` clamped to [0, 1] (:func:`~.base.clamp01`) and
the hazy input ``x`` in [0, 1], both (N, 3, H, W), and are computed in float32,
with autocast switched off (:func:`~.base.fp32_region`) so that a caller's
bf16 region does not reach the blur convolutions or the variances:

    dark      = mean_pixels( softmin_window15( softmin_channels(y) ) )
                soft dark channel (He et al.): haze density of the output.
                softmin_channels(v) = -tau * log( mean_RGB exp(-v / tau) );
                softmin_window(v)   = -tau * log( avgpool_15x15( exp(-v / tau) ) )
                (a log-mean-exp: between the window minimum and mean; tau = 0.02).
    exposure  = mean_patches( (avgpool_PxP(lum(y)) - E)^2 )         (Zero-DCE L_exp, P = 16)
                lum = channel mean; E = exposure_relative * mean lum(x) per image
                (default 0.8, clipped to [0.05, 0.95]), or the fixed
                exposure_target (0.6 as in Zero-DCE) when exposure_relative is 0/None.
                P = ``exposure_patch``; P = 0: (mean lum(y) - E)^2, the image's mean.
                Per patch, the term also charges every patch that is brighter or
                darker than E: the contrast between patches, which haze compresses and
                dehazing gives back. Measured (benchmarks/site_judge.py, real_day
                validation halves): LoRA on one level-3 block of DEA-Net lowered the
                prior mostly through this term (flatter patch luminance) and left FADE
                where it was (mean over the 8 blocks -0.4 / +1.2 / -2.8 % on three
                splits), while level-1 blocks lowered the dark term and FADE by 15-20 %;
                the search followed the objective to level 3. P = 0 kept the search
                off level 3 more often but lowered FADE less on the same sites, so
                16 stays the default and DEA-Net's prior search space is its level-1
                blocks instead (bilalora.backbones.DEA_NET_PRIOR_SITES).
    colour    = (mR - mG)^2 + (mR - mB)^2 + (mG - mB)^2                  (Zero-DCE L_col)
                m = per-image channel means of y (grey world).
    hue       = mean_p( |d - q u| + relu(-q) )  on 4 x 4 averages, where d = c_y - c_x,
                c_y = chroma(y - A), c_x = chroma(x - A), chroma(v) = v - lum(v) (the RGB
                vector minus its grey part), u = c_x / max(|c_x|, 0.01), q = <d, u>,
                A = the input's airlight (He et al.: brightest of the 0.1 % haziest pixels;
                ``hue_reference="grey"`` uses A = 0). The haze model J = (I - A) / t + A
                scales chroma(I - A) by 1/t >= 1 along its direction: free. New hues,
                desaturation, reversed hues (the cheap way to zero the dark channel:
                measured, a small network trained without this term learns orange/blue
                splits) and colour invented on grey input cost their magnitude. Relative to A, a tinted haze is removed
                rather than amplified (measured: with A = 0 a faint yellow tint in a foggy
                photo was blown up to colourfulness 29 against DCP's 10; with A, 11).
    structure = mean( 1 - cs'(lum(y), lum(x)) ),   Gaussian windows 11 x 11, sigma 1.5
                cs = (2 sigma_xy + C2) / (sigma_y^2 + sigma_x^2 + C2) (SSIM without its
                luminance factor, C2 = 0.03^2); cs' replaces the contrast part by 1 where
                the output has more local contrast than the input, i.e.
                cs' = (sigma_xy + C2/2) / (sigma_x sigma_y + C2/2) there. Gaining contrast
                (dehazing) is free; losing it (washing out, blur, black) or breaking the
                local structure (hallucination) costs. ``structure_max_gain`` g >= 1 bounds the
                free gain at min(g, 1 / t) x the input's local deviation (t: dark-channel
                transmission): the haze model scales local contrast by 1 / t, so more is
                amplified noise or JPEG blocks (the base's blotches in flat haze).

    range     = mean_RGB( low_c + (1 - high_c) ),  low_c / high_c = mean of the darkest /
                brightest ``range_fraction`` (1 %) of channel c's pixels (soft 1st / 99th
                percentiles: tail means, so every tail pixel gets gradient). Zero when each
                channel spans [0, 1], as after a per-channel 1-99 % contrast stretch
                (auto-levels). Haze is an additive veil (airlight) and a contrast loss: it
                lifts the black point and compresses the range; the dark term only pulls
                the local minima and is satisfied by darkening, so without this term the
                network darkens and flattens (measured: held-out FADE 0.458 -> 0.634,
                colourfulness 23.7 -> 16.4) while auto-levels on the base output reaches
                FADE 0.354. The bright end keeps the exposure from collapsing. Computed
                per training crop, so a large weight turns it into local tone mapping
                (weight 2: halos, texture painted into flat sky); default 0.5.
                ``range_gain`` g > 0 (default 2) asks instead for span >= min(1, g x the
                input's span) (relu of the shortfall; the haze model bounds the gain by
                1/t), so a crop of flat sky or fog is not stretched to the full range;
                g = 0 asks every crop to span [0, 1]. Measured (real_day validation
                halves, three seeds): g = 2 lowered PIQE against the stretch row by 5.7-7.4
                points of percent on every seed and entropy with it, by 0.2-1.1 points.

    bright    = mean_pixels( softmin_window15( softmin_channels(1 - y) ) )
                = 1 - soft bright channel of y (PSD, Chen et al. CVPR 2021, after the
                bright channel prior: in a well-exposed clear photo nearly every 15 x 15
                window holds a pixel with some channel near 1). The dark term alone is
                satisfied by darkening: on dense, flat haze (a smog-bound street, a city
                seen through smog) the adapted network's output went far darker than the
                base + stretch row's (brightness 0.25 against 0.55), which is most of its
                entropy deficit. This term pulls each window's brightest value up, locally,
                where the exposure term only asks for a patch mean and the range term only
                for the crop's brightest percent. Measured (real_day validation half,
                seed 0, the CPU preset): weight 0.25 / 0.5 / 1 lifted entropy from 1.7 %
                below the stretch row's to 0.8 % below / level / 0.7 % above and FADE
                from -38 % to -44 / -49 / -58 %, and raised PIQE from +7 % to +14 / +21 /
                +32 % above the stretch row's: lifting every window's brightest value
                lifts noisy shadows and sharpens (average gradient 12.5 -> 14.5 at 0.25).
                With ``range_gain`` 2, which lowers PIQE and entropy, weight 0.25 gives
                entropy back: the two together (the defaults since this version) met
                both side conditions of the method's targets on two of three validation
                halves, the previous defaults on one (README, "Bench"). Default 0.25.

    saturation = mean_p( relu( min(kappa relu(|c_x| - f) / t, c_max) - |c_y| ) )  on 4 x 4
                averages, c as in the hue term (chroma relative to the airlight A), t = the
                input's transmission by the dark channel prior (He et al.: t = 1 - 0.95
                dark(x / A), 15 x 15 minimum; no gradient; where t < 0.25, sky or dense fog,
                the term asks for nothing), kappa 0.5,
                c_max 0.3, f = 0.01 (input chroma below it has no reliable direction: noise,
                JPEG, a slightly wrong A; without f and with t down to 0.1, dense fog and
                skies took yellow-green casts).
                The haze model J = (I - A) / t + A scales chroma relative to A by 1/t;
                the hue term lets it grow but never asks for it, so the cheapest way to
                satisfy the dark and range terms was to leave chroma where the hazy
                input had it (measured: colourfulness fell below the base's). This
                one-sided term asks for a fraction kappa of the chroma the haze model
                predicts (half, so the DCP's error and noise in dense haze are not
                amplified), capped at c_max; exceeding it is free. Default weight 0
                (off) unless measurement says otherwise.

    detail    = mean_patches( relu( e(y) - g e(b) ) ),  e(v) = avgpool_8x8 |lum(v) - blur_s(lum(v))|
                b = the unadapted network's output on the same input (no gradient; bound by
                ``bilalora adapt``, see :meth:`Prior.bind_reference`), g = ``detail_gain``
                (default 1.5), s = ``detail_sigma`` (1 px). The fine-scale detail of the
                output may exceed the base network's by a factor g; beyond that it costs.
                The dark and range terms measure haze through extremes (a window's minimum,
                a channel's tails), and amplified fine texture, noise or compression blocks
                push extremes apart without removing any veil: measured on real_day's held-out
                photos, the adapted network's average gradient reached 1.8x the base's and
                PIQE (which scores noise and blockiness) rose above the base + stretch row's.
                Unlike ``haze_sigma`` (which hides fine scales from the haze terms and removed
                far less haze) this bounds only the excess, relative to what the base network
                already produces on this input, so coarse contrast stays free. Default weight
                0 (off); the shipped dea-net-s's registry options turn it on (weight 10, g = 2,
                with range_gain 3), chosen on real_day's validation halves: PIQE above the
                stretch row fell from +4.0 / -5.7 / -2.8 % to +3.4 / -3.2 / +0.9 % (the worst
                case lower, the best ones higher), entropy -1.8 / -1.8 / -1.5 %, FADE removed
                -30 / -30 / -32 % instead of -37 / -32 / -31 % (README, "Bench").

    L = dark_weight * dark + exposure_weight * exposure + colour_weight * colour
        + hue_weight * hue + structure_weight * structure + range_weight * range
        + saturation_weight * saturation + bright_weight * bright + detail_weight * detail

``haze_sigma`` s > 0 (default 0: off) computes the dark and range terms on the output
blurred by a Gaussian of standard deviation s pixels (the other terms see it unblurred).
Haze is a smooth veil, and both terms measure it through extremes: a window's darkest
value, a channel's darkest and brightest percent. Amplifying fine texture, noise or
compression blocks pushes those extremes apart without removing any veil (sharpening
darkens every local minimum), so on the unblurred output both terms reward it, and the
adapted network over-sharpens (measured on the held-out real_day photos: PIQE, which
scores noise and blockiness, rose above the base + stretch row's while FADE fell).
On the blurred output only structure at scales above s pixels can lower them.
Measured (real_day validation half, seed 0, the CPU preset): s = 1 and 2 removed far
less haze (FADE -18 % and -9 % against the default's -38 %), lowered entropy (3.8 % and
4.5 % below the stretch row's, the default 1.7 %) and lowered PIQE only a little (21.9
and 21.0 against the default's 22.3; the stretch row 20.9) although the average gradient
fell from 12.5 to 9.5 and 8.3: most of what FADE counts as removed haze is contrast at
the finest scales. Off by default.

``dark_floor`` (default 0) turns the dark term into mean(relu(dark_map - floor)), so
the output is not pushed below a residual haze level.
``last_terms`` holds ``prior.dark``, ``prior.exposure``, ``prior.colour``,
``prior.hue``, ``prior.structure``, ``prior.range``, ``prior.saturation``, ``prior.bright``, ``prior.detail``
(unweighted; the last three only when their weight is above 0) and ``prior`` (the weighted total).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import HazyCache, Objective, check_pair, clamp01, fp32_region

__all__ = ["Prior", "colour_term", "detail_excess_term", "estimate_airlight", "estimate_transmission",
           "exposure_term", "fine_detail", "gaussian_blur", "hue_term", "luminance", "range_term", "saturation_term",
           "soft_dark_channel", "structure_term"]

C2 = 0.03 ** 2
#: Stabiliser of the bounded-gain contrast factor: a deviation of 0.01 (2.5 levels of 8 bits),
#: smaller than SSIM's C2 so that amplified noise of a few levels is still seen.
C_GAIN = 0.01 ** 2


def luminance(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W): the channel mean (Zero-DCE's brightness)."""
    return images.mean(dim=1, keepdim=True)


def soft_dark_channel(images: torch.Tensor, window: int = 15, tau: float = 0.02) -> torch.Tensor:
    """Differentiable dark channel: (N, 3, H, W) in [0, 1] -> (N, 1, H, W), about in [0, 1]."""
    x = images.float()
    per_pixel = -tau * (torch.logsumexp(-x / tau, dim=1, keepdim=True) - math.log(x.shape[1]))
    shift = per_pixel.detach().amin(dim=(2, 3), keepdim=True)
    weights = torch.exp(-(per_pixel - shift) / tau)
    half = window // 2
    pooled = F.avg_pool2d(weights, (1, window), stride=1, padding=(0, half), count_include_pad=False)
    pooled = F.avg_pool2d(pooled, (window, 1), stride=1, padding=(half, 0), count_include_pad=False)
    return shift - tau * torch.log(pooled.clamp_min(1e-30))


def exposure_term(images: torch.Tensor, target, patch: int = 16) -> torch.Tensor:
    """Mean squared distance of ``patch`` x ``patch`` patch luminance to ``target`` (float or (N,) tensor); (N,).

    ``patch`` 0: the image's mean luminance (one patch), which asks for a brightness
    without penalising contrast between patches.
    """
    lum = luminance(images.float())
    if patch == 0:
        means = lum.mean(dim=(2, 3), keepdim=True)
    else:
        k = min(patch, lum.shape[-2], lum.shape[-1])
        means = F.avg_pool2d(lum, k, stride=k)
    if isinstance(target, torch.Tensor):
        target = target.view(-1, 1, 1, 1)
    return ((means - target) ** 2).mean(dim=(1, 2, 3))


def colour_term(images: torch.Tensor) -> torch.Tensor:
    """Grey-world: sum of squared differences of the channel means; (N,)."""
    m = images.float().mean(dim=(2, 3))
    r, g, b = m[:, 0], m[:, 1], m[:, 2]
    return (r - g) ** 2 + (r - b) ** 2 + (g - b) ** 2


def _hard_dark_channel(images: torch.Tensor, window: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W): channel minimum, then a ``window`` x ``window`` minimum filter."""
    return -F.max_pool2d(-images.amin(dim=1, keepdim=True), window, stride=1, padding=window // 2)


def estimate_airlight(hazy: torch.Tensor, window: int = 15, top_fraction: float = 0.001) -> torch.Tensor:
    """He et al.'s atmospheric light: (N, 3, H, W) in [0, 1] -> (N, 3), no gradient.

    Among the ``max(1, top_fraction * H * W)`` pixels with the highest (hard) dark
    channel, the one with the highest mean intensity.
    """
    with torch.no_grad():
        x = hazy.float()
        n, _, h, w = x.shape
        dark = _hard_dark_channel(x, window)
        k = max(1, int(top_fraction * h * w))
        index = dark.flatten(1).topk(k, dim=1).indices
        pixels = x.flatten(2).gather(2, index[:, None, :].expand(n, 3, k))
        best = pixels.mean(dim=1).argmax(dim=1)
        return pixels[torch.arange(n, device=x.device), :, best]


def hue_term(output: torch.Tensor, hazy: torch.Tensor, pool: int = 4, delta: float = 0.01,
             airlight: torch.Tensor | None = None) -> torch.Tensor:
    """Chroma change that dehazing cannot explain; (N,), >= 0 (RGB units, typically < 0.2).

    On ``pool`` x ``pool`` averages of ``v - A`` (``A`` = ``airlight`` (N, 3), or 0):
    c = chroma(v - A) = (v - A) - lum(v - A), d = c_y - c_x (the change),
    u = c_x / max(|c_x|, delta), q = <d, u>:

        hue = mean_pixels( |d - q u| + relu(-q) )

    The haze model J = (I - A) / t + A scales c by 1/t >= 1 along its direction, so
    its change is a non-negative multiple of u: free. Sideways changes (new hues),
    desaturation or reversal (complementary colours: the cheap way to zero the dark
    channel) and colour invented on grey input (|c_x| < delta) cost their magnitude.
    """
    y, x = output.float(), hazy.float()
    if airlight is not None:
        a = airlight.float().view(-1, 3, 1, 1)
        y, x = y - a, x - a
    k = min(pool, y.shape[-2], y.shape[-1])
    if k > 1:
        y, x = F.avg_pool2d(y, k, stride=k), F.avg_pool2d(x, k, stride=k)
    cy, cx = y - luminance(y), x - luminance(x)
    u = cx / cx.norm(dim=1, keepdim=True).clamp_min(delta)
    change = cy - cx
    q = (change * u).sum(dim=1, keepdim=True)
    perp = change - q * u
    off = torch.sqrt((perp * perp).sum(dim=1) + 1e-10)
    return (off + (-q[:, 0]).relu()).mean(dim=(1, 2))


def estimate_transmission(hazy: torch.Tensor, airlight: torch.Tensor, window: int = 15, omega: float = 0.95,
                          t_min: float = 0.1) -> torch.Tensor:
    """He et al.'s transmission: (N, 3, H, W) in [0, 1], airlight (N, 3) -> (N, 1, H, W) in [t_min, 1], no gradient."""
    with torch.no_grad():
        x = hazy.float() / airlight.float().view(-1, 3, 1, 1).clamp_min(1e-3)
        return (1.0 - omega * _hard_dark_channel(x, window)).clamp(t_min, 1.0)


def saturation_term(output: torch.Tensor, hazy: torch.Tensor, airlight: torch.Tensor, pool: int = 4,
                    kappa: float = 0.5, ceiling: float = 0.3, floor: float = 0.01,
                    t_min: float = 0.25, transmission: torch.Tensor | None = None) -> torch.Tensor:
    """Chroma shortfall against the haze model's prediction; (N,), >= 0 (RGB units).

    On ``pool`` x ``pool`` averages of ``v - A``:
    ``relu(min(kappa * relu(|c_x| - floor) / t, ceiling) - |c_y|)`` averaged over pixels,
    with ``c`` the chroma relative to the airlight ``A`` (N, 3) and ``t`` the input's
    dark-channel transmission (``transmission`` (N, 1, H, W), else :func:`estimate_transmission`).
    ``floor``: input chroma below it (its direction is noise, JPEG or a slightly wrong
    airlight) asks for nothing; where ``t < t_min`` (sky, dense fog: there the chroma of
    ``x - A`` is mostly the complement of the airlight's own tint) it asks for nothing
    either, so the gain is at most ``kappa / t_min``. Measured without them (floor 0, t
    clamped at 0.1): fog and sky took yellow-green casts; with t clamped at 0.2 instead
    of skipped, faint cream-pink casts in flat skies.
    """
    y, x = output.float(), hazy.float()
    t = estimate_transmission(x, airlight, t_min=1e-3) if transmission is None else transmission.float()
    a = airlight.float().view(-1, 3, 1, 1)
    y, x = y - a, x - a
    k = min(pool, y.shape[-2], y.shape[-1])
    if k > 1:
        y, x, t = F.avg_pool2d(y, k, stride=k), F.avg_pool2d(x, k, stride=k), F.avg_pool2d(t, k, stride=k)
    cy, cx = y - luminance(y), x - luminance(x)
    size_y = torch.sqrt((cy * cy).sum(dim=1) + 1e-10)
    target = (kappa * (cx.norm(dim=1) - floor).relu() / t[:, 0]).clamp(max=ceiling)
    target = torch.where(t[:, 0] >= t_min, target, torch.zeros_like(target))
    return (target - size_y).relu().mean(dim=(1, 2))


def _tails(images: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    v = images.float().flatten(2)
    k = max(1, int(round(fraction * v.shape[-1])))
    return -torch.topk(-v, k, dim=-1).values.mean(dim=-1), torch.topk(v, k, dim=-1).values.mean(dim=-1)


def range_term(images: torch.Tensor, fraction: float = 0.01, hazy: torch.Tensor | None = None,
               gain: float = 0.0) -> torch.Tensor:
    """Per-channel dynamic range shortfall: mean_c( low_c + 1 - high_c ); (N,), in [0, 2].

    ``low_c`` / ``high_c``: mean of the lowest / highest ``fraction`` of channel c's
    values (soft 1st / 99th percentiles). Haze lifts the black point and compresses
    the range (airlight veil); a per-channel auto-levels stretch zeroes this term.
    """
    low, high = _tails(images, fraction)
    if gain > 0 and hazy is not None:
        low_x, high_x = _tails(hazy, fraction)
        target = (gain * (high_x - low_x)).clamp(max=1.0)
        return (target - (high - low)).relu().mean(dim=1)
    return (low + 1.0 - high).mean(dim=1)


def _gaussian(window: int, sigma: float, device, dtype) -> torch.Tensor:
    coords = torch.arange(window, device=device, dtype=dtype) - (window - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _blur(maps: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of every channel of (N, C, H, W), replicate borders."""
    k, c = g.numel(), maps.shape[1]
    x = F.pad(maps, (k // 2, k // 2, k // 2, k // 2), mode="replicate")
    x = F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H, W): Gaussian blur of ``sigma`` pixels (window 2 ceil(3 sigma) + 1, edge replicated)."""
    half = max(1, math.ceil(3 * sigma))
    return _blur(images, _gaussian(2 * half + 1, sigma, images.device, images.dtype))


def structure_term(output: torch.Tensor, hazy: torch.Tensor, window: int = 11, sigma: float = 1.5,
                   max_gain: float = 0.0, transmission: torch.Tensor | None = None) -> torch.Tensor:
    """1 - mean of the one-sided SSIM contrast-structure map on luminance; (N,), in [0, 2].

    ``max_gain`` g > 0 bounds the free contrast gain: where the output's local standard
    deviation exceeds ``sd_x * b`` with ``b = min(g, 1 / t)`` (``t``: ``transmission``
    (N, 1, H, W), or 1 / g everywhere when None), the contrast part compares it with
    ``sd_x * b`` instead of being 1. The haze model scales local contrast by 1 / t, so
    more than that is amplified noise or compression blocks, not removed haze.
    """
    y = luminance(output.float())
    x = luminance(hazy.float())
    g = _gaussian(window, sigma, y.device, y.dtype)
    mu_y, mu_x, yy, xx, xy = _blur(torch.cat([y, x, y * y, x * x, x * y], dim=1), g).unbind(dim=1)
    var_y = (yy - mu_y ** 2).clamp_min(0.0)
    var_x = (xx - mu_x ** 2).clamp_min(0.0)
    cov = xy - mu_x * mu_y
    sd_y = torch.sqrt(var_y + 1e-12)
    sd_x = torch.sqrt(var_x + 1e-12)
    cs = (2 * cov + C2) / (var_y + var_x + C2)
    s_only = (cov + C2 / 2) / (sd_y * sd_x + C2 / 2)
    cs = torch.where(var_y >= var_x, s_only, cs)
    if max_gain > 0:
        bound = torch.full_like(sd_x, float(max_gain))
        if transmission is not None:
            bound = torch.minimum(bound, 1.0 / transmission.float()[:, 0].clamp_min(1e-3))
        sd_cap = sd_x * bound
        capped = s_only * (2 * sd_cap * sd_y + C_GAIN) / (sd_cap ** 2 + var_y + C_GAIN)
        cs = torch.where(sd_y > sd_cap, capped, cs)
    return (1.0 - cs).mean(dim=(1, 2))


def fine_detail(images: torch.Tensor, sigma: float = 1.0, pool: int = 8) -> torch.Tensor:
    """Local fine-scale detail: (N, 3, H, W) in [0, 1] -> (N, 1, H / pool, W / pool), >= 0.

    ``avgpool_pool( |lum - gaussian_blur(lum, sigma)| )``: the mean absolute high-pass
    of the luminance per ``pool`` x ``pool`` patch (luminance units).
    """
    lum = luminance(images.float())
    high = (lum - gaussian_blur(lum, sigma)).abs()
    k = min(pool, high.shape[-2], high.shape[-1])
    return F.avg_pool2d(high, k, stride=k)


def detail_excess_term(output: torch.Tensor, reference: torch.Tensor, gain: float = 1.5, sigma: float = 1.0,
                       pool: int = 8) -> torch.Tensor:
    """Fine detail of ``output`` beyond ``gain`` x the ``reference``'s; (N,), >= 0 (luminance units).

    ``mean_patches( relu( d(output) - gain * d(reference) ) )`` with ``d`` = :func:`fine_detail`;
    output and reference (N, 3, H, W) in [0, 1] of one size; the reference gets no gradient.
    """
    excess = fine_detail(output, sigma, pool) - gain * fine_detail(reference.detach(), sigma, pool)
    return excess.relu().mean(dim=(1, 2, 3))


class Prior(Objective):
    """No-reference dehazing prior; formulas in the module docstring.

    Args:
        dark_weight: weight of the dark-channel haze density.
        exposure_weight: weight of the patch exposure term.
        colour_weight: weight of the grey-world term.
        structure_weight: weight of the structure-preservation term.
        hue_weight: weight of the chroma-direction (hue) term.
        exposure_target: fixed E for the exposure term (Zero-DCE's 0.6); used only
            when ``exposure_relative`` is None or 0.
        exposure_relative: E = this factor times the input's mean luminance, per
            image, clipped to [0.05, 0.95]; None or 0 = use ``exposure_target``.
        dark_window: dark-channel window (15 as in He et al.).
        tau: softness of the minima (smaller = closer to a hard minimum).
        dark_floor: residual haze level below which the dark term stops pulling.
        hue_reference: ``"airlight"`` (chroma relative to the input's estimated
            airlight) or ``"grey"`` (relative to the grey axis).
        range_weight: weight of the per-channel dynamic-range term.
        range_fraction: tail size of the range term's soft percentiles (0.01 = 1-99 %).
        range_gain: 2 (default): the range term asks each channel for a span of
            min(1, g x the input's span); 0: a span of [0, 1] on every crop.
        saturation_weight: weight of the one-sided chroma term (haze-model prediction).
        saturation_kappa: fraction of the predicted chroma asked for.
        bright_weight: weight of the bright-channel term (1 - soft bright channel);
            default 0.25.
        haze_sigma: 0 (default): the dark and range terms see the output as is; s > 0:
            they see it blurred by a Gaussian of s pixels (fine texture and noise then
            cannot lower them; see the module docstring).
        structure_max_gain: 0 (default): gaining local contrast is free; g >= 1: free up
            to min(g, 1/t) x the input's (t: the input's dark-channel transmission).
        exposure_patch: side of the exposure term's patches (16: Zero-DCE's); 0: the
            image's mean luminance only (contrast between patches costs nothing).
        detail_weight: weight of the detail-excess term (0: off); above 0 the objective
            needs the unadapted network's output (:meth:`bind_reference`).
        detail_gain: how many times the base network's fine detail is free (>= 1).
        detail_sigma: the high-pass scale of the detail term, in pixels.

    The range term (weight 0.5) was chosen on real_day's held-out split with a reduced
    schedule (``benchmarks/results/adapt_eval_day_reduced_range.json``): FADE 0.458
    (base) -> 0.312, below the base + contrast-stretch row (0.354); without it 0.634.
    Weight 2 reached FADE 0.156 but painted halos and texture into skies (PIQE 27.5).
    ``range_gain`` 2 and the bright term (0.25) were chosen on real_day's validation
    halves of three seeds with the shipped dea-net-s and the ``cpu`` preset
    (``benchmarks/results/objective_val_day_3ca219c1.json``).

    Defaults (dark 1, exposure 4, colour 2, hue 4, structure 2, exposure_relative
    0.8) come from ``benchmarks/prior_weights.py`` on 68 real daytime hazy images
    (results in ``benchmarks/results/prior_weights.json``, with this version's range
    gain 2 and bright term 0.25): DCP's output scores better than the hazy input on
    100 % of them (99 % before the range term), better than black, washed-out,
    blurred, colour-cast, dimmed and hue-swapped outputs on 99-100 %, better than DCP
    with tripled saturation on 75 % (82 % without the bright term and the range
    gain, 88 % before the range term: a wider span scores better). The fixed
    Zero-DCE target E = 0.6 prefers the hazy input on more than half the images (DCP
    wins on 41 %; 46 % before this version, 31 % without the range term): dehazing
    darkens, DCP's mean luminance is 0.66x the input's (median). These are sanity checks, not a
    tuning for adaptation quality.

    Call: ``prior(output, hazy)``, both (N, 3, H, W) of one size, hazy in [0, 1];
    returns a 0-d float32 loss (>= 0).
    """

    name = "prior"

    def __init__(
        self,
        dark_weight: float = 1.0,
        exposure_weight: float = 4.0,
        colour_weight: float = 2.0,
        structure_weight: float = 2.0,
        hue_weight: float = 4.0,
        exposure_target: float = 0.6,
        exposure_relative: float | None = 0.8,
        dark_window: int = 15,
        tau: float = 0.02,
        dark_floor: float = 0.0,
        hue_reference: str = "airlight",
        range_weight: float = 0.5,
        range_fraction: float = 0.01,
        range_gain: float = 2.0,
        saturation_weight: float = 0.0,
        saturation_kappa: float = 0.5,
        structure_max_gain: float = 0.0,
        exposure_patch: int = 16,
        haze_sigma: float = 0.0,
        bright_weight: float = 0.25,
        detail_weight: float = 0.0,
        detail_gain: float = 1.5,
        detail_sigma: float = 1.0,
    ) -> None:
        super().__init__()
        weights = {"dark_weight": dark_weight, "exposure_weight": exposure_weight,
                   "colour_weight": colour_weight, "hue_weight": hue_weight,
                   "structure_weight": structure_weight, "range_weight": range_weight,
                   "saturation_weight": saturation_weight, "bright_weight": bright_weight,
                   "detail_weight": detail_weight}
        for key, value in weights.items():
            if not (float(value) >= 0.0 and float(value) < float("inf")):
                raise UserError(f"prior {key} must be a finite number >= 0, got {value!r}")
        if not 0.0 < float(exposure_target) < 1.0:
            raise UserError(f"prior exposure_target must lie in (0, 1), got {exposure_target!r}")
        if exposure_relative is not None and not float(exposure_relative) >= 0.0:
            raise UserError(
                f"prior exposure_relative must be >= 0 (0 = use exposure_target), got {exposure_relative!r}")
        if exposure_relative is not None and float(exposure_relative) == 0.0:
            exposure_relative = None
        if int(dark_window) != dark_window or dark_window < 1 or dark_window % 2 == 0:
            raise UserError(f"prior dark_window must be an odd positive integer, got {dark_window!r}")
        if not float(tau) > 0.0:
            raise UserError(f"prior tau must be > 0, got {tau!r}")
        if not 0.0 <= float(dark_floor) < 1.0:
            raise UserError(f"prior dark_floor must lie in [0, 1), got {dark_floor!r}")
        self.dark_floor = float(dark_floor)
        if not 0.0 < float(range_fraction) <= 0.5:
            raise UserError(f"prior range_fraction must lie in (0, 0.5], got {range_fraction!r}")
        self.range_fraction = float(range_fraction)
        self.range_gain = float(range_gain)
        if not 0.0 < float(saturation_kappa) <= 1.0:
            raise UserError(f"prior saturation_kappa must lie in (0, 1], got {saturation_kappa!r}")
        self.saturation_kappa = float(saturation_kappa)
        if not (0.0 <= float(structure_max_gain) < float("inf")) or 0 < float(structure_max_gain) < 1:
            raise UserError(f"prior structure_max_gain must be 0 (unbounded) or >= 1, got {structure_max_gain!r}")
        self.structure_max_gain = float(structure_max_gain)
        if int(exposure_patch) != exposure_patch or exposure_patch < 0:
            raise UserError(f"prior exposure_patch must be 0 (the image mean) or a positive integer, got {exposure_patch!r}")
        self.exposure_patch = int(exposure_patch)
        if not 0.0 <= float(haze_sigma) <= 8.0:
            raise UserError(f"prior haze_sigma must lie in [0, 8] pixels (0 = off), got {haze_sigma!r}")
        self.haze_sigma = float(haze_sigma)
        if not 1.0 <= float(detail_gain) < float("inf"):
            raise UserError(f"prior detail_gain must be a finite number >= 1, got {detail_gain!r}")
        if not 0.3 <= float(detail_sigma) <= 8.0:
            raise UserError(f"prior detail_sigma must lie in [0.3, 8] pixels, got {detail_sigma!r}")
        self.detail_gain, self.detail_sigma = float(detail_gain), float(detail_sigma)
        self._reference = None
        self._reference_cache = HazyCache()
        if hue_reference not in ("airlight", "grey"):
            raise UserError(f"prior hue_reference must be 'airlight' or 'grey', got {hue_reference!r}")
        self.hue_reference = hue_reference
        self.weights = {k: float(v) for k, v in weights.items()}
        self.exposure_target = float(exposure_target)
        self.exposure_relative = None if exposure_relative is None else float(exposure_relative)
        self.dark_window = int(dark_window)
        self.tau = float(tau)

    def terms(self, output: torch.Tensor, hazy: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted terms, each (N,) float32 (output clamped to [0, 1] first)."""
        check_pair(self.name, output, hazy, same_size=True)
        with fp32_region(output):
            y = clamp01(output.float())
            x = hazy.detach().float().clamp(0.0, 1.0)
            if self.exposure_relative is not None:
                target = (self.exposure_relative * luminance(x).mean(dim=(1, 2, 3))).clamp(0.05, 0.95)
            else:
                target = self.exposure_target
            saturation = self.weights["saturation_weight"] > 0
            needs_airlight = self.hue_reference == "airlight" or saturation or self.structure_max_gain > 0
            airlight = estimate_airlight(x) if needs_airlight else None
            # one raw transmission for both users; the structure bound keeps its t >= 0.1 clamp
            t = estimate_transmission(x, airlight, t_min=1e-3) if saturation or self.structure_max_gain > 0 else None
            veil = gaussian_blur(y, self.haze_sigma) if self.haze_sigma > 0 else y
            terms = {
                "dark": (soft_dark_channel(veil, self.dark_window, self.tau) - self.dark_floor).relu().mean(
                    dim=(1, 2, 3)),
                "exposure": exposure_term(y, target, self.exposure_patch),
                "colour": colour_term(y),
                "hue": hue_term(y, x, airlight=airlight if self.hue_reference == "airlight" else None),
                "structure": structure_term(y, x, max_gain=self.structure_max_gain,
                                            transmission=None if t is None else t.clamp_min(0.1)),
                "range": range_term(veil, self.range_fraction, x, self.range_gain),
            }
            if saturation:
                terms["saturation"] = saturation_term(y, x, airlight, kappa=self.saturation_kappa, transmission=t)
            if self.weights["bright_weight"] > 0:
                terms["bright"] = soft_dark_channel(1.0 - y, self.dark_window, self.tau).mean(dim=(1, 2, 3))
            if self.weights["detail_weight"] > 0:
                terms["detail"] = detail_excess_term(y, self._reference_output(hazy), self.detail_gain,
                                                     self.detail_sigma)
            return terms

    @property
    def wants_reference(self) -> bool:  # type: ignore[override]
        return self.weights["detail_weight"] > 0

    def bind_reference(self, reference) -> None:
        """``reference(hazy) -> (N, 3, H, W)``: the unadapted network's output (used by the detail term)."""
        self._reference = reference
        self._reference_cache.clear()

    def _reference_output(self, hazy: torch.Tensor) -> torch.Tensor:
        """The bound reference's output on ``hazy``, clamped to [0, 1], float32, once per batch."""
        if self._reference is None:
            raise UserError("prior(detail=...) compares the output with the unadapted network's output, which only "
                            "`bilalora adapt` provides; set detail=0 to score outputs on their own")

        def compute(batch: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self._reference(batch).float().clamp(0.0, 1.0)

        return self._reference_cache.get(hazy, compute)

    def forward(self, output: torch.Tensor, hazy: torch.Tensor) -> torch.Tensor:
        terms = {k: v.mean() for k, v in self.terms(output, hazy).items()}
        with fp32_region(output):
            loss = sum(self.weights[f"{k}_weight"] * v for k, v in terms.items())
        self._record(prior=loss, **{f"prior.{k}": v for k, v in terms.items()})
        return loss

    def describe(self) -> dict:
        return {
            "name": self.name,
            "weights": {k.replace("_weight", ""): v for k, v in self.weights.items()},
            "exposure_target": self.exposure_target,
            "exposure_relative": self.exposure_relative,
            "dark_window": self.dark_window,
            "dark_floor": self.dark_floor,
            "hue_reference": self.hue_reference,
            "tau": self.tau,
            "range_fraction": self.range_fraction,
            "range_gain": self.range_gain,
            "saturation_kappa": self.saturation_kappa,
            "structure_max_gain": self.structure_max_gain,
            "exposure_patch": self.exposure_patch,
            "haze_sigma": self.haze_sigma,
            "detail_gain": self.detail_gain,
            "detail_sigma": self.detail_sigma,
            "clamp": "inward pass-through",
        }
