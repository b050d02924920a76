"""The paper's release adapters (LoRA.pth): import into bilalora adapters, export back, round trip."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from bilalora import backbones, sites
from bilalora.adapter import Adapter
from bilalora.backbones.normalize import CLIP_MEAN, CLIP_STD
from bilalora.errors import UserError
from bilalora.release import CONFIG_KEYS, export_release, import_release, read_release

SELECTED = ["level3_block2", "down_level1_block3", "level3_block7"]
RANK, ALPHA = 4, 8


@pytest.fixture
def release_files(tmp_path):
    """Base.pth (a plain DEA-Net state dict) and LoRA.pth built as BiLaLoRA_Train.py lays them out."""
    torch.manual_seed(0)
    base = backbones.create("dea-net-t").eval()
    torch.save(base.state_dict(), tmp_path / "Base.pth")
    generator = torch.Generator().manual_seed(1)
    state = {}
    for site in sites.by_name(base, SELECTED):
        for index, conv in enumerate(site.convs):
            weight = base.get_submodule(conv).weight
            out_ch, in_per_group, kh, kw = weight.shape
            state[f"{conv}.lora_A"] = torch.randn(RANK * kh, in_per_group * kw, generator=generator) * 0.1
            state[f"{conv}.lora_B"] = torch.randn(out_ch * kh, RANK * kh, generator=generator) * 0.02
            if index == 0:  # one shared gate per block, under its first conv (named_parameters order)
                state[f"{conv}.alpha"] = torch.randn(1, generator=generator)
    config = {"selected_layers": SELECTED, "r": RANK, "lora_alpha": ALPHA, "top_k": 3, "is_finetuned": True,
              "epoch": 12}
    torch.save({"lora_state_dict": state, "nas_lora_config": config}, tmp_path / "LoRA.pth")
    return tmp_path / "Base.pth", tmp_path / "LoRA.pth", base, state


def _release_reference(base, state, x):
    """The release's forward: W + sigmoid(alpha) * (alpha_lora / r) * (B @ A).view(W.shape), CLIP-normalised input."""
    import copy

    model = copy.deepcopy(base)
    with torch.no_grad():
        for site in sites.by_name(model, SELECTED):
            logit = next(state[f"{conv}.alpha"] for conv in site.convs if f"{conv}.alpha" in state)
            for conv in site.convs:
                layer = model.get_submodule(conv)
                delta = (state[f"{conv}.lora_B"] @ state[f"{conv}.lora_A"]).view(layer.weight.shape)
                layer.weight += torch.sigmoid(logit) * (ALPHA / RANK) * delta
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return model((x - mean) / std)


def test_import_gives_the_release_forward_on_plain_input(release_files, tmp_path):
    weights, release, base, state = release_files
    clip_base = backbones.load("dea-net-t", weights=weights, input_norm="clip")
    adapter = import_release(release, clip_base)
    assert list(adapter.sites) == SELECTED and adapter.rank == RANK and adapter.lora_alpha == ALPHA
    assert adapter.input_norm["mean"] == pytest.approx(list(CLIP_MEAN))
    for site in SELECTED:
        logit = next(v for k, v in state.items() if k.startswith(site + ".") and k.endswith(".alpha"))
        assert adapter.sites[site] == pytest.approx(float(torch.sigmoid(logit.double())), abs=1e-12)
    path = adapter.save(tmp_path / "day.safetensors")
    merged = Adapter.load(path).merge_into(backbones.load("dea-net-t", weights=weights, input_norm="clip"))
    x = torch.rand(2, 3, 40, 48)  # [0, 1] RGB: the normalisation is folded into the network
    with torch.no_grad():
        ours = merged(x)
    reference = _release_reference(base, state, x)
    assert (ours - reference).abs().max() < 1e-5
    with torch.no_grad():  # and the adapter matters: the base alone differs
        assert (backbones.load("dea-net-t", weights=weights, input_norm="clip")(x) - reference).abs().max() > 1e-4


