"""Adapter files: round trip, apply/merge parity, refusal on other base weights, atomic write."""

from __future__ import annotations

import json

import pytest
import torch

from bilalora import lora, sites
from bilalora.adapter import Adapter, fingerprint
from bilalora.backbones import create
from bilalora.errors import UserError


def _trained_adapter(model, names=("level3_block2", "down_level1_block3", "level3_block7")):
    lora.inject(model, sites.default_sites(model), rank=4, lora_alpha=8)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.05)
        for gate in lora.site_gates(model).values():
            gate.logit.copy_(torch.randn((), generator=generator))
    return Adapter.from_model(model, list(names), method="bilevel", objective={"name": "prior"}, seed=7)


def test_round_trip_and_merge_parity(tmp_path, tiny_dea):
    base = create("dea-net-t")
    base.load_state_dict(tiny_dea.state_dict())
    base_print = fingerprint(base)
    adapter = _trained_adapter(tiny_dea)
    assert adapter.base_fingerprint == base_print  # fingerprint is taken through the wrappers
    path = adapter.save(tmp_path / "day.safetensors")
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left
    loaded = Adapter.load(path)
    assert list(loaded.sites) == ["level3_block2", "down_level1_block3", "level3_block7"]
    assert loaded.rank == 4 and loaded.lora_alpha == 8.0 and loaded.meta["method"] == "bilevel"
    assert loaded.meta["seed"] == 7 and loaded.layers_of("level3_block2") == [
        "level3_block2.conv1",
        "level3_block2.conv2",
    ]
    for key, value in adapter.tensors.items():
        assert torch.equal(loaded.tensors[key], value)

    # reference: the gated model restricted to the adapter's sites
    reference = create("dea-net-t")
    reference.load_state_dict(base.state_dict())
    loaded.apply(reference)
    x = torch.rand(1, 3, 48, 64)
    with torch.no_grad():
        gated = reference(x)
        merged_model = create("dea-net-t")
        merged_model.load_state_dict(base.state_dict())
        loaded.merge_into(merged_model)
        merged = merged_model(x)
        plain = base(x)
    assert (gated - merged).abs().max() <= 1e-5
    assert (merged - plain).abs().max() > 1e-4
    assert list(merged_model.state_dict()) == list(base.state_dict())


def test_refuses_other_base_weights(tmp_path, tiny_dea):
    path = _trained_adapter(tiny_dea).save(tmp_path / "a.safetensors")
    torch.manual_seed(99)
    other = create("dea-net-t")
    with pytest.raises(UserError) as err:
        Adapter.load(path).apply(other)
    assert "fingerprint" in str(err.value) and Adapter.load(path).base_fingerprint in str(err.value)


