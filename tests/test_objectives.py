"""Tests for bilalora.objectives: H2C (tiny open_clip model, real loading path), Prior, composition.

The CLIP model is a tiny architecture (tests/assets/tiny_clip.json) registered through
the ``clip_config`` argument, with randomly initialised weights written to files by the
test and loaded back through ``pretrained=FILE`` / ``local-dir:DIR``. No network.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bilalora.errors import UserError
from bilalora.objectives import (
    H2C,
    Composite,
    Objective,
    Prior,
    build_objective,
    clamp01,
    clip_loader,
    h2c_from_embeddings,
    list_objectives,
    parse_spec,
    parse_spec_options,
    register_objective,
    spec_text,
)
from bilalora.objectives.h2c import NIGHT_NEGATIVE
from bilalora.objectives.prior import detail_excess_term, estimate_airlight, fine_detail, gaussian_blur, range_term

ASSETS = Path(__file__).parent / "assets"
TINY = ASSETS / "tiny_clip.json"


# ----------------------------------------------------------------------------
# fixtures / helpers
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> dict[str, Path]:
    """Random tiny-CLIP weights as .pt (torch.save) and .safetensors files."""
    folder = tmp_path_factory.mktemp("clip")
    return {
        "pt": clip_loader.save_random_checkpoint(folder / "tiny.pt", clip_config=TINY, seed=0),
        "safetensors": clip_loader.save_random_checkpoint(folder / "tiny.safetensors", clip_config=TINY, seed=0),
    }


@pytest.fixture(scope="module")
def tiny_loaded(tiny_weights):
    return clip_loader.load_clip(pretrained=str(tiny_weights["pt"]), clip_config=str(TINY))


def tiny_h2c(tiny_loaded, **kwargs) -> H2C:
    """An H2C on the already loaded tiny CLIP (loading itself is tested separately)."""
    return H2C(loaded=tiny_loaded, **kwargs)


def textured(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """A synthetic textured scene J in [0, 1], (n, 3, size, size)."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for _ in range(n):
        f = torch.rand(3, generator=gen) * 6 + 2
        scene = torch.stack([
            0.5 + 0.4 * torch.sin(2 * math.pi * f[0] * xx),
            0.5 + 0.4 * torch.cos(2 * math.pi * f[1] * yy),
            0.5 + 0.3 * torch.sin(2 * math.pi * f[2] * (xx + yy)),
        ])
        scene = scene + 0.03 * torch.randn(scene.shape, generator=gen)
        images.append(scene.clamp(0, 1))
    return torch.stack(images)


# ----------------------------------------------------------------------------
# CLIP loading
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pt", "safetensors"])
def test_h2c_loads_tiny_clip_frozen(tiny_weights, kind):
    obj = H2C(pretrained=str(tiny_weights[kind]), clip_config=str(TINY))
    assert obj.clip.name == "tiny_clip" and obj.clip.route == "file"
    assert obj.image_size == (224, 224)
    assert not obj.model.training
    assert all(not p.requires_grad for p in obj.model.parameters())
    assert not isinstance(obj, nn.Module)
    desc = obj.describe()
    json.dumps(desc)
    assert desc["clip"] == "tiny_clip" and desc["pretrained"] == str(tiny_weights[kind])
    assert desc["negative"] == "a photo with haze" and desc["positive"] == "a clear photo" and desc["mode"] == "both"


def test_both_checkpoint_formats_hold_the_same_weights(tiny_weights):
    a = clip_loader.load_clip(pretrained=str(tiny_weights["pt"]), clip_config=TINY).model.state_dict()
    b = clip_loader.load_clip(pretrained=str(tiny_weights["safetensors"]), clip_config=TINY).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_clip_params_never_reachable_as_trainable(tiny_loaded):
    obj = tiny_h2c(tiny_loaded)

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.objective = obj  # a plain attribute: not a registered submodule

    net = Backbone()
    assert len(list(net.parameters())) == 2
    net.train()
    assert not obj.model.training
    out = net.conv(torch.rand(1, 3, 32, 32))
    obj(out, torch.rand(1, 3, 32, 32)).backward()
    assert net.conv.weight.grad is not None
    assert all(p.grad is None for p in obj.model.parameters())


def test_text_features_computed_once(tiny_weights, monkeypatch):
    from open_clip.model import CLIP

    calls = []
    original = CLIP.encode_text

    def counting(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CLIP, "encode_text", counting)
    obj = H2C(pretrained=str(tiny_weights["pt"]), clip_config=str(TINY))
    assert calls == [False]  # both prompts in one call, without grad
    for _ in range(3):
        obj(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32))
    assert len(calls) == 1


def test_gradient_reaches_output_not_hazy(tiny_loaded, monkeypatch):
    obj = tiny_h2c(tiny_loaded)
    grad_modes = []
    original = obj.model.encode_image

    def spy(images, *args, **kwargs):
        grad_modes.append(torch.is_grad_enabled())
        assert images.shape[-2:] == (224, 224)
        return original(images, *args, **kwargs)

    monkeypatch.setattr(obj.model, "encode_image", spy)
    output = torch.rand(2, 3, 40, 56, requires_grad=True)
    hazy = torch.rand(2, 3, 40, 56, requires_grad=True)
    loss = obj(output, hazy)
    assert loss.ndim == 0 and 0.0 <= float(loss.detach()) <= 2.0
    loss.backward()
    assert output.grad is not None and torch.isfinite(output.grad).all() and output.grad.abs().sum() > 0
    assert hazy.grad is None
    assert sorted(grad_modes) == [False, True]  # hazy embedding without grad, output with
    assert set(obj.last_terms) == {"h2c"} and obj.last_terms["h2c"] == pytest.approx(float(loss.detach()))


