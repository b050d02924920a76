"""Pretraining: pair matching, metrics, schedule, the `bilalora pretrain` command and resuming."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from bilalora.cli.app import app
from typer.testing import CliRunner

from bilalora import backbones
from bilalora.adapter import fingerprint
from bilalora.backbones.dea_net import DEANet, lift_plain_state, reparameterize
from bilalora.errors import UserError
from bilalora.metrics.reference import psnr, ssim
from bilalora.pairs import PairedFolder, match_pairs
from bilalora.pretrain_config import PretrainConfig, cosine_lr

runner = CliRunner()


def _clear_image(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """uint8 (size, size, 3) BGR: smooth colour blobs plus stripes."""
    base = cv2.resize(rng.uniform(0, 255, (4, 4, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    stripes = 40 * np.sin(np.arange(size) / rng.uniform(2, 5))[None, :, None]
    return np.clip(base + stripes, 0, 255).astype(np.uint8)


def _hazy(clear: np.ndarray, t: float = 0.55, airlight: float = 215.0) -> np.ndarray:
    return np.clip(clear.astype(np.float32) * t + airlight * (1 - t), 0, 255).round().astype(np.uint8)


def make_pairs(root: Path, count: int = 8, size: int = 64, seed: int = 0, reside: bool = False) -> Path:
    """Write ``count`` clear/hazy pairs (hazy = 0.55 J + 0.45 * 215) under root/hazy, root/clear."""
    rng = np.random.default_rng(seed)
    (root / "hazy").mkdir(parents=True)
    (root / "clear").mkdir(parents=True)
    for index in range(count):
        clear = _clear_image(rng, size)
        if reside:
            cv2.imwrite(str(root / "clear" / f"{1400 + index}.png"), clear)
            cv2.imwrite(str(root / "hazy" / f"{1400 + index}_1_0.8.png"), _hazy(clear))
        else:
            cv2.imwrite(str(root / "clear" / f"p{index}.png"), clear)
            cv2.imwrite(str(root / "hazy" / f"p{index}.png"), _hazy(clear))
    return root


def make_clear(root: Path, count: int = 4, size: int = 72, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for index in range(count):
        cv2.imwrite(str(root / f"c{index}.png"), _clear_image(rng, size))
    return root


# --------------------------------------------------------------------------- pairs


def test_match_same_stem_and_reside_fallback(tmp_path):
    root = tmp_path / "mixed"
    (root / "hazy").mkdir(parents=True)
    (root / "clear").mkdir()
    image = np.zeros((8, 8, 3), np.uint8)
    for name in ("a.png", "1400.png", "1401.png"):
        cv2.imwrite(str(root / "clear" / name), image)
    for name in ("a.png", "1400_1.png", "1400_2_0.85.png", "1401_10.png", "orphan.png"):
        cv2.imwrite(str(root / "hazy" / name), image)
    pairs, unmatched = match_pairs(root)
    found = {p.hazy.name: (p.clear.name, p.rule) for p in pairs}
    assert found["a.png"] == ("a.png", "same-stem")
    assert found["1400_1.png"] == ("1400.png", "reside-last")
    assert found["1400_2_0.85.png"] == ("1400.png", "reside-first")
    assert found["1401_10.png"] == ("1401.png", "reside-last")
    assert [p.name for p in unmatched] == ["orphan.png"]


def test_same_stem_wins_over_reside(tmp_path):
    root = tmp_path / "shared_style"
    (root / "hazy").mkdir(parents=True)
    (root / "clear").mkdir()
    image = np.zeros((8, 8, 3), np.uint8)
    for name in ("sots_in_1445_1.png", "sots_in_1445.png"):
        cv2.imwrite(str(root / "clear" / name), image)
    cv2.imwrite(str(root / "hazy" / "sots_in_1445_1.png"), image)
    pairs, _ = match_pairs(root)
    assert pairs[0].clear.name == "sots_in_1445_1.png" and pairs[0].rule == "same-stem"


def test_pair_errors_name_folder_and_rule(tmp_path):
    with pytest.raises(UserError, match=r"missing subfolder clear/"):
        (tmp_path / "only_hazy" / "hazy").mkdir(parents=True)
        match_pairs(tmp_path / "only_hazy")
    root = tmp_path / "nomatch"
    (root / "hazy").mkdir(parents=True)
    (root / "clear").mkdir()
    cv2.imwrite(str(root / "hazy" / "x.png"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(root / "clear" / "y.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(UserError) as info:
        match_pairs(root)
    assert "no hazy image" in str(info.value) and "identical file stem" in str(info.value)
    assert str(root / "hazy") in str(info.value)


def test_paired_samples_stay_aligned(tmp_path):
    folder = PairedFolder(make_pairs(tmp_path / "pairs", count=3))
    assert len(folder) == 3 and folder.summary()["matched_by"] == {"same-stem": 3}
    for seed in range(6):
        hazy, clear = folder.sample(seed % 3, 40, np.random.default_rng(seed))
        assert hazy.shape == clear.shape == (40, 40, 3)
        # the same crop, rotation and flip: the haze relation holds pixel by pixel
        np.testing.assert_allclose(hazy, clear * 0.55 + (215 / 255) * 0.45, atol=2.5 / 255)


# --------------------------------------------------------------------------- metrics, schedule


def test_psnr_ssim():
    x = torch.rand(2, 3, 32, 32)
    assert torch.all(psnr(x, x) > 90)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-4)
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert 15 < float(psnr(noisy, x).mean()) < 25
    assert float(ssim(noisy, x).mean()) < 0.95
    assert float(psnr(torch.full_like(x, 0.5), torch.full_like(x, 0.6))[0]) == pytest.approx(20.0, abs=1e-3)


def test_cosine_schedule_endpoints():
    config = PretrainConfig(steps=100, lr=1e-4, lr_min=1e-6)
    assert cosine_lr(config, 0) == pytest.approx(1e-4)
    assert cosine_lr(config, 50) == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6))
    assert cosine_lr(config, 100) == pytest.approx(1e-6)
    assert all(cosine_lr(config, s) >= cosine_lr(config, s + 1) for s in range(100))
    assert not math.isnan(cosine_lr(config, 1000))


# --------------------------------------------------------------------------- CLI


def _args(tmp_path: Path, out: Path, work: Path, *extra: str) -> list[str]:
    return [
        "pretrain",
        "--pairs", str(tmp_path / "pairs"),
        "--clear", str(tmp_path / "clear"), "--synthesize",
        "--val", str(tmp_path / "val"),
        "--out", str(out),
        "--work-dir", str(work),
        "--backbone", "dea-net-t",
        "--steps", "4", "--batch", "2", "--crop", "32",
        "--val-every", "2", "--device", "cpu", "--workers", "1", "--threads", "1",
        *extra,
    ]  # fmt: skip


@pytest.fixture
def tiny_data(tmp_path):
    make_pairs(tmp_path / "pairs", count=8)
    make_pairs(tmp_path / "val", count=2, seed=5)
    make_clear(tmp_path / "clear")
    return tmp_path


def test_cli_pretrain_writes_card_and_resumes_exactly(tiny_data):
    tmp_path = tiny_data
    straight = tmp_path / "straight" / "w.safetensors"
    result = runner.invoke(app, _args(tmp_path, straight, tmp_path / "work_a"))
    assert result.exit_code == 0, result.output
    assert "finished at step 4/4" in result.output

    card = json.loads(straight.with_suffix(".json").read_text())
    model = backbones.load("dea-net-t", weights=straight)
    assert card["fingerprint"] == fingerprint(model)
    assert card["backbone"] == "dea-net-t" and card["steps_done"] == 4 and card["width"] == 8
    assert card["input_norm"] is None and model.bilalora_info["input_norm"] is None  # trained on plain [0, 1]
    assert card["data"]["pairs"]["n_pairs"] == 8 and card["data"]["synthesized_from"]["n_images"] == 4
    assert card["validation"]["best"]["n"] == 2
    assert [h["step"] for h in card["validation"]["history"]] == [2, 4]
    assert not any("conv1_1" in key for key in model.state_dict())  # plain, re-parameterised
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 3, 32, 32)

    # interrupted after the first step (time limit), then resumed: same weights as straight through
    resumed = tmp_path / "resumed" / "w.safetensors"
    work = tmp_path / "work_b"
    first = runner.invoke(app, _args(tmp_path, resumed, work, "--time-limit", "1e-9"))
    assert first.exit_code == 0, first.output
    assert "stopped (time limit)" in first.output and (work / "last.pt").is_file()
    assert json.loads(resumed.with_suffix(".json").read_text())["steps_done"] == 1
    second = runner.invoke(app, _args(tmp_path, resumed, work, "--resume"))
    assert second.exit_code == 0, second.output
    assert "resumed from" in second.output and "finished at step 4/4" in second.output
    a = backbones.load("dea-net-t", weights=straight).state_dict()
    b = backbones.load("dea-net-t", weights=resumed).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_cli_pretrain_synthesize_only(tmp_path):
    make_clear(tmp_path / "clear")
    out = tmp_path / "synth.safetensors"
    result = runner.invoke(
        app,
        ["pretrain", "--clear", str(tmp_path / "clear"), "--synthesize", "--out", str(out), "--backbone", "dea-net-t",
         "--steps", "2", "--batch", "2", "--crop", "32", "--work-dir", str(tmp_path / "w"), "--dtype", "fp32",
         "--light-checkpoints", "--device", "cpu", "--threads", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["selected"].startswith("last") and card["data"]["synth_ratio"] == 1.0
    assert card["dtype"] == "fp32" and card["data"]["pairs"] is None
    assert card["data"]["camera_artifacts"] is None and card["training"]["artifacts"] is False


def test_cli_pretrain_artifacts_are_recorded(tmp_path):
    make_clear(tmp_path / "clear")
    out = tmp_path / "art.safetensors"
    result = runner.invoke(
        app,
        ["pretrain", "--clear", str(tmp_path / "clear"), "--synthesize", "--artifacts", "--out", str(out),
         "--backbone", "dea-net-t", "--steps", "1", "--batch", "2", "--crop", "32", "--work-dir", str(tmp_path / "w"),
         "--device", "cpu", "--threads", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "camera artifacts and uneven airlight on" in result.output
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["training"]["artifacts"] is True
    assert card["data"]["camera_artifacts"]["jpeg_quality"] == [35, 95]
    assert card["data"]["airlight_unevenness"] == [0.0, 0.04]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--clear", "{tmp}"], "--clear needs --synthesize"),
        (["--synthesize"], "--synthesize needs --clear"),
        ([], "no training data"),
        (["--pairs", "{tmp}/nowhere"], "does not exist"),
        (["--pairs", "{tmp}"], "missing subfolder hazy/"),
    ],
)
def test_cli_pretrain_one_line_errors(tmp_path, extra, message):
    args = ["pretrain", "--out", str(tmp_path / "o.safetensors")] + [e.replace("{tmp}", str(tmp_path)) for e in extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_lifted_plain_weights_compute_the_same_function():
    torch.manual_seed(0)
    trained = DEANet(8, train_form=True).eval()
    for parameter in trained.parameters():  # non-zero difference branches
        parameter.data.normal_(0, 0.05)
    plain = reparameterize(trained)
    lifted = DEANet(8, train_form=True).eval()
    lifted.load_state_dict(lift_plain_state(lifted, plain.state_dict()))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(lifted(x), plain(x), rtol=0, atol=1e-5)
    assert not torch.equal(lifted.down_level1_block1.conv1.conv1_5.weight, trained.down_level1_block1.conv1.conv1_5.weight)
    assert float(lifted.down_level1_block1.conv1.conv1_1.conv.weight.detach().abs().sum()) == 0.0


def test_cli_pretrain_init_continues_from_weights(tiny_data):
    tmp_path = tiny_data
    first = tmp_path / "first" / "w.safetensors"
    assert runner.invoke(app, _args(tmp_path, first, tmp_path / "work_a", "--dtype", "fp32")).exit_code == 0
    start = backbones.load("dea-net-t", weights=first)

    # zero steps of learning (lr-min = lr = tiny) from --init: the output equals the start
    again = tmp_path / "again" / "w.safetensors"
    result = runner.invoke(
        app,
        _args(tmp_path, again, tmp_path / "work_b", "--init", str(first), "--dtype", "fp32",
              "--lr", "1e-12", "--lr-min", "1e-12", "--steps", "1"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "initialised from" in result.output
    card = json.loads(again.with_suffix(".json").read_text())
    assert card["training"]["init"] == str(first)
    continued = backbones.load("dea-net-t", weights=again)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(continued(x), start(x), rtol=0, atol=1e-4)

    missing = runner.invoke(app, _args(tmp_path, again, tmp_path / "work_c", "--init", str(tmp_path / "none.pt")))
    assert missing.exit_code == 2 and "--init" in missing.output and "Traceback" not in missing.output


def test_resume_without_checkpoint_is_a_user_error(tiny_data):
    result = runner.invoke(app, _args(tiny_data, tiny_data / "x.safetensors", tiny_data / "empty_work", "--resume"))
    assert result.exit_code == 2 and "no checkpoint" in result.output


# --------------------------------------------------------------------------- shipped weights

#: The registry names whose weights bilalora/weights ships (cards: bilalora/weights/<name>.md).
SHIPPED_BACKBONES = ("dea-net-s", "dea-net-s-synthetic")


@pytest.mark.parametrize("name", SHIPPED_BACKBONES)
def test_shipped_weights_match_their_card_and_run(monkeypatch, name):
    monkeypatch.delenv("BILALORA_WEIGHTS_DIR", raising=False)
    path = backbones.shipped_weights(name)
    assert path is not None, f"bilalora/weights has no weights for {name}"
    assert path.stat().st_size <= 16 * 2**20
    card = json.loads(path.with_suffix(".json").read_text())
    model = backbones.load(name)  # no weights argument: the shipped file
    assert model.bilalora_info["weights"] == str(path)
    assert model.bilalora_info["input_norm"] is None and card["input_norm"] is None
    assert card["backbone"] == name and card["weights_file"] == path.name
    assert fingerprint(model) == card["fingerprint"]
    assert path.with_suffix(".md").is_file()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_the_paper_setting_base_saw_synthetic_pairs_only():
    card = json.loads(backbones.shipped_weights("dea-net-s-synthetic").with_suffix(".json").read_text())
    assert card["data"]["synth_ratio"] == 0.0 and card["data"]["synthesized_from"] is None
    assert card["lineage"][0]["from"] == "random init"  # the first file began from a random init
    assert all("artifacts" not in step["recipe"] for step in card["lineage"])
    assert card["evaluation"]["synth_test"]["n_pairs"] == 50


# --------------------------------------------------------------------------- split pieces (#9)


def test_ssim_on_images_smaller_than_the_window():
    for side in (10, 9, 4, 1):  # an even side below 11 once asked for a window larger than the image
        x = torch.rand(1, 3, side, side)
        assert torch.allclose(ssim(x, x), torch.ones(1), atol=1e-4)
        assert float(ssim(x, 1 - x)[0]) < 0.5 or side == 1


@pytest.mark.parametrize(
    "has_pairs, has_clear, ratio, expected",
    [(True, False, None, 0.0), (False, True, None, 1.0), (True, True, None, 0.5), (True, True, 0.3, 0.3)],
)
def test_resolve_synth_ratio_defaults(has_pairs, has_clear, ratio, expected):
    from bilalora.mixture import resolve_synth_ratio

    assert resolve_synth_ratio(has_pairs, has_clear, ratio) == expected


@pytest.mark.parametrize(
    "has_pairs, has_clear, ratio, message",
    [
        (False, False, None, "no training data"),
        (True, True, 1.5, "must be in [0, 1]"),
        (True, False, 0.2, "needs --clear"),
        (False, True, 0.5, "needs --pairs"),
    ],
)
def test_resolve_synth_ratio_errors(has_pairs, has_clear, ratio, message):
    from bilalora.mixture import resolve_synth_ratio

    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        resolve_synth_ratio(has_pairs, has_clear, ratio)


def test_mixture_prefetched_batches_equal_direct_batches(tmp_path):
    from bilalora.mixture import TrainMixture
    from bilalora.pairs import ClearFolder

    pairs = PairedFolder(make_pairs(tmp_path / "pairs", count=4))
    clear = ClearFolder(make_clear(tmp_path / "clear"))
    mixture = TrainMixture(pairs, clear, 0.5, batch=3, crop=32, seed=7)
    direct = [mixture.batch_at(step) for step in range(2, 6)]
    for workers in (0, 2):
        got = list(mixture.iterate(2, 6, workers))
        assert [step for step, _, _ in got] == [2, 3, 4, 5]
        for (_, hazy, target), (want_hazy, want_target) in zip(got, direct):
            assert torch.equal(hazy, want_hazy) and torch.equal(target, want_target)
    assert not torch.equal(direct[0][0], direct[1][0])  # steps differ


class _Payload:
    """Pickled into a checkpoint: weights_only=True must refuse to rebuild it."""


def test_checkpoint_refuses_pickled_objects_and_other_formats(tmp_path):
    from bilalora.checkpoints import load_checkpoint, save_checkpoint

    good = tmp_path / "good.pt"
    save_checkpoint(good, {"format": "x/1", "w": torch.ones(2), "step": 3})
    assert load_checkpoint(good, "x/1")["step"] == 3
    with pytest.raises(UserError, match="not a y/1 checkpoint"):
        load_checkpoint(good, "y/1")
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": "x/1", "payload": _Payload()}, str(unsafe))
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(unsafe, "x/1")
    with pytest.raises(UserError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "none.pt", "x/1", hint="start afresh")


def test_training_form_comes_from_the_spec_hooks():
    from bilalora.card import plain_copy, plain_form
    from bilalora.pretrain import build_train_model

    model = build_train_model("dea-net-t")
    assert model.train_form and any("conv1_1" in key for key in model.state_dict())
    plain = plain_form(model)
    assert plain is not model and not plain.train_form
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), model.eval()(x), rtol=0, atol=1e-5)
    already = backbones.create("dea-net-t")
    assert plain_form(already) is already  # plain stays itself; a copy is independent
    copied = plain_copy(already)
    assert copied is not already
    for key, value in already.state_dict().items():
        assert torch.equal(copied.state_dict()[key], value)


def tiny_factory():
    """A user backbone without a training form (``tests.test_pretrain:tiny_factory``)."""
    return torch.nn.Conv2d(3, 3, 3, padding=1)


def test_a_user_factory_without_training_form_pretrains_as_built(tiny_data, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = tiny_data / "user" / "w.safetensors"
    args = _args(tiny_data, out, tiny_data / "work_user", "--dtype", "fp32")
    args[args.index("--backbone") + 1] = "test_pretrain:tiny_factory"
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["backbone"] == "test_pretrain:tiny_factory" and card["parameters"] == 3 * 3 * 9 + 3
