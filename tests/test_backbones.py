"""DEA-Net structure, re-parameterisation, registry and checkpoint loading."""

from __future__ import annotations

import json

import pytest
import torch

from bilalora import backbones
from bilalora.backbones.checkpoint import read_state_dict
from bilalora.backbones.dea_net import DEANet, reparameterize
from bilalora.errors import UserError
from bilalora.padding import crop_to, pad_to_multiple, padded_size
from bilalora.profile import measure_cost


def test_release_parameter_count_and_flops():
    model = backbones.create("dea-net")
    cost = measure_cost(model, (256, 256))
    assert cost.parameters == 3_653_377
    assert 64.0e9 < cost.flops < 65.0e9  # about 32 G multiply-accumulates
    assert cost.macs == cost.flops // 2


def test_release_state_dict_keys():
    keys = set(backbones.create("dea-net").state_dict())
    for key in (
        "level3_block1.pa.pa2.weight",
        "mix1.conv.weight",
        "down2.0.weight",
        "up1.0.weight",
        "level3_block1.ca.ca.0.weight",
        "level3_block1.sa.sa.weight",
        "down_level1_block1.conv1.weight",
        "up_level2_block4.conv2.bias",
    ):
        assert key in keys


@pytest.mark.parametrize("width", [8, 16])
def test_reparameterisation_is_exact(width):
    torch.manual_seed(1)
    train = DEANet(width, train_form=True).eval()
    # Give every DEConv branch different random values so all five kernels matter.
    with torch.no_grad():
        for name, param in train.named_parameters():
            if ".conv1." in name:
                param.normal_(0, 0.05)
    plain = reparameterize(train).eval()
    assert not plain.train_form
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        assert (train(x) - plain(x)).abs().max() < 1e-5


def test_deconv_branches_are_the_named_difference_kernels():
    from bilalora.backbones.deconv import DEConv

    conv = DEConv(1)
    with torch.no_grad():
        for p in conv.parameters():
            p.zero_()
        conv.conv1_2.conv.weight[0, 0] = torch.tensor([1.0, 2.0, 3.0])
    weight, _ = conv.merged_weight()
    expected = torch.tensor([[1.0, 0, -1.0], [2.0, 0, -2.0], [3.0, 0, -3.0]])
    assert torch.equal(weight[0, 0], expected)
    with torch.no_grad():
        conv.conv1_2.conv.weight.zero_()
        conv.conv1_1.conv.weight.fill_(1.0)
    weight, _ = conv.merged_weight()
    assert weight[0, 0, 1, 1] == 1.0 - 9.0 and weight[0, 0, 0, 0] == 1.0


def test_output_shape_and_padding_helper():
    model = backbones.create("dea-net-t").eval()
    image = torch.rand(2, 3, 37, 50)
    padded, size = pad_to_multiple(image, 4)
    assert padded.shape[-2:] == padded_size(37, 50) == (40, 52)
    assert torch.equal(padded[..., :37, :50], image)
    with torch.no_grad():
        out = crop_to(model(padded), size)
    assert out.shape == image.shape
    tiny, size = pad_to_multiple(torch.rand(1, 3, 2, 3), 4)  # too small to reflect: replicate
    assert tiny.shape[-2:] == (4, 4)


def _save_variants(tmp_path, state):
    from safetensors.torch import save_file

    files = {}
    files["plain"] = tmp_path / "plain.pth"
    torch.save(state, files["plain"])
    files["wrapped"] = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state, "epoch": 3}, files["wrapped"])
    files["ddp"] = tmp_path / "ddp.pt"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, files["ddp"])
    files["params"] = tmp_path / "params.ckpt"
    torch.save({"params": state}, files["params"])
    files["safetensors"] = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(files["safetensors"]))
    return files


def test_load_released_layouts(tmp_path):
    torch.manual_seed(3)
    source = backbones.create("dea-net-t")
    state = source.state_dict()
    for name, path in _save_variants(tmp_path, state).items():
        loaded = backbones.load("dea-net-t", weights=path)
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, state[key]), (name, key)
        assert loaded.bilalora_info["weights"] == str(path)


def test_mismatched_weights_list_keys(tmp_path):
    state = backbones.create("dea-net-t").state_dict()
    state.pop("mix1.conv.weight")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(UserError) as err:
        backbones.load("dea-net-t", weights=path)
    message = str(err.value)
    assert "mix1.conv.weight" in message and "extra.weight" in message and "missing" in message
    torch.save(backbones.create("dea-net-t").state_dict(), path)
    with pytest.raises(UserError, match="other shape"):
        backbones.load("dea-net-s", weights=path)