def test_h2c_clamps_only_for_clip_with_inward_gradient(tiny_loaded):
    obj = tiny_h2c(tiny_loaded)
    base = torch.rand(1, 3, 32, 32)
    over = base.clone()
    over[..., :4, :4] = 1.5
    assert float(obj(over, base)) == pytest.approx(float(obj(over.clamp(0, 1), base)), abs=1e-6)


def test_h2c_modes_and_night_prompt(tiny_loaded):
    assert tiny_h2c(tiny_loaded, night=True).negative == NIGHT_NEGATIVE
    custom = tiny_h2c(tiny_loaded, negative="smog", positive="crisp", mode="positive")
    assert (custom.negative, custom.positive, custom.mode) == ("smog", "crisp", "positive")
    out, hazy = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    for mode in ("positive", "negative"):
        obj = tiny_h2c(tiny_loaded, mode=mode)
        assert 0.0 <= float(obj(out, hazy)) <= 2.0
    with pytest.raises(UserError, match="mode"):
        tiny_h2c(tiny_loaded, mode="sideways")


def test_h2c_rejects_bad_shapes(tiny_loaded):
    obj = tiny_h2c(tiny_loaded)
    with pytest.raises(UserError, match=r"\(N, 3, H, W\)"):
        obj(torch.rand(2, 1, 32, 32), torch.rand(2, 3, 32, 32))


def test_local_dir_route(tiny_weights, tmp_path):
    folder = tmp_path / "tiny_dir"
    folder.mkdir()
    config = {"model_cfg": json.loads(TINY.read_text()), "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="no .safetensors"):
        H2C(pretrained=f"local-dir:{folder}")  # open_clip alone would initialise randomly here
    (folder / "open_clip_model.safetensors").write_bytes(tiny_weights["safetensors"].read_bytes())
    obj = H2C(pretrained=f"local-dir:{folder}")
    assert obj.clip.route == "local-dir" and obj.clip.mean == (0.5, 0.5, 0.5)
    assert 0.0 <= float(obj(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))) <= 2.0
    with pytest.raises(UserError, match="no such folder"):
        H2C(pretrained=f"local-dir:{tmp_path / 'missing'}")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_archive_route(tiny_loaded, tmp_path):
    path = tmp_path / "tiny_jit.pt"
    torch.jit.script(tiny_loaded.model).save(str(path))
    loaded = clip_loader.load_clip(pretrained=str(path), clip_config=TINY)
    assert loaded.route == "file (TorchScript)"
    ref = tiny_loaded.model.state_dict()
    assert all(torch.equal(loaded.model.state_dict()[k], ref[k]) for k in ref)


def test_env_var_is_the_default_source(tiny_weights, monkeypatch):
    monkeypatch.setenv(clip_loader.ENV_PRETRAINED, str(tiny_weights["safetensors"]))
    obj = H2C(clip_config=str(TINY))
    assert clip_loader.ENV_PRETRAINED in obj.describe()["pretrained"]
    monkeypatch.setenv(clip_loader.ENV_PRETRAINED, "/nowhere/clip.safetensors")
    with pytest.raises(UserError, match=clip_loader.ENV_PRETRAINED):
        H2C(clip_config=str(TINY))


# ----------------------------------------------------------------------------
# CLIP loading failures: one line, naming the ways out, never random weights
# ----------------------------------------------------------------------------
def _one_line_help(err: UserError) -> None:
    msg = str(err)
    assert "\n" not in msg
    for needle in ("--objective prior", "--clip-pretrained", "local-dir:", "BILALORA_CLIP_PRETRAINED"):
        assert needle in msg


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as info:
        H2C(pretrained=str(tmp_path / "missing.pt"), clip_config=str(TINY))
    _one_line_help(info.value)
    assert "no such file" in str(info.value)


def test_bad_and_mismatched_files(tiny_weights, tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(UserError) as info:
        H2C(pretrained=str(junk), clip_config=str(TINY))
    _one_line_help(info.value)
    other = tmp_path / "tiny_other.json"
    cfg = json.loads(TINY.read_text())
    cfg["embed_dim"] = 16
    other.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="tiny_other") as info:
        H2C(pretrained=str(tiny_weights["pt"]), clip_config=str(other))
    _one_line_help(info.value)


def test_hub_tag_offline_without_cache_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hf_constants

        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    except ImportError:  # pragma: no cover - open_clip then uses the URL route, unreachable too
        pass
    monkeypatch.delenv(clip_loader.ENV_PRETRAINED, raising=False)
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        clip_loader.load_clip("ViT-B-32-quickgelu", "openai", cache_dir=str(tmp_path / "empty_cache"))
    assert time.monotonic() - start < 10
    _one_line_help(info.value)
    assert "'openai'" in str(info.value)