def test_metadata_is_json(tmp_path, tiny_dea):
    from safetensors import safe_open

    path = _trained_adapter(tiny_dea).save(tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as handle:
        meta = json.loads(handle.metadata()["bilalora"])
    assert meta["format_version"] == 2 and meta["backbone"] == "dea-net-t"
    assert meta["checksum"].startswith("sha256:") and meta["input_norm"] is None
    assert [s["name"] for s in meta["sites"]][0] == "level3_block2"
    assert 0 < meta["sites"][0]["gate"] < 1


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Adapter.load(tmp_path / "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="not a readable"):
        Adapter.load(junk)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(UserError, match="no bilalora metadata"):
        Adapter.load(plain)


# ------------------------------------------------------------------ trust and damage (#13.2, #13.7, #13.13)
def _rewrite(path, out, meta_edit=None, tensor_edit=None):
    """Copy an adapter file with edited metadata and/or tensors (the checksum is left as it was)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()["bilalora"]
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    if meta_edit is not None:
        meta = meta_edit(meta)
    if tensor_edit is not None:
        tensor_edit(tensors)
    save_file(tensors, str(out), metadata={"bilalora": meta})
    return out


def _json_edit(**changes):
    def edit(raw):
        meta = json.loads(raw)
        for key, value in changes.items():
            if value is _DELETE:
                meta.pop(key)
            else:
                meta[key] = value
        return json.dumps(meta)

    return edit


_DELETE = object()


def test_backbone_named_in_metadata_is_never_imported(tmp_path, tiny_dea):
    path = _trained_adapter(tiny_dea).save(tmp_path / "a.safetensors")
    evil = _rewrite(path, tmp_path / "evil.safetensors", _json_edit(backbone="os:abort"))
    adapter = Adapter.load(evil)  # the process is still alive: nothing was imported or called
    assert adapter.backbone == "os:abort"
    with pytest.raises(UserError) as err:
        adapter.backbone_for(where=f"adapter {evil}")
    assert "\n" not in str(err.value) and "--backbone os:abort" in str(err.value)
    assert adapter.backbone_for("dea-net-t") == "dea-net-t"  # what the user typed wins
    assert Adapter.load(path).backbone_for() == "dea-net-t"


def test_bit_flipped_value_is_refused(tmp_path, tiny_dea):
    path = _trained_adapter(tiny_dea).save(tmp_path / "a.safetensors")

    def flip(tensors):
        key = sorted(tensors)[1]
        raw = tensors[key].reshape(-1).view(torch.int32)
        raw[3] ^= 1 << 30  # exponent bit: a value near 0.05 becomes ~1e37
        assert tensors[key].abs().max() > 1e30

    flipped = _rewrite(path, tmp_path / "flipped.safetensors", tensor_edit=flip)
    with pytest.raises(UserError, match="checksum"):
        Adapter.load(flipped)
    # without the checksum (a format-1 file) the magnitude check still refuses it
    old = _rewrite(flipped, tmp_path / "v1.safetensors", _json_edit(format_version=1, checksum=_DELETE))
    with pytest.raises(UserError, match="implausible"):
        Adapter.load(old)
    nan = _rewrite(path, tmp_path / "nan.safetensors", _json_edit(format_version=1, checksum=_DELETE),
                   lambda t: t[sorted(t)[0]].view(-1)[0].fill_(float("nan")))
    with pytest.raises(UserError, match="NaN"):
        Adapter.load(nan)


def test_large_delta_against_base_is_refused(tmp_path, tiny_dea):
    base = create("dea-net-t")
    base.load_state_dict(tiny_dea.state_dict())
    path = _trained_adapter(tiny_dea).save(tmp_path / "a.safetensors")
    big = _rewrite(path, tmp_path / "big.safetensors", _json_edit(format_version=1, checksum=_DELETE),
                   lambda t: [v.mul_(5000.0) for k, v in t.items() if k.endswith("lora_B")])
    adapter = Adapter.load(big)  # every factor is under the absolute limit ...
    with pytest.raises(UserError, match="times its base weight"):
        adapter.apply(base)  # ... but the delta dwarfs the weights
    assert not lora.lora_layers(base)  # the model is left as it was


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: raw[:-5], "not valid JSON"),
        (lambda raw: "[1, 2]", "JSON object"),
        (_json_edit(sites=_DELETE), "no 'sites'"),
        (_json_edit(sites=[]), "no 'sites'"),
        (_json_edit(sites=[{"name": "level3_block2"}]), "gate"),
        (_json_edit(rank="4"), "'rank'"),
        (_json_edit(rank=0), "'rank'"),
        (_json_edit(rank=5), "rank 5 does not match"),
        (_json_edit(lora_alpha=-1), "'lora_alpha'"),
        (_json_edit(backbone=None), "'backbone'"),
        (_json_edit(format_version=9), "format 9"),
        (_json_edit(checksum=_DELETE), "no 'checksum'"),
        (_json_edit(input_norm={"mean": [0.5]}), "input_norm"),
        (lambda raw: json.dumps({**json.loads(raw), "sites": json.loads(raw)["sites"][:2]}), "outside its sites"),
    ],
)
def test_malformed_metadata_is_one_line(tmp_path, tiny_dea, edit, message):
    path = _trained_adapter(tiny_dea).save(tmp_path / "a.safetensors")
    bad = _rewrite(path, tmp_path / "bad.safetensors", edit)
    with pytest.raises(UserError) as err:
        Adapter.load(bad)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_rank_that_fits_the_rows_but_not_the_model(tmp_path, tiny_dea):
    # rank 2 in the metadata for rank-4 tensors: A's rows (4*k) are a multiple of 2, so only the model can tell
    base = create("dea-net-t")
    base.load_state_dict(tiny_dea.state_dict())
    path = _trained_adapter(tiny_dea).save(tmp_path / "a.safetensors")
    bad = _rewrite(path, tmp_path / "r2.safetensors", _json_edit(rank=2, checksum=_DELETE, format_version=1))
    with pytest.raises(UserError) as err:
        Adapter.load(bad).apply(base)
    assert "rank 2" in str(err.value) and "\n" not in str(err.value)
    assert not lora.lora_layers(base)


def test_input_norm_is_recorded_and_enforced(tmp_path, tiny_dea):
    from bilalora.backbones.normalize import fold_input_norm, parse_input_norm

    clip = parse_input_norm("clip")
    fold_input_norm(tiny_dea, clip["mean"], clip["std"])
    tiny_dea.bilalora_info["input_norm_source"] = "flag"
    base_state = {k: v.clone() for k, v in tiny_dea.state_dict().items()}
    path = _trained_adapter(tiny_dea).save(tmp_path / "clip.safetensors")
    adapter = Adapter.load(path)
    assert adapter.input_norm == clip

    def fresh(source):
        model = create("dea-net-t")
        model.load_state_dict(base_state)
        model.bilalora_info["input_norm_source"] = source
        return model

    # a base whose normalisation nobody chose takes the adapter's ...
    adopted = adapter.apply(fresh("default"))
    assert adopted.bilalora_info["input_norm"] == clip
    x = torch.rand(1, 3, 32, 32)
    import copy

    from bilalora.backbones.normalize import unfold_input_norm

    raw = unfold_input_norm(copy.deepcopy(adopted))
    mean, std = (torch.tensor(clip[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        assert torch.allclose(adopted(x), raw((x - mean) / std), atol=1e-6)
    # ... one chosen otherwise (--input-norm none, or recorded by the weights) is refused in one line
    with pytest.raises(UserError) as err:
        adapter.apply(fresh("flag"))
    assert "input normalisation" in str(err.value) and "--input-norm" in str(err.value)


def test_source_resolution_never_imports_a_recorded_factory(tmp_path, tiny_dea):
    from bilalora.sources import resolve_source

    path = _trained_adapter(tiny_dea).save(tmp_path / "a.safetensors")
    evil = _rewrite(path, tmp_path / "evil.safetensors", _json_edit(backbone="os:abort"))
    with pytest.raises(UserError) as err:
        resolve_source(adapter=evil, runs_root=tmp_path / "runs")
    assert "\n" not in str(err.value) and "--backbone os:abort" in str(err.value)
    assert resolve_source(adapter=evil, backbone="dea-net-t", runs_root=tmp_path / "runs").backbone == "dea-net-t"
    # a run summary naming a factory is refused the same way
    run = tmp_path / "runs" / "adapt" / "exp"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"backbone": "os:abort", "input_norm": None}))
    (run / "adapter.safetensors").write_bytes(path.read_bytes())
    with pytest.raises(UserError, match="summary.json names backbone 'os:abort'"):
        resolve_source(adapter=run / "adapter.safetensors", runs_root=tmp_path / "runs")
    (run / "summary.json").write_text(json.dumps({"backbone": "dea-net-t", "weights": "random",
                                                  "input_norm": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    source = resolve_source(adapter=run / "adapter.safetensors", runs_root=tmp_path / "runs")
    assert source.input_norm == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert source.load_base().bilalora_info["input_norm"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    flagged = resolve_source(adapter=run / "adapter.safetensors", runs_root=tmp_path / "runs", input_norm="none")
    assert flagged.load_base().bilalora_info["input_norm"] is None


def test_source_takes_the_adapters_input_norm(tmp_path, tiny_dea):
    from bilalora.backbones.normalize import fold_input_norm
    from bilalora.sources import resolve_source

    fold_input_norm(tiny_dea, [0.4] * 3, [0.3] * 3)
    path = _trained_adapter(tiny_dea).save(tmp_path / "a.safetensors")
    source = resolve_source(adapter=path, backbone="dea-net-t", weights="random", runs_root=tmp_path / "runs")
    assert source.input_norm == {"mean": [0.4] * 3, "std": [0.3] * 3}
    assert source.load_base().bilalora_info["input_norm"] == source.input_norm


@pytest.mark.parametrize("command", ["export", "bench"])
def test_commands_refuse_an_adapter_naming_code(tmp_path, tiny_dea, monkeypatch, command):
    """`"backbone": "os:abort"` in an adapter file: one line, exit 2, and the process is still alive."""
    from typer.testing import CliRunner

    from bilalora.cli.app import app

    monkeypatch.chdir(tmp_path)
    path = _trained_adapter(tiny_dea).save(tmp_path / "a.safetensors")
    evil = _rewrite(path, tmp_path / "evil.safetensors", _json_edit(backbone="os:abort"))
    result = CliRunner().invoke(app, [command, "--adapter", str(evil)], terminal_width=250)
    assert result.exit_code == 2, result.output
    assert "os:abort" in result.output and "Traceback" not in result.output