def test_unreadable_weights(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights file"):
        read_state_dict(path)
    with pytest.raises(UserError, match="not found"):
        read_state_dict(tmp_path / "missing.pth")


def test_registry_and_factory():
    names = [spec.name for spec in backbones.list_backbones()]
    assert {"dea-net", "dea-net-train", "dea-net-t"} <= set(names)
    model = backbones.create("bilalora.backbones.dea_net:DEANet", width=8)
    assert isinstance(model, DEANet) and model.width == 8
    with pytest.raises(UserError, match="unknown backbone"):
        backbones.create("no-such-net")
    with pytest.raises(UserError, match="cannot import"):
        backbones.create("no_such_pkg.mod:build")
    with pytest.raises(UserError, match="no callable"):
        backbones.create("bilalora.backbones.dea_net:missing")


# ------------------------------------------------------------------ input normalisation
from bilalora.backbones import normalize  # noqa: E402


def _clip_trained_net():
    """A tiny net 'trained' to expect CLIP-normalised input: its reference forward is f((x - m) / s)."""
    torch.manual_seed(0)
    return backbones.create("dea-net-t").eval()


def test_fold_input_norm_is_the_reference_on_normalised_input():
    import copy

    net = _clip_trained_net()
    x = torch.rand(2, 3, 32, 32)
    norm = normalize.parse_input_norm("clip")
    mean = torch.tensor(norm["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(norm["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        reference = net(((x - mean) / std))
        keys = list(net.state_dict())
        normalize.fold_input_norm(net, norm["mean"], norm["std"])
        folded = net(x)
        clone = copy.deepcopy(net)
        cloned = clone(x)
        cl = copy.deepcopy(net).to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(folded, reference, atol=1e-6)
    assert torch.allclose(cloned, reference, atol=1e-6)
    assert torch.allclose(cl, reference, atol=1e-5)
    assert list(net.state_dict()) == keys  # no new state-dict keys
    assert normalize.same_input_norm(normalize.folded_input_norm(clone), norm)
    assert net.bilalora_info["input_norm"] == norm
    # folding again replaces, never stacks
    normalize.fold_input_norm(net, norm["mean"], norm["std"])
    with torch.no_grad():
        assert torch.allclose(net(x), reference, atol=1e-6)
    normalize.unfold_input_norm(net)
    with torch.no_grad():
        assert torch.allclose(net(x), reference, atol=1e-6) is False


def test_load_input_norm_choices(tmp_path):
    from safetensors.torch import save_file

    net = backbones.create("dea-net-t")
    plain = tmp_path / "plain.safetensors"
    save_file(net.state_dict(), str(plain))
    assert backbones.load("dea-net-t", weights=plain).bilalora_info["input_norm"] is None
    clip = backbones.load("dea-net-t", weights=plain, input_norm="clip").bilalora_info["input_norm"]
    assert clip["mean"] == pytest.approx(list(normalize.CLIP_MEAN))
    custom = backbones.load("dea-net-t", weights=plain, input_norm="0.5,0.25").bilalora_info["input_norm"]
    assert custom == {"mean": [0.5] * 3, "std": [0.25] * 3}
    # a file that records its normalisation (safetensors metadata) is honoured, "none" overrides it
    recorded = tmp_path / "release.safetensors"
    save_file(net.state_dict(), str(recorded), metadata={"bilalora": json.dumps({"input_norm": "clip"})})
    assert backbones.load("dea-net-t", weights=recorded).bilalora_info["input_norm"]["std"] == pytest.approx(
        list(normalize.CLIP_STD))
    assert backbones.load("dea-net-t", weights=recorded, input_norm="none").bilalora_info["input_norm"] is None
    # a weights card beside a .pth records it too
    pth = tmp_path / "Base.pth"
    torch.save(net.state_dict(), pth)
    (tmp_path / "Base.json").write_text(json.dumps({"weights_file": "Base.pth", "input_norm": {"mean": [0.1] * 3,
                                                                                              "std": [2.0] * 3}}))
    assert backbones.load("dea-net-t", weights=pth).bilalora_info["input_norm"] == {"mean": [0.1] * 3,
                                                                                  "std": [2.0] * 3}


@pytest.mark.parametrize("bad", ["clip2", "1,2,3", "0.5,0", "a,b", "nan,1"])
def test_bad_input_norm_is_one_line(bad):
    with pytest.raises(UserError) as err:
        normalize.parse_input_norm(bad)
    assert "\n" not in str(err.value) and "--input-norm" in str(err.value)


def test_shipped_card_records_input_norm():
    card = json.loads((backbones.WEIGHTS_DIR / "dea-net-s.json").read_text())
    assert "input_norm" in card and card["input_norm"] is None
    assert normalize.recorded_input_norm(backbones.WEIGHTS_DIR / "dea-net-s.safetensors") is None


def test_names_from_files_never_import():
    assert backbones.registered_name("dea-net-t", "adapter x") == "dea-net-t"
    for bad in ("os:abort", "subprocess:getoutput", 3, None, "no-such-net"):
        with pytest.raises(UserError) as err:
            backbones.registered_name(bad, "adapter x")
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="--backbone os:abort"):
        backbones.registered_name("os:abort", "adapter x")


def test_sites_command_reports_input_norm():
    from typer.testing import CliRunner

    from bilalora.cli.app import app

    runner = CliRunner()
    result = runner.invoke(app, ["sites", "-b", "dea-net-t", "--size", "32x32", "--input-norm", "clip"])
    assert result.exit_code == 0 and "CLIP mean/std" in result.output
    bad = runner.invoke(app, ["sites", "-b", "dea-net-t", "--input-norm", "0.5,-1"])
    assert bad.exit_code == 2 and "std must be positive" in bad.output