def test_unknown_names_and_configs(tmp_path):
    with pytest.raises(UserError, match="--clip ViT-Nope"):
        clip_loader.load_clip("ViT-Nope", "openai")
    with pytest.raises(UserError, match="not a known tag"):
        clip_loader.load_clip("ViT-B-32-quickgelu", "no_such_tag")
    with pytest.raises(UserError, match="--clip-config"):
        clip_loader.load_clip(clip_config=tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        clip_loader.load_clip(clip_config=bad)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(UserError, match="vision_cfg"):
        clip_loader.load_clip(clip_config=partial)
    with pytest.raises(UserError, match="does not match"):
        clip_loader.load_clip("ViT-B-16", clip_config=TINY)


# ----------------------------------------------------------------------------
# H2C on embeddings
# ----------------------------------------------------------------------------
def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def test_h2c_zero_when_aligned_two_when_opposite():
    gen = torch.Generator().manual_seed(1)
    pos, neg = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    # out - in along pos - neg (after normalisation): d_img == d_text
    assert float(h2c_from_embeddings(3 * pos[None], 2 * neg[None], pos, neg)) == pytest.approx(0.0, abs=1e-6)
    assert float(h2c_from_embeddings(neg[None], pos[None], pos, neg)) == pytest.approx(2.0, abs=1e-6)


def test_moving_along_text_direction_lowers_h2c():
    gen = torch.Generator().manual_seed(2)
    pos, neg = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    d_text = _unit(_unit(pos) - _unit(neg))
    inp = torch.randn(4, 16, generator=gen)
    out = _unit(inp) + 0.3 * torch.randn(4, 16, generator=gen)
    losses = [float(h2c_from_embeddings(_unit(out) + s * d_text, inp, pos, neg)) for s in (0.0, 0.1, 0.3, 1.0)]
    assert all(a > b for a, b in itertools.pairwise(losses))
    per = h2c_from_embeddings(out, inp, pos, neg, reduction="none")
    assert per.shape == (4,) and float(per.mean()) == pytest.approx(losses[0], abs=1e-6)
    # gradient descent moves out along d_text
    out = out.clone().requires_grad_(True)
    h2c_from_embeddings(out, inp, pos, neg).backward()
    assert float((-out.grad * d_text).sum()) > 0


def test_only_positive_and_only_negative_variants():
    gen = torch.Generator().manual_seed(3)
    pos, neg = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    f = h2c_from_embeddings
    assert float(f(5 * pos[None], None, pos, None, mode="positive")) == pytest.approx(0.0, abs=1e-6)
    assert float(f(-pos[None], None, pos, None, mode="positive")) == pytest.approx(2.0, abs=1e-6)
    assert float(f(-neg[None], None, None, neg, mode="negative")) == pytest.approx(0.0, abs=1e-6)
    assert float(f(neg[None], None, None, neg, mode="negative")) == pytest.approx(2.0, abs=1e-6)
    start = torch.randn(1, 16, generator=gen)
    toward = _unit(start) + 0.5 * _unit(pos)
    away = _unit(start) - 0.5 * _unit(neg)
    assert float(f(toward, None, pos, None, mode="positive")) < float(f(start, None, pos, None, mode="positive"))
    assert float(f(away, None, None, neg, mode="negative")) < float(f(start, None, None, neg, mode="negative"))
    with pytest.raises(UserError):
        f(start, start, pos, neg, mode="both-ish")


# ----------------------------------------------------------------------------
# Prior
# ----------------------------------------------------------------------------
def test_prior_prefers_dehazed_over_hazy_black_and_washed():
    clear = textured()
    hazy = clear * 0.5 + 0.45
    prior = Prior()
    score = {name: float(prior(out, hazy)) for name, out in {
        "clear": clear, "hazy": hazy, "black": torch.zeros_like(clear), "washed": torch.full_like(clear, 0.95),
    }.items()}
    assert score["clear"] < score["hazy"]
    assert score["clear"] < score["black"]
    assert score["clear"] < score["washed"]
    assert set(prior.last_terms) == {"prior", "prior.dark", "prior.exposure", "prior.colour", "prior.hue",
                                     "prior.structure", "prior.range", "prior.bright"}


def test_prior_hue_term_penalises_hue_swaps_not_saturation_gain():
    clear = textured(seed=6)
    hazy = clear * 0.5 + 0.45
    lum = clear.mean(dim=1, keepdim=True)
    swapped = (2 * lum - clear).clamp(0, 1)  # complementary colours, same luminance
    grey = Prior(hue_reference="grey").terms
    assert float(grey(clear, hazy)["hue"].mean()) < 1e-3  # chroma scaled by 2, direction kept
    assert float(grey(swapped, hazy)["hue"].mean()) > 0.05
    airlight = Prior().terms
    assert float(airlight(swapped, hazy)["hue"].mean()) > 3 * float(airlight(clear, hazy)["hue"].mean())
    assert float(Prior()(clear, hazy)) < float(Prior()(swapped, hazy))
    floored = Prior(dark_floor=0.5).terms(clear, hazy)["dark"]
    assert torch.allclose(floored, torch.zeros(2))


def test_prior_range_term_rewards_spanning_the_range_not_beyond_the_gain():
    clear = textured(seed=8)
    hazy = clear * 0.5 + 0.45
    flat_px = clear.flatten(2)
    lo, hi = flat_px.quantile(0.02, dim=-1)[..., None, None], flat_px.quantile(0.98, dim=-1)[..., None, None]
    levels = ((clear - lo) / (hi - lo)).clamp(0, 1)  # auto-levels, 2-98 %: each 1 % tail is clipped to 0 / 1
    assert torch.allclose(range_term(levels), torch.zeros(2), atol=1e-6)  # auto-levelled: nothing to gain
    assert float(range_term(hazy).mean()) > 0.4  # veil lifts the black point, compresses the span
    # relative to the input (gain g): the span asked for is min(1, g * input span), not more
    flat = torch.full((1, 3, 32, 32), 0.7) + 0.02 * torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert float(range_term(flat, hazy=flat, gain=2.0)) < 0.03
    assert float(range_term(hazy, hazy=hazy, gain=2.0).mean()) > 0.2
    assert float(range_term(levels, hazy=hazy, gain=2.0).mean()) < 1e-6
    # with the term on, the prior prefers auto-levels over a flattened (dimmed, compressed) output
    flattened = 0.5 * hazy + 0.2
    on, off = Prior(range_weight=2.0), Prior(range_weight=0.0)
    assert float(on(levels, hazy)) < float(on(flattened, hazy))
    assert float(on(flattened, hazy)) - float(off(flattened, hazy)) > float(on(levels, hazy)) - float(off(levels, hazy))
    assert Prior().describe()["weights"]["range"] == 0.5  # on by default (held-out FADE, README "Bench")
    with pytest.raises(UserError, match="range_fraction"):
        Prior(range_fraction=0.0)
    with pytest.raises(UserError, match="range_weight"):
        Prior(range_weight=-1)


def test_prior_haze_sigma_stops_sharpening_from_counting_as_dehazing():
    # a dehazed scene, and the same scene with its fine texture amplified (sharpened: noise, blocks)
    gen = torch.Generator().manual_seed(3)
    hazy = textured(seed=5) * 0.5 + 0.4
    dehazed = gaussian_blur(textured(seed=5), 2.0)
    grain = gaussian_blur(torch.randn(dehazed.shape, generator=gen), 0.7)
    sharpened = (dehazed + 0.08 * grain / grain.std()).clamp(0, 1)
    plain, lowpass = Prior(), Prior(haze_sigma=2.0)
    gain = {name: plain.terms(dehazed, hazy)[name] - plain.terms(sharpened, hazy)[name] for name in ("dark", "range")}
    assert float(gain["dark"].mean()) > 0.02 and float(gain["range"].mean()) > 0.02  # as is: sharpening "dehazes"
    for name, left in (("dark", 0.2), ("range", 0.35)):  # the range tails keep some: the blur is only 2 px
        blurred_gain = lowpass.terms(dehazed, hazy)[name] - lowpass.terms(sharpened, hazy)[name]
        assert float(blurred_gain.abs().max()) < left * float(gain[name].mean())
    # removing the veil still counts through the blur
    assert float(lowpass.terms(dehazed, hazy)["dark"].mean()) < float(lowpass.terms(hazy, hazy)["dark"].mean()) - 0.1
    assert float(lowpass.terms(dehazed, hazy)["range"].mean()) < float(lowpass.terms(hazy, hazy)["range"].mean()) - 0.05
    assert Prior().describe()["haze_sigma"] == 0.0 and lowpass.describe()["haze_sigma"] == 2.0
    assert gaussian_blur(torch.full((1, 3, 5, 7), 0.3), 2.0).shape == (1, 3, 5, 7)
    with pytest.raises(UserError, match="haze_sigma"):
        Prior(haze_sigma=-1)


def test_prior_bright_term_charges_darkening_not_dehazing():
    clear = textured(seed=6)
    hazy = clear * 0.5 + 0.45
    darkened = clear * 0.4  # the dark term's cheap way out: a dim output
    on = Prior(bright_weight=1.0)
    bright = {name: on.terms(image, hazy)["bright"] for name, image in
              (("clear", clear), ("darkened", darkened), ("hazy", hazy))}
    assert torch.all(bright["darkened"] > bright["clear"] + 0.3)
    assert torch.all(bright["clear"] < 0.25) and torch.all(bright["hazy"] < bright["darkened"])
    # the dark term alone prefers the dim output to the clear one; with the bright term, the clear one wins
    only = dict(exposure_weight=0, colour_weight=0, hue_weight=0, structure_weight=0, range_weight=0)
    dark_only = Prior(bright_weight=0, **only)
    assert float(dark_only(darkened, hazy)) < float(dark_only(clear, hazy))
    with_bright = Prior(bright_weight=1.0, **only)
    assert float(with_bright(clear, hazy)) < float(with_bright(darkened, hazy))
    assert Prior().describe()["weights"]["bright"] == 0.25  # on by default (validation halves, README "Bench")
    assert on.describe()["weights"]["bright"] == 1.0
    on(clear, hazy)
    assert "prior.bright" in on.last_terms
    with pytest.raises(UserError, match="bright_weight"):
        Prior(bright_weight=-0.5)


def test_airlight_estimate():
    hazy = textured(seed=7) * 0.3
    hazy[..., 10:30, 20:40] = torch.tensor([0.9, 0.85, 0.7]).view(1, 3, 1, 1)  # a hazy, bright, tinted patch
    a = estimate_airlight(hazy)
    assert a.shape == (2, 3) and torch.allclose(a, torch.tensor([0.9, 0.85, 0.7]).expand(2, 3))


def test_prior_fixed_exposure_target_also_ranks():
    clear = textured(seed=4)
    hazy = clear * 0.5 + 0.45
    prior = Prior(exposure_relative=0)
    assert prior.exposure_relative is None
    assert float(prior(clear, hazy)) < float(prior(hazy, hazy))


def test_exposure_patch_zero_asks_for_brightness_not_flat_patches():
    from bilalora.objectives.prior import exposure_term

    flat = torch.full((1, 3, 64, 64), 0.5)
    contrast = flat.clone()
    contrast[..., :, :32] = 0.2  # two halves, same mean luminance 0.5 ... 0.2 and 0.8
    contrast[..., :, 32:] = 0.8
    # per 16 x 16 patch the contrast between patches costs; the image mean does not
    assert float(exposure_term(contrast, 0.5, patch=16)) == pytest.approx(0.09, rel=1e-5)
    assert float(exposure_term(contrast, 0.5, patch=0)) == pytest.approx(0.0, abs=1e-7)
    assert float(exposure_term(flat * 0.5, 0.5, patch=0)) == pytest.approx(0.0625)  # too dark still costs
    target = torch.tensor([0.25])
    assert float(exposure_term(flat, target, patch=0)) == pytest.approx(0.0625)  # per-image tensor target
    hazy = flat * 0.5 + 0.45
    assert Prior(exposure_patch=0).terms(contrast, hazy)["exposure"].shape == (1,)
    assert build_objective("prior(exposure_patch=0)").describe()["exposure_patch"] == 0
    with pytest.raises(UserError, match="exposure_patch"):
        Prior(exposure_patch=-1)


def test_prior_gradients_finite_even_out_of_range():
    hazy = textured() * 0.5 + 0.45
    for output in (torch.randn(2, 3, 64, 64) * 2, torch.zeros(2, 3, 64, 64), torch.ones(2, 3, 64, 64), hazy.clone()):
        output.requires_grad_(True)
        loss = Prior()(output, hazy)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(output.grad).all()


def test_prior_terms_and_validation():
    clear = textured()
    terms = Prior().terms(clear, clear)
    assert set(terms) == {"dark", "exposure", "colour", "hue", "structure", "range", "bright"}
    assert "bright" not in Prior(bright_weight=0).terms(clear, clear)  # computed only when weighted
    assert all(t.shape == (2,) for t in terms.values())
    assert torch.allclose(terms["structure"], torch.zeros(2), atol=1e-5)  # identical images
    assert torch.allclose(terms["hue"], torch.zeros(2), atol=1e-5)
    assert Prior(structure_weight=0.5).describe()["weights"]["structure"] == 0.5
    with pytest.raises(UserError, match="dark_weight"):
        Prior(dark_weight=-1)
    with pytest.raises(UserError, match="same|differ"):
        Prior()(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 16, 16))


