"""H2C: the haze-to-clear text-directed CLIP loss (docs/method.md, "H2C").

With n(v) = v / ||v|| and CLIP encoders E_I (image) and E_T (text):

    mode "both" (default, the paper's H2C):
        d_img  = n( n(E_I(out)) - n(E_I(in)) )
        d_text = n( n(E_T(pos)) - n(E_T(neg)) )
        L      = mean_batch( 1 - <d_img, d_text> )                    in [0, 2]
    mode "positive" (ablation: only the positive prompt):
        L      = mean_batch( 1 - <n(E_I(out)), n(E_T(pos))> )          in [0, 2]
    mode "negative" (ablation: only the negative prompt):
        L      = mean_batch( 1 + <n(E_I(out)), n(E_T(neg))> )          in [0, 2]

The backbone sees [0, 1] images; only the copies fed to CLIP are clamped
(:func:`~bilalora.objectives.base.clamp01`), resized to CLIP's input size
(224 x 224 for ViT-B/32; bicubic, antialiased) and normalised with the model's
mean/std. Text features are computed once at construction; E_I(in) is computed
under ``torch.no_grad`` once per hazy batch (:meth:`H2C.prepare`, or the first
call with that tensor; later calls with the same, unmodified tensor reuse it);
the CLIP weights are frozen and are not reachable through any ``.parameters()``
(an objective is not an ``nn.Module``).

Precision: the loss is computed in float32 with autocast off, whatever region
the caller is in. CLIP's own forward runs in ``precision`` (``"auto"``: bf16
autocast on CUDA where supported, float32 elsewhere); its input resizing and
normalisation, the embedding normalisation and the loss stay in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import HazyCache, Objective, check_pair, clamp01, fp32_region
from .clip_loader import LoadedClip, load_clip

__all__ = ["DEFAULT_NEGATIVE", "DEFAULT_POSITIVE", "H2C", "MODES", "NIGHT_NEGATIVE", "h2c_from_embeddings"]

DEFAULT_NEGATIVE = "a photo with haze"
DEFAULT_POSITIVE = "a clear photo"
NIGHT_NEGATIVE = "a photo with nighttime haze"
MODES = ("both", "positive", "negative")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_EPS = 1e-8


def _n(v: torch.Tensor) -> torch.Tensor:
    return F.normalize(v.float(), dim=-1, eps=_EPS)


def h2c_from_embeddings(
    out_emb: torch.Tensor | None,
    in_emb: torch.Tensor | None,
    pos_emb: torch.Tensor | None,
    neg_emb: torch.Tensor | None,
    mode: str = "both",
    reduction: str = "mean",
) -> torch.Tensor:
    """The H2C loss on embeddings (need not be normalised; all are normalised here).

    Args:
        out_emb: (N, D) image embeddings of the outputs.
        in_emb: (N, D) image embeddings of the hazy inputs (mode "both" only).
        pos_emb: (D,) or (1, D) positive-prompt text embedding (modes "both", "positive").
        neg_emb: (D,) or (1, D) negative-prompt text embedding (modes "both", "negative").
        mode: ``"both"``, ``"positive"`` or ``"negative"`` (formulas in the module docstring).
        reduction: ``"mean"`` (0-d) or ``"none"`` ((N,) per image).

    Returns:
        The loss, in [0, 2], float32.
    """
    if mode == "both":
        d_img = _n(_n(out_emb) - _n(in_emb))
        d_text = _n(_n(pos_emb) - _n(neg_emb)).reshape(1, -1)
        per_image = 1.0 - (d_img * d_text).sum(-1)
    elif mode == "positive":
        per_image = 1.0 - (_n(out_emb) * _n(pos_emb).reshape(1, -1)).sum(-1)
    elif mode == "negative":
        per_image = 1.0 + (_n(out_emb) * _n(neg_emb).reshape(1, -1)).sum(-1)
    else:
        raise UserError(f"H2C mode must be one of {', '.join(MODES)}, got {mode!r}")
    if reduction == "none":
        return per_image
    return per_image.mean()


class H2C(Objective):
    """Haze-to-clear CLIP loss; see the module docstring for the formulas.

    Args:
        clip: open_clip architecture (``--clip``); None = ``ViT-B-32-quickgelu``
            (or the stem of ``clip_config``).
        pretrained: weights (``--clip-pretrained``): tag, file, ``local-dir:DIR``,
            ``hf-hub:ORG/REPO``; None = ``$BILALORA_CLIP_PRETRAINED`` or ``openai``.
        clip_config: JSON architecture to register (``--clip-config``).
        negative: negative prompt; None = "a photo with haze" (or the night prompt).
        positive: positive prompt; None = "a clear photo".
        night: use "a photo with nighttime haze" as the default negative prompt.
        mode: ``"both"`` | ``"positive"`` | ``"negative"`` (ablations).
        precision: CLIP's forward precision: ``"auto"`` (bf16 on CUDA where supported, else
            fp32), ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast around CLIP only).
        device: where to load CLIP (move later with :meth:`to`).
        loaded: an already loaded :class:`LoadedClip` (skips loading; tests, sharing).

    Call: ``h2c(output, hazy)`` with output (N, 3, H, W) (raw backbone output,
    clamped to [0, 1] for CLIP only) and hazy (N, 3, H', W') in [0, 1];
    returns a 0-d float32 loss in [0, 2]. ``last_terms``: ``{"h2c": loss}``.
    """

    name = "h2c"

    def __init__(
        self,
        clip: str | None = None,
        pretrained: str | None = None,
        clip_config: str | None = None,
        negative: str | None = None,
        positive: str | None = None,
        night: bool = False,
        mode: str = "both",
        device: str = "cpu",
        loaded: LoadedClip | None = None,
        precision: str = "auto",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise UserError(f"H2C mode must be one of {', '.join(MODES)}, got {mode!r}")
        if precision not in PRECISIONS:
            raise UserError(f"H2C precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self._hazy = HazyCache()
        self.mode = mode
        self.night = bool(night)
        self.negative = negative if negative else (NIGHT_NEGATIVE if night else DEFAULT_NEGATIVE)
        self.positive = positive if positive else DEFAULT_POSITIVE
        clip_info = loaded if loaded is not None else load_clip(clip, pretrained, clip_config, device=device)
        # A plain attribute of a plain object: never registered, never in an optimiser.
        self.clip = clip_info
        self.model = clip_info.model
        self.image_size = clip_info.image_size
        self.device = next(self.model.parameters()).device
        self._mean = torch.tensor(clip_info.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(clip_info.std, dtype=torch.float32).view(1, 3, 1, 1)
        with torch.no_grad():
            tokens = clip_info.tokenizer([self.positive, self.negative]).to(self.device)
            text = self.model.encode_text(tokens).float()
        self.pos_emb, self.neg_emb = text[0].clone(), text[1].clone()
        self._move(self.device)

    # -- pieces --------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, 3, S, S) float32 CLIP input (resized, mean/std-normalised).

        S x S is the model's input size (224 x 224 for ViT-B/32); the resize is
        bicubic with antialiasing and skipped when the size already fits.
        """
        x = images.float()
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        return (x - self._mean.to(x.device)) / self._std.to(x.device)

    def clip_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype CLIP's forward runs in on ``device`` (see ``precision``)."""
        if self.precision == "fp32":
            return torch.float32
        if self.precision == "auto":
            if device.type == "cuda" and torch.cuda.is_bf16_supported():
                return torch.bfloat16
            return torch.float32
        return _DTYPES[self.precision]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, D) raw (unnormalised) float32 CLIP image embeddings.

        Resizing and normalisation run in float32; CLIP's forward in :meth:`clip_dtype`.
        """
        with fp32_region(images):
            x = self.preprocess(images)
            dtype = self.clip_dtype(x.device)
            if dtype == torch.float32:
                return self.model.encode_image(x).float()
            with torch.autocast(device_type=x.device.type, dtype=dtype):
                return self.model.encode_image(x).float()

    def prepare(self, hazy: torch.Tensor) -> None:
        """Encode the hazy batch (N, 3, H, W) in [0, 1] once; calls with this tensor reuse it."""
        if self.mode == "both":
            self._hazy_embedding(hazy)

    def _hazy_embedding(self, hazy: torch.Tensor) -> torch.Tensor:
        def encode(tensor: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.encode_image(tensor.detach().clamp(0.0, 1.0))

        return self._hazy.get(hazy, encode)

    # -- protocol --------------------------------------------------------------------
    def forward(self, output: torch.Tensor, hazy: torch.Tensor) -> torch.Tensor:
        check_pair(self.name, output, hazy, same_size=False)
        with fp32_region(output):
            out_emb = self.encode_image(clamp01(output.float()))
            in_emb = self._hazy_embedding(hazy) if self.mode == "both" else None
            loss = h2c_from_embeddings(out_emb, in_emb, self.pos_emb, self.neg_emb, self.mode)
        self._record(h2c=loss)
        return loss

    def describe(self) -> dict:
        return {
            "name": self.name,
            "mode": self.mode,
            "negative": self.negative,
            "positive": self.positive,
            "night": self.night,
            "clip": self.clip.name,
            "pretrained": self.clip.source,
            "pretrained_route": self.clip.route,
            "image_size": list(self.image_size),
            "mean": list(self.clip.mean),
            "std": list(self.clip.std),
            "precision": self.precision,
            "clamp": "inward pass-through",
        }

    def _move(self, device: torch.device) -> None:
        self._hazy.clear()
        self.model.to(device)
        self._mean = self._mean.to(device)
        self._std = self._std.to(device)
        self.pos_emb = self.pos_emb.to(device)
        self.neg_emb = self.neg_emb.to(device)
