"""DEA-Net structure, re-parameterisation, registry and checkpoint loading."""

from __future__ import annotations

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