def test_clamp01_passes_only_inward_gradient():
    x = torch.tensor([-0.5, -0.5, 0.5, 1.5, 1.5], requires_grad=True)
    y = clamp01(x)
    assert torch.equal(y.detach(), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    y.backward(torch.tensor([-1.0, 1.0, 1.0, 1.0, -1.0]))
    # x<0: grad -1 (descent raises x) passes, +1 blocked; x>1: +1 (descent lowers x) passes, -1 blocked
    assert x.grad.tolist() == [-1.0, 0.0, 1.0, 1.0, 0.0]


# ----------------------------------------------------------------------------
# registry and composition
# ----------------------------------------------------------------------------
def test_composite_equals_weighted_sum(tiny_weights):
    obj = build_objective("h2c:1+prior:0.5", pretrained=str(tiny_weights["pt"]), clip_config=str(TINY),
                          negative=None, exposure_weight=3.0)
    assert isinstance(obj, Composite) and obj.name == "h2c:1+prior:0.5"
    h2c, prior = obj.parts[0][0], obj.parts[1][0]
    assert prior.weights["exposure_weight"] == 3.0
    output = textured(seed=5).requires_grad_(True)
    hazy = textured(seed=5).detach() * 0.5 + 0.45
    total = obj(output, hazy)
    expected = float(h2c(output, hazy).detach()) + 0.5 * float(prior(output, hazy).detach())
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    terms = obj.last_terms
    assert terms["total"] == pytest.approx(expected, rel=1e-5)
    assert {"h2c", "prior", "prior.dark", "prior.structure"} <= set(terms)
    total.backward()
    assert torch.isfinite(output.grad).all()
    desc = obj.describe()
    json.dumps(desc)
    assert [p["weight"] for p in desc["parts"]] == [1.0, 0.5] and desc["parts"][0]["clip"] == "tiny_clip"
    assert obj.to("cpu") is obj


def test_build_objective_names_and_errors(caplog):
    assert isinstance(build_objective("prior"), Prior)
    assert isinstance(build_objective(" PRIOR "), Prior)
    assert parse_spec("h2c+prior") == [("h2c", None), ("prior", None)]
    assert parse_spec("h2c:2+prior:0.25") == [("h2c", 2.0), ("prior", 0.25)]
    with pytest.raises(UserError) as info:
        build_objective("clip")
    assert "--objective" in str(info.value) and "h2c" in str(info.value) and "prior" in str(info.value)
    for spec in ("prior:-1", "prior:x", "prior+prior", ""):
        with pytest.raises(UserError, match="--objective"):
            build_objective(spec)
    with pytest.raises(TypeError, match="no_such_option"):
        build_objective("prior", no_such_option=1)
    with caplog.at_level(logging.WARNING, logger="bilalora.objectives"):
        build_objective("prior", night=False, mode="both", clip=None)  # defaults of h2c: silent
        assert not caplog.records
        build_objective("prior", negative="smog")
        assert "ignores option(s): negative" in caplog.text
    weighted = build_objective("prior:2")
    assert isinstance(weighted, Composite)
    assert float(weighted(textured(), textured())) == pytest.approx(2 * float(Prior()(textured(), textured())))


def test_spec_options_reach_only_their_part():
    assert parse_spec_options("prior(range=1,colour=0):0.5+h2c") == {
        "prior": {"range_weight": 1.0, "colour_weight": 0.0}, "h2c": {}}
    assert parse_spec("prior(range=1e+2)+h2c:2") == [("prior", None), ("h2c", 2.0)]  # '+' inside () is no split
    tuned = build_objective("prior(range=1,colour=0,hue_reference=grey)", colour_weight=5.0, dark_weight=3.0)
    assert tuned.weights["range_weight"] == 1.0 and tuned.weights["colour_weight"] == 0.0  # the spec wins
    assert tuned.weights["dark_weight"] == 3.0 and tuned.hue_reference == "grey"
    y, x = textured(), textured()
    expected = Prior(range_weight=1.0, colour_weight=0.0, dark_weight=3.0, hue_reference="grey")(y, x)
    assert float(tuned(y, x)) == pytest.approx(float(expected))
    assert float(tuned(y, x)) != pytest.approx(float(Prior(dark_weight=3.0)(y, x)))
    for spec, words in (("prior(foo=1)", "no option 'foo'"), ("prior(range=abc)", "bad option"),
                        ("prior(range=1", "unbalanced"), ("prior(range)", "KEY=VALUE"),
                        ("prior(range=-1)", "range_weight")):
        with pytest.raises(UserError, match="--objective") as info:
            build_objective(spec)
        assert words in str(info.value) and "\n" not in str(info.value)


def test_register_objective():
    class Constant(Objective):
        name = "constant"

        def __init__(self, value: float = 1.0):
            super().__init__()
            self.value = value

        def forward(self, output, hazy):
            loss = output.sum() * 0 + self.value
            self._record(constant=loss)
            return loss

    register_objective("constant", Constant, overwrite=True)
    assert "constant" in list_objectives()
    obj = build_objective("constant:2+prior", value=3.0)
    x = textured()
    assert float(obj(x, x)) == pytest.approx(6.0 + float(Prior()(x, x)), rel=1e-5)
    with pytest.raises(ValueError):
        register_objective("constant", Constant)
    with pytest.raises(ValueError):
        register_objective("a+b", Constant)


def test_prior_on_uint8_like_real_image_shape():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((1, 3, 50, 70), dtype=np.float32))
    assert torch.isfinite(Prior()(image, image))