@pytest.mark.parametrize("config_key", CONFIG_KEYS)
def test_round_trip(release_files, tmp_path, config_key):
    weights, release, base, state = release_files
    if config_key == "lora_config":  # the training script's key
        data = torch.load(release, weights_only=True)
        data["lora_config"] = data.pop("nas_lora_config")
        torch.save(data, release)
    adapter = import_release(release, backbones.load("dea-net-t", weights=weights, input_norm="clip"))
    saved = adapter.save(tmp_path / "day.safetensors")
    out = export_release(Adapter.load(saved), tmp_path / "out" / "LoRA.pth")
    back, config = read_release(out)
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        if key.endswith(".alpha"):
            assert back[key].shape == (1,) and back[key].item() == pytest.approx(value.item(), abs=1e-6)
        else:
            assert torch.equal(back[key], value), key
    original = torch.load(release, weights_only=True)[config_key]
    for key in ("selected_layers", "r", "lora_alpha", "top_k", "is_finetuned", "epoch"):
        assert config[key] == original[key], key
    data = torch.load(out, weights_only=True)
    assert data["lora_config"] == data["nas_lora_config"]  # both scripts of the release can read it
    # and the exported file imports to the same adapter
    again = import_release(out, backbones.load("dea-net-t", weights=weights, input_norm="clip"))
    assert again.sites == pytest.approx(adapter.sites) and again.base_fingerprint == adapter.base_fingerprint


def test_extreme_gate_logits(release_files):
    weights, release, _, _ = release_files
    _edit_release(release, lambda d: (d["lora_state_dict"]["level3_block2.conv1.alpha"].fill_(-1000.0),
                                      d["lora_state_dict"]["level3_block7.conv1.alpha"].fill_(1000.0)))
    adapter = import_release(release, backbones.load("dea-net-t", weights=weights, input_norm="clip"))
    assert adapter.sites["level3_block2"] == 0.0 and adapter.sites["level3_block7"] == 1.0


def test_ungated_sites_export_a_saturated_logit(release_files, tmp_path):
    weights, release, _, _ = release_files
    adapter = import_release(release, backbones.load("dea-net-t", weights=weights, input_norm="clip"))
    adapter.sites = {name: 1.0 for name in adapter.sites}
    back, _ = read_release(export_release(adapter, tmp_path / "ungated.pth"))
    logits = [v for k, v in back.items() if k.endswith(".alpha")]
    assert len(logits) == 3 and all(float(torch.sigmoid(v.float())) == 1.0 for v in logits)


def _edit_release(release, edit):
    data = torch.load(release, weights_only=True)
    edit(data)
    torch.save(data, release)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("lora_state_dict"), "no 'lora_state_dict'"),
        (lambda d: d.pop("nas_lora_config"), "no LoRA config"),
        (lambda d: d["nas_lora_config"].update(r=0), "'r'"),
        (lambda d: d["nas_lora_config"].update(selected_layers="level3_block2"), "selected_layers"),
        (lambda d: d["nas_lora_config"].update(selected_layers=["level9_block1"]), "do not exist"),
        (lambda d: d["lora_state_dict"].pop("level3_block2.conv2.lora_B"), "no 'level3_block2.conv2.lora_B'"),
        (lambda d: d["lora_state_dict"].pop("level3_block2.conv1.alpha"), "exactly one gate"),
        (lambda d: d["nas_lora_config"].update(selected_layers=SELECTED[:2]), "outside its selected_layers"),
        (lambda d: d["nas_lora_config"].update(r=2), "rank 2"),
        (lambda d: d["lora_state_dict"]["level3_block7.conv1.lora_B"].mul_(1e5), "base weight"),
        (lambda d: d["lora_state_dict"]["level3_block7.conv1.lora_B"].view(-1)[0].fill_(float("inf")), "NaN or infinite"),
        (lambda d: d["lora_state_dict"]["level3_block7.conv1.lora_A"].view(-1)[0].fill_(4.6e35), "implausible"),
    ],
)
def test_bad_release_files_are_one_line(release_files, edit, message):
    weights, release, _, _ = release_files
    _edit_release(release, edit)
    with pytest.raises(UserError) as err:
        import_release(release, backbones.load("dea-net-t", weights=weights, input_norm="clip"))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_pickle_with_code_is_not_run(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "LoRA.pth"
    path.write_bytes(pickle.dumps({"lora_state_dict": Evil()}))
    with pytest.raises(UserError):
        read_release(path)
    assert not marker.exists()


def test_cli_import_export_round_trip(release_files, tmp_path):
    from bilalora.cli.app import app

    weights, release, _, state = release_files
    runner = CliRunner()
    day = tmp_path / "day.safetensors"
    result = runner.invoke(app, ["adapter", "import", str(release), "-b", "dea-net-t", "-w", str(weights),
                                 "-o", str(day)])
    assert result.exit_code == 0, result.output
    assert "clip" in result.output and day.is_file()
    record = json.loads((tmp_path / "day.safetensors.json").read_text())
    assert record["command"] == "adapter import" and record["adapter"]["rank"] == RANK
    assert Adapter.load(day).input_norm["std"] == pytest.approx(list(CLIP_STD))
    again = runner.invoke(app, ["adapter", "import", str(release), "-b", "dea-net-t", "-w", str(weights),
                                "-o", str(day)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    out = tmp_path / "LoRA_back.pth"
    result = runner.invoke(app, ["adapter", "export", str(day), "-o", str(out)])
    assert result.exit_code == 0, result.output
    back, _ = read_release(out)
    assert all(torch.equal(back[k], v) for k, v in state.items() if not k.endswith(".alpha"))
    shown = runner.invoke(app, ["adapter", "show", str(day)])
    assert shown.exit_code == 0 and "level3_block2" in shown.output


def test_release_checkpoint_through_export_and_runtime(release_files, tmp_path, monkeypatch):
    """A CLIP-normalised release base + LoRA.pth: imported, exported and run by the torch-free runtime on [0, 1]
    input, gives the release's forward (CLIP-normalised input, gated deltas) within ONNX's fp32 error."""
    import numpy as np
    from bilalora.cli.app import app
    from bilalora.runtime import Dehazer

    weights, release, base, state = release_files
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    day = tmp_path / "day.safetensors"
    result = runner.invoke(app, ["adapter", "import", str(release), "-b", "dea-net-t", "-w", str(weights),
                                 "-o", str(day)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", "--adapter", str(day), "--weights", str(weights), "--out", str(out)],
                           terminal_width=250)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "model.json").read_text())
    assert record["input_norm"]["mean"] == pytest.approx(list(CLIP_MEAN))
    x = torch.rand(1, 3, 48, 64)
    reference = _release_reference(base, state, x).clamp(0, 1)[0].numpy()
    dehazer = Dehazer(out, prefer="onnx", precision="fp32")
    ours = dehazer.dehaze_rgb(x[0].numpy().astype(np.float32))
    assert np.abs(ours - reference).max() < 1e-4
    # and `bilalora run` on a photo file: the saved PNG is the reference rounded to 8 bits
    import cv2

    photo = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    cv2.imwrite(str(tmp_path / "hazy.png"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    result = runner.invoke(app, ["run", "-i", str(tmp_path / "hazy.png"), "-o", str(tmp_path / "out"), "-m", str(out),
                                 "--precision", "fp32"], terminal_width=250)
    assert result.exit_code == 0, result.output
    written = next((tmp_path / "out").glob("hazy*.png"))
    saved = cv2.cvtColor(cv2.imread(str(written)), cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    fed = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
    expected = _release_reference(base, state, fed).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    assert np.abs(saved - expected).max() <= 1 / 255 + 1e-4
    # the same graph without the folded normalisation would be far off: the check has teeth
    plain = backbones.load("dea-net-t", weights=weights, input_norm="none")
    with torch.no_grad():
        assert (plain(x).clamp(0, 1)[0].numpy() - reference).__abs__().max() > 1e-2