# ----------------------------------------------------------------------------
# precision and per-batch caching (#12.1)
# ----------------------------------------------------------------------------
def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float((a @ b) / (a.norm() * b.norm()))


def _prior_grad(output: torch.Tensor, hazy: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    y = output.clone().requires_grad_(True)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with context:
        loss = Prior()(y, hazy)
    loss.backward()
    return loss.detach(), y.grad


def test_prior_is_fp32_inside_a_bf16_autocast_region():
    clear = textured(4, 96, seed=3)
    hazy = clear * 0.55 + 0.4  # thick grey haze
    output = (clear * 0.9 + 0.05 + 0.02 * torch.randn(clear.shape, generator=torch.Generator().manual_seed(0)))
    loss32, grad32 = _prior_grad(output, hazy, autocast=False)
    loss16, grad16 = _prior_grad(output, hazy, autocast=True)
    assert loss16.dtype == torch.float32
    assert _cosine(grad16, grad32) >= 0.99
    assert float(loss16) == pytest.approx(float(loss32), rel=1e-5)
    # the structure term alone (variance E[y^2] - mu^2 after a blur) is the fragile one
    with torch.autocast("cpu", dtype=torch.bfloat16):
        structure = Prior().terms(output, hazy)["structure"]
    assert structure.dtype == torch.float32 and (structure >= -1e-6).all()


def test_h2c_under_bf16_autocast_gives_fp32_loss(tiny_loaded):
    obj = tiny_h2c(tiny_loaded, precision="fp32")
    output, hazy = textured(2, 48, seed=1), textured(2, 48, seed=2) * 0.5 + 0.4
    reference = obj(output, hazy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = obj(output, hazy)
    assert inside.dtype == torch.float32 and float(inside) == pytest.approx(float(reference), abs=1e-6)


def test_h2c_clip_precision_is_its_own(tiny_loaded):
    full = tiny_h2c(tiny_loaded, precision="fp32")
    half = tiny_h2c(tiny_loaded, precision="bf16")
    assert full.clip_dtype(torch.device("cpu")) == torch.float32
    assert half.clip_dtype(torch.device("cpu")) == torch.bfloat16
    assert tiny_h2c(tiny_loaded).clip_dtype(torch.device("cpu")) == torch.float32  # auto: fp32 off CUDA
    images = textured(3, 48, seed=4)
    emb32, emb16 = full.encode_image(images), half.encode_image(images)
    assert emb16.dtype == torch.float32  # what the loss sees
    assert min(_cosine(a, b) for a, b in zip(emb16, emb32)) > 0.98
    with pytest.raises(UserError, match="precision"):
        tiny_h2c(tiny_loaded, precision="int8")


def test_hazy_embedding_once_per_batch(tiny_loaded, monkeypatch):
    obj = tiny_h2c(tiny_loaded)
    calls = []
    original = obj.model.encode_image

    def counting(images, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(images, *args, **kwargs)

    monkeypatch.setattr(obj.model, "encode_image", counting)
    hazy = textured(2, 48, seed=5) * 0.5 + 0.4
    outputs = [textured(2, 48, seed=s).requires_grad_(True) for s in (6, 7, 8)]
    losses = [obj(out, hazy) for out in outputs]
    assert calls.count(False) == 1 and calls.count(True) == 3  # hazy once, each output once
    # the same hazy values in a new tensor, or the tensor modified in place, are encoded again
    calls.clear()
    again = obj(outputs[0], hazy.clone())
    assert calls.count(False) == 1 and float(again) == pytest.approx(float(losses[0]), abs=1e-6)
    calls.clear()
    hazy.mul_(0.9)
    obj(outputs[0], hazy)
    assert calls.count(False) == 1
    # prepare() does the hazy pass ahead; the calls then only encode outputs
    calls.clear()
    batch = textured(2, 48, seed=9)
    obj.prepare(batch)
    obj(outputs[1], batch)
    obj(outputs[2], batch)
    assert calls.count(False) == 1 and calls.count(True) == 2
    # a composite prepares its parts
    composite = Composite([(obj, 1.0), (Prior(), 0.5)])
    calls.clear()
    other = textured(2, 48, seed=10)
    composite.prepare(other)
    composite(outputs[0], other)
    assert calls.count(False) == 1


def test_saturation_term_asks_for_the_haze_models_chroma():
    """A colourful scene under a grey veil: the hazy image falls short, the clear scene does not."""
    from bilalora.objectives.prior import estimate_airlight, estimate_transmission, saturation_term

    torch.manual_seed(0)
    clear = torch.rand(1, 3, 64, 64) * 0.8 + 0.1
    clear[:, :, :, 32:] = torch.tensor([0.1, 0.2, 0.7]).view(1, 3, 1, 1) + 0.05 * torch.rand(1, 3, 64, 32)
    t = torch.full((1, 1, 64, 64), 0.4)
    veil = torch.tensor([0.9, 0.9, 0.9]).view(1, 3, 1, 1)
    hazy = clear * t + veil * (1 - t)
    airlight = estimate_airlight(hazy)
    transmission = estimate_transmission(hazy, airlight)
    assert transmission.shape == (1, 1, 64, 64) and 0.1 <= float(transmission.min()) <= float(transmission.max()) <= 1
    short = saturation_term(hazy, hazy, airlight)
    assert float(short) > 0.01
    assert float(saturation_term(clear, hazy, airlight)) < 0.2 * float(short)
    # one-sided: more chroma than asked costs nothing; the gradient raises chroma
    vivid = airlight.view(1, 3, 1, 1) + 10 * (hazy - airlight.view(1, 3, 1, 1))  # chroma x 10 >= kappa / t_min
    assert float(saturation_term(vivid, hazy, airlight)) == 0.0
    output = hazy.clone().requires_grad_(True)
    saturation_term(output, hazy, airlight).sum().backward()
    stepped = (output - 0.5 * output.grad).detach()
    assert float(saturation_term(stepped, hazy, airlight)) < float(short)
    prior = Prior(saturation_weight=10.0)
    prior(hazy, hazy)
    assert float(prior.last_terms["prior.saturation"]) == pytest.approx(float(short), rel=1e-4)
    plain = Prior()
    plain(hazy, hazy)
    assert "prior.saturation" not in plain.last_terms  # weight 0: not computed
    # dense fog (t < t_min): x - A is mostly the airlight's complement; nothing is asked there
    fog = clear * 0.1 + veil * 0.9
    fog_airlight = estimate_airlight(fog)
    assert float(estimate_transmission(fog, fog_airlight).max()) < 0.25
    assert float(saturation_term(fog, fog, fog_airlight)) == 0.0
    assert float(saturation_term(fog, fog, fog_airlight, t_min=0.01)) > 0.0
    with pytest.raises(UserError, match="saturation_kappa"):
        Prior(saturation_kappa=0.0)


def test_structure_max_gain_charges_contrast_beyond_the_bound():
    """Amplified noise on a flat veil is free by default, charged once the gain is bounded."""
    from bilalora.objectives.prior import structure_term

    torch.manual_seed(1)
    grain = 0.004 * torch.randn(1, 1, 48, 48).expand(1, 3, 48, 48)
    flat = 0.7 + grain
    tripled, tenfold = 0.7 + 3 * grain, 0.7 + 10 * grain
    assert float(structure_term(tenfold, flat)) == pytest.approx(float(structure_term(tripled, flat)), abs=2e-3)
    bounded = [float(structure_term(v, flat, max_gain=4.0)) for v in (tripled, tenfold)]
    assert bounded[0] == pytest.approx(float(structure_term(tripled, flat)), abs=1e-6)  # within the bound: free
    assert bounded[1] > bounded[0] + 0.1
    dense = torch.full((1, 1, 48, 48), 0.2)  # t = 0.2 allows 5x, more than max_gain 4
    assert float(structure_term(tenfold, flat, max_gain=4.0, transmission=dense)) == pytest.approx(bounded[1], abs=1e-6)
    thin = torch.full((1, 1, 48, 48), 0.5)  # t = 0.5 allows only 2x
    assert float(structure_term(tripled, flat, max_gain=4.0, transmission=thin)) > bounded[0] + 0.01
    with pytest.raises(UserError, match="structure_max_gain"):
        Prior(structure_max_gain=0.5)


def test_prior_weights_benchmark_ranks_with_the_default_prior():
    """benchmarks/prior_weights.py scores every computed term (a weight-0 term is not computed)."""
    import importlib.util

    from scenes import textured_scene  # tests/ is on sys.path under pytest

    script = Path(__file__).parents[1] / "benchmarks" / "prior_weights.py"
    spec = importlib.util.spec_from_file_location("prior_weights", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pairs = []
    for seed in (0, 1):
        clear = textured_scene(64, 80, seed=seed).astype(np.float32)
        hazy = (0.45 * clear + 0.5).astype(np.float32)
        pairs.append((hazy, module.candidates(hazy)))
    rows, totals = module.rank(Prior(), pairs, "default")
    assert "bright" in rows["dcp"] and "saturation" not in rows["dcp"]
    assert totals["dcp"].shape == (2,)
    assert rows["black"]["dcp_better_fraction"] == 1.0 and rows["washed"]["dcp_better_fraction"] == 1.0


def test_prior_detail_term_charges_sharpening_beyond_the_reference_only():
    gen = torch.Generator().manual_seed(4)
    hazy = textured(seed=7) * 0.5 + 0.4
    base_output = gaussian_blur(textured(seed=7), 1.0)  # what the unadapted network gives
    grain = gaussian_blur(torch.randn(base_output.shape, generator=gen), 0.7)
    sharpened = (base_output + 0.08 * grain / grain.std()).clamp(0, 1)
    stretched = ((base_output - 0.5) * 1.3 + 0.5).clamp(0, 1)  # 1.3x contrast: within the free gain 1.5
    assert float(detail_excess_term(base_output, base_output).max()) == 0.0
    assert float(detail_excess_term(stretched, base_output).max()) == 0.0
    assert float(detail_excess_term(sharpened, base_output).min()) > 0.002  # fine detail 0.015 -> 0.026
    assert float(detail_excess_term(sharpened, base_output, gain=20.0).max()) == 0.0
    assert fine_detail(base_output).shape == (base_output.shape[0], 1, base_output.shape[2] // 8,
                                              base_output.shape[3] // 8)
    # the reference gets no gradient, the output does
    reference = base_output.clone().requires_grad_(True)
    output = sharpened.clone().requires_grad_(True)
    detail_excess_term(output, reference).sum().backward()
    assert reference.grad is None and float(output.grad.abs().sum()) > 0

    prior = Prior(detail_weight=10.0)
    assert prior.wants_reference and not Prior().wants_reference
    with pytest.raises(UserError, match="bilalora adapt"):
        prior(sharpened, hazy)
    calls = []

    def reference_fn(batch):
        calls.append(batch)
        return base_output

    prior.bind_reference(reference_fn)
    assert float(prior(sharpened, hazy)) > float(prior(base_output, hazy))  # same hazy batch: one reference call
    assert len(calls) == 1 and "prior.detail" in prior.last_terms
    assert prior.describe()["weights"]["detail"] == 10.0 and prior.describe()["detail_gain"] == 1.5
    composite = Composite([(Prior(detail_weight=1.0), 1.0), (Prior(), 0.5)])
    assert composite.wants_reference and not Composite([(Prior(), 1.0)]).wants_reference
    composite.bind_reference(reference_fn)
    assert float(composite(base_output, hazy)) >= 0 and "prior.detail" in composite.last_terms
    for bad in ({"detail_gain": 0.5}, {"detail_sigma": 0.0}, {"detail_weight": -1}):
        with pytest.raises(UserError, match="detail"):
            Prior(**bad)


def test_part_defaults_replace_a_parts_defaults_and_the_spec_wins():
    synthetic = {"prior": {"bright_weight": 0.0, "range_gain": 0.0}}
    plain = build_objective("prior", part_defaults=synthetic)
    assert plain.weights["bright_weight"] == 0.0 and plain.range_gain == 0.0
    written = build_objective("prior(bright=0.5)", part_defaults=synthetic)
    assert written.weights["bright_weight"] == 0.5 and written.range_gain == 0.0
    assert build_objective("prior").weights["bright_weight"] == 0.25  # nothing given: the objective's own defaults
    with pytest.raises(TypeError, match="no option"):
        build_objective("prior", part_defaults={"prior": {"brightness_weight": 0.0}})
    assert spec_text("prior", synthetic["prior"]) == "prior(bright=0,range_gain=0)"
    assert build_objective(spec_text("prior", synthetic["prior"])).describe() == plain.describe()
