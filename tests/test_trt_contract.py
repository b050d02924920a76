"""TensorRT contract tests: the exporter's calls checked against a stand-in ``tensorrt`` module.

These check the code against our own model of TensorRT's documented Python API
(Builder, OnnxParser, IBuilderConfig, timing caches, Refitter), not against
TensorRT: they catch regressions in how bilalora drives the API (flags per
major version, profiles, cache handling, refit name mapping, what is written),
not mistakes in that model. Plain-Python parts (profile flags, precision
choice, cache naming) are tested for real. Only where TensorRT and CUDA exist,
``test_real_engine_build_and_parity`` builds a real engine with its parity gate
(the GPU session runs it).
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import onnx
import pytest
import torch
from bilalora.runtime import model_json as sidecar
import numpy as np
from bilalora.export.trt import (
    DEFAULT_MAX,
    EnginePlan,
    DEFAULT_MIN,
    DEFAULT_OPT,
    TensorRTMissing,
    build_engine,
    engine_plan,
    import_tensorrt,
    make_profile,
    parse_size,
    refit_map,
    timing_cache_name,
    trt_major,
)
from typer.testing import CliRunner

from bilalora.errors import UserError

runner = CliRunner()


# --------------------------------------------------------------------------- profiles


def test_parse_size():
    assert parse_size("720x1280", "--opt") == (720, 1280)
    assert parse_size("256", "--shape") == (256, 256)
    assert parse_size((64, 96), "--min") == (64, 96)
    with pytest.raises(UserError, match=r"--max 1079x1920: height and width must be multiples of 4.*1080x1920"):
        parse_size("1079x1920", "--max")
    with pytest.raises(UserError, match=r"--shape big: expected HxW"):
        parse_size("big", "--shape")
    with pytest.raises(UserError, match="two positive sizes"):
        parse_size("0x64", "--min")


def test_make_profile_defaults_fixed_and_ranges():
    default = make_profile()
    assert default.dynamic and default.fixed is None
    assert default.min == (1, 3, *DEFAULT_MIN) and default.opt == (1, 3, *DEFAULT_OPT)
    assert default.max == (1, 3, *DEFAULT_MAX)
    fixed = make_profile(shape="256x320", batch=4)
    assert not fixed.dynamic and fixed.fixed == (4, 3, 256, 320) == fixed.min == fixed.opt == fixed.max
    assert fixed.as_dict()["fixed"] == [4, 3, 256, 320]
    ranged = make_profile(dynamic=True, min_hw="128x128", opt_hw="256x256", max_hw="512x640", batch=2)
    assert ranged.min == (1, 3, 128, 128) and ranged.opt == (2, 3, 256, 256) and ranged.max == (2, 3, 512, 640)
    assert ranged.contains((2, 3, 300, 300)) and not ranged.contains((3, 3, 300, 300))
    assert ranged.clamp_hw(64, 1000) == (128, 640)
    small = make_profile(max_hw="256x256")  # the default opt is pulled inside a smaller max
    assert small.opt == (1, 3, 256, 256)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shape": "256x256", "min_hw": "64x64"}, "--shape fixes the input size; drop --min"),
        ({"shape": "256x256", "dynamic": True}, "drop --dynamic"),
        ({"min_hw": "512x512", "opt_hw": "256x256"}, "min <= opt <= max"),
        ({"opt_hw": "2000x2000"}, "min <= opt <= max"),
        ({"shape": "250x250"}, "multiples of 4"),
        ({"batch": 0}, "--batch 0"),
    ],
)
def test_make_profile_rejects(kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        make_profile(**kwargs)


# --------------------------------------------------------------------------- versions, plans, names


def test_engine_plan_per_major():
    assert trt_major("10.9.0.34") == 10 and trt_major("11.4.0.106") == 11
    plan = engine_plan("fp16", 10)
    assert plan.onnx == "model.onnx" and plan.flags == ("FP16",) and not plan.strongly_typed
    assert engine_plan("fp32", 10).flags == ()
    plan = engine_plan("fp16", 11)  # no weak typing: build from the fp16 graph
    assert plan.onnx == "model_fp16.onnx" and plan.flags == () and plan.strongly_typed
    assert engine_plan("fp32", 11).onnx == "model.onnx"
    with pytest.raises(UserError, match="TensorRT 8.x is not supported"):
        engine_plan("fp32", 8)


def test_timing_cache_name_and_refit_map():
    name = timing_cache_name("NVIDIA GeForce RTX 4090", (8, 9), "10.9.0.34")
    assert name == "timing-nvidia-geforce-rtx-4090-sm89-trt10.9.0.34.cache"
    assert name != timing_cache_name("NVIDIA GeForce RTX 4090", (8, 9), "11.4.0.106")
    mapping = refit_map(["down1.0.weight", "model.up3.0.bias", "onnx::Conv_12"], ["down1.0.weight", "up3.0.bias"])
    assert mapping == {"down1.0.weight": "down1.0.weight", "model.up3.0.bias": "up3.0.bias", "onnx::Conv_12": None}


def test_engine_mismatch():
    record = {"trt": {"version": "10.9.0.34", "compute_capability": "8.9", "gpu": "RTX 4090"}}
    assert sidecar.engine_mismatch(record, "10.9.0.34", (8, 9)) is None
    message = sidecar.engine_mismatch(record, "10.8.0.43", "9.0")
    assert "built with TensorRT 10.9.0.34" in message and "compute capability 8.9 (RTX 4090)" in message
    assert "rebuild" in message
    assert sidecar.engine_mismatch({"trt": None}, "10.9.0.34", (8, 9)) == "model.json records no TensorRT engine"


def test_missing_tensorrt_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(TensorRTMissing) as info:
        import_tensorrt(tmp_path)
    message = str(info.value)
    assert "pip install 'bilalora[trt]'" in message and str(tmp_path) in message and "\n" not in message


# --------------------------------------------------------------------------- fake tensorrt


PLAN = b"\x00fake-serialized-engine\xff" * 8


class FakeTensorRT(types.ModuleType):
    """A stand-in for the ``tensorrt`` module: the documented calls, recorded in ``calls``.

    TensorRT 11 has no ``BuilderFlag.FP16`` (weak typing was removed), so neither does the fake.
    """

    def __init__(self, version: str = "10.9.0.34", dynamic: bool = True):
        super().__init__("tensorrt")
        self.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # find_spec() works, as for a real module
        self.__version__ = version
        self.calls: list[tuple] = []
        calls = self.calls
        major = int(version.split(".")[0])

        class Logger:
            WARNING = "WARNING"

            def __init__(self, severity=None):
                calls.append(("Logger", severity))

        flags = {"REFIT": "REFIT", "STRIP_PLAN": "STRIP_PLAN"}
        if major < 11:
            flags["FP16"] = "FP16"
            flags["INT8"] = "INT8"
        self.BuilderFlag = type("BuilderFlag", (), flags)
        self.MemoryPoolType = type("MemoryPoolType", (), {"WORKSPACE": "WORKSPACE"})

        class Tensor:
            name = "input"
            shape = (-1, 3, -1, -1) if dynamic else (1, 3, 64, 96)

        class Network:
            initializers: list[str] = []

            def get_input(self, index):
                calls.append(("get_input", index))
                return Tensor()

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                calls.append(("parse_from_file", Path(path).name))
                model = onnx.load(path, load_external_data=False)
                Network.initializers = [init.name for init in model.graph.initializer]
                return True

            def get_error(self, index):  # pragma: no cover - parse never fails here
                return "no error"

        class Profile:
            def set_shape(self, name, lo, mid, hi):
                calls.append(("set_shape", name, tuple(lo), tuple(mid), tuple(hi)))

        class Cache:
            def __init__(self, data):
                self.data = bytes(data)

            def serialize(self):
                return b"CACHE:" + self.data

        class Config:
            def __init__(self):
                self.cache = None

            def set_memory_pool_limit(self, pool, size):
                calls.append(("set_memory_pool_limit", pool, size))

            def set_flag(self, flag):
                calls.append(("set_flag", flag))

            def add_optimization_profile(self, profile):
                calls.append(("add_optimization_profile",))

            def create_timing_cache(self, data):
                calls.append(("create_timing_cache", bytes(data)))
                if bytes(data).startswith(b"CORRUPT"):
                    raise RuntimeError("Deserialization of timing cache failed")
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                calls.append(("set_timing_cache", ignore_mismatch))
                self.cache = cache

            def get_timing_cache(self):
                return self.cache

        class Builder:
            def __init__(self, logger):
                calls.append(("Builder",))

            def create_network(self, flags=0):
                calls.append(("create_network", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                calls.append(("build_serialized_network",))
                return bytearray(PLAN)

        class Engine:
            def __init__(self):
                self.weights = {}

            def serialize(self):
                calls.append(("serialize",))
                return bytearray(b"REFITTED:" + json.dumps(sorted(self.weights)).encode())

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                calls.append(("deserialize_cuda_engine", bytes(data) == PLAN))
                return Engine()

        class Weights:
            def __init__(self, array):
                self.array = array

        class Refitter:
            def __init__(self, engine, logger):
                calls.append(("Refitter",))
                self.engine, self.given = engine, {}

            def get_all_weights(self):
                return [n for n in Network.initializers if n.endswith(".weight")] + ["onnx::Conv_123"]

            def set_named_weights(self, name, weights):
                calls.append(("set_named_weights", name, tuple(weights.array.shape)))
                if name not in self.get_all_weights():
                    return False
                self.given[name] = weights.array
                return True

            def get_missing_weights(self):
                return [n for n in self.get_all_weights() if n not in self.given]

            def refit_cuda_engine(self):
                calls.append(("refit_cuda_engine",))
                self.engine.weights = dict(self.given)
                return not self.get_missing_weights()

        self.Weights = Weights
        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, Parser
        self.Runtime, self.Refitter = Runtime, Refitter

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]


def _write_onnx(folder: Path, *names: str) -> None:
    from bilalora.export.onnx_export import export_onnx

    from bilalora import backbones

    torch.manual_seed(0)
    model = backbones.create("dea-net-t").eval()
    for name in names:
        export_onnx(model, folder / name, opset=17, half=name.endswith("fp16.onnx"), slim=False)


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    _write_onnx(folder, "model.onnx", "model_fp16.onnx")
    return folder


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """The user cache folder of every test here (never the real ~/.cache)."""
    folder = tmp_path / "user-cache"
    monkeypatch.setenv("BILALORA_CACHE_DIR", str(folder))
    return folder / "trt"


@pytest.mark.parametrize("version", ["10.9.0.34", "11.4.0.106"])
def test_build_engine_with_fake_tensorrt(onnx_dir, tmp_path, version, cache_dir):
    import shutil

    for name in ("model.onnx", "model_fp16.onnx"):
        shutil.copy(onnx_dir / name, tmp_path / name)
    fake = FakeTensorRT(version)
    profile = make_profile(min_hw="64x64", opt_hw="128x192", max_hw="256x256", batch=2)
    state_keys = list(_state_keys())
    build = build_engine(
        tmp_path,
        tmp_path / "model.engine",
        profile,
        "fp16",
        refit=True,
        workspace_gb=2,
        state_keys=state_keys,
        trt=fake,
        gpu=("NVIDIA Fake GPU", (8, 9)),
    )
    calls = fake.calls
    assert (tmp_path / "model.engine").read_bytes() == PLAN  # the engine's bytes, unmodified
    major = int(version.split(".")[0])
    source = "model.onnx" if major == 10 else "model_fp16.onnx"
    assert ("parse_from_file", source) in calls
    assert (("set_flag", "FP16") in calls) == (major == 10)
    assert ("set_flag", "REFIT") in calls
    assert ("set_memory_pool_limit", "WORKSPACE", 2 << 30) in calls
    assert ("set_shape", "input", (1, 3, 64, 64), (2, 3, 128, 192), (2, 3, 256, 256)) in calls
    assert ("create_network", 0) in calls and ("create_timing_cache", b"") in calls
    cache = cache_dir / f"nvidia-fake-gpu-sm89-trt{version}" / f"timing-nvidia-fake-gpu-sm89-trt{version}.cache"
    assert cache.read_bytes() == b"CACHE:"  # in the user cache folder, keyed by GPU, capability and version
    assert not list(tmp_path.glob("timing-*"))
    record = build.record
    assert record["version"] == version and record["major"] == major
    assert record["gpu"] == "NVIDIA Fake GPU" and record["compute_capability"] == "8.9"
    assert record["built_from"] == source and record["strongly_typed"] == (major >= 11)
    assert record["builder_flags"] == (["FP16", "REFIT"] if major == 10 else ["REFIT"])
    assert record["timing_cache"] == str(cache) and record["workspace_bytes"] == 2 << 30
    assert record["refit_dtype"] == ("float32" if major == 10 else "float16")
    refittable = record["refittable_weights"]
    assert refittable["down1.0.weight"] == "down1.0.weight" and refittable["onnx::Conv_123"] is None
    assert all(value in state_keys for value in refittable.values() if value is not None)
    # a second build reuses the saved timing cache
    fake2 = FakeTensorRT(version)
    build_engine(tmp_path, tmp_path / "model.engine", profile, "fp16", trt=fake2, gpu=("NVIDIA Fake GPU", (8, 9)))
    assert ("create_timing_cache", b"CACHE:") in fake2.calls and ("set_flag", "REFIT") not in fake2.calls


def test_build_engine_static_graph_needs_no_profile(onnx_dir, tmp_path):
    import shutil

    shutil.copy(onnx_dir / "model.onnx", tmp_path / "model.onnx")
    fake = FakeTensorRT("10.9.0.34", dynamic=False)
    profile = make_profile(shape="64x96")
    build_engine(tmp_path, tmp_path / "model.engine", profile, "fp32", trt=fake, gpu=("G", (9, 0)))
    assert "set_shape" not in fake.names() and ("set_flag", "FP16") not in fake.calls


def test_build_engine_trt11_fp16_needs_fp16_onnx(onnx_dir, tmp_path):
    import shutil

    shutil.copy(onnx_dir / "model.onnx", tmp_path / "model.onnx")
    with pytest.raises(UserError, match="needs .*model_fp16.onnx"):
        build_engine(
            tmp_path,
            tmp_path / "model.engine",
            make_profile(),
            "fp16",
            trt=FakeTensorRT("11.4.0.106"),
            gpu=("G", (9, 0)),
        )


def _state_keys():
    from bilalora import backbones

    return backbones.create("dea-net-t").state_dict().keys()


def test_cli_trt_with_fake_tensorrt(tmp_path, monkeypatch):
    """The whole --trt path of the CLI (TensorRT 11, fp16, refit) with the fake module and a fake GPU."""
    from bilalora.cli.app import app
    from bilalora.export import trt as trt_module

    fake = FakeTensorRT("11.4.0.106", dynamic=False)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_module, "gpu_info", lambda: ("NVIDIA Fake GPU", (8, 9)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "engine-out"
    result = runner.invoke(
        app,
        [
            "export",
            "--base",
            "--backbone",
            "dea-net-t",
            "--random-weights",
            "--trt",
            "--fp16",
            "--refit",
            "--shape",
            "64x96",
            "--out",
            str(out),
        ],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    assert (out / "model.engine").read_bytes() == PLAN
    assert ("parse_from_file", "model_fp16.onnx") in fake.calls
    assert "TensorRT fp16: export success" in result.output and "model.engine" in result.output
    record = json.loads((out / "model.json").read_text())
    assert record["status"] == "ok" and record["versions"]["tensorrt"] == "11.4.0.106"
    trt = record["trt"]
    assert trt["version"] == "11.4.0.106" and trt["gpu"] == "NVIDIA Fake GPU" and trt["compute_capability"] == "8.9"
    assert trt["built_from"] == "model_fp16.onnx" and trt["strongly_typed"] is True and trt["refittable"] is True
    assert trt["refittable_weights"]["level3_block1.conv1.weight"] == "level3_block1.conv1.weight"
    assert trt["profile"]["input"] == {"min": [1, 3, 64, 96], "opt": [1, 3, 64, 96], "max": [1, 3, 64, 96]}
    engine = record["artefacts"]["model.engine"]
    assert engine["format"] == "tensorrt" and engine["precision"] == "fp16" and engine["parity"] is None
    assert engine["sha256"] == sidecar.sha256_of(out / "model.engine")
    assert record["next"][1].startswith(f"bilalora run --model {out}") and "model.onnx" not in record["next"][1]
    from bilalora.cli.app import app

    registered = {info.name for info in app.registered_commands}
    assert ("bilalora run --model" in result.output) == ("run" in registered)


def test_engine_plan_int8_uses_the_qdq_graph():
    assert engine_plan("int8", 10) == EnginePlan("model_int8.onnx", ("INT8",), False)
    assert engine_plan("int8", 11) == EnginePlan("model_int8.onnx", (), True)


def test_corrupt_timing_cache_is_discarded_not_fatal(onnx_dir, tmp_path, cache_dir):
    import shutil

    from bilalora.export.trt import timing_cache_path

    shutil.copy(onnx_dir / "model.onnx", tmp_path / "model.onnx")
    cache = timing_cache_path("G", (9, 0), "10.9.0.34")
    cache.write_bytes(b"CORRUPT bytes")
    fake, warnings = FakeTensorRT("10.9.0.34"), []
    build_engine(tmp_path, tmp_path / "model.engine", make_profile(), "fp32", trt=fake, gpu=("G", (9, 0)),
                 log=warnings.append)  # fmt: skip
    assert ("create_timing_cache", b"CORRUPT bytes") in fake.calls and ("create_timing_cache", b"") in fake.calls
    assert any("corrupt" in w and "discarded" in w for w in warnings)
    assert cache.read_bytes() == b"CACHE:"  # a fresh cache replaced it
    assert (tmp_path / "model.engine").read_bytes() == PLAN


def test_refit_engine_sets_every_named_weight(onnx_dir, tmp_path):
    from bilalora.export.refit import onnx_weights, refit_engine

    fake = FakeTensorRT("10.9.0.34")
    (tmp_path / "model.engine").write_bytes(PLAN)
    fake.OnnxParser(None, None).parse_from_file(str(onnx_dir / "model.onnx"))  # what the build parsed
    weights = onnx_weights(onnx_dir / "model.onnx")
    weights["onnx::Conv_123"] = np.zeros(3, dtype=np.float32)
    info = refit_engine(tmp_path / "model.engine", weights, tmp_path / "new.engine", trt=fake)
    set_names = [call[1] for call in fake.calls if call[0] == "set_named_weights"]
    assert set(set_names) == set(fake.Refitter(None, None).get_all_weights())
    assert ("refit_cuda_engine",) in fake.calls and ("serialize",) in fake.calls
    assert info["refitted_weights"] == len(set_names) and (tmp_path / "new.engine").read_bytes().startswith(b"REFIT")
    # a weight TensorRT asks for and nobody supplies is a one-line error, not a half-refitted engine
    del weights["onnx::Conv_123"]
    with pytest.raises(UserError, match="not supplied"):
        refit_engine(tmp_path / "model.engine", weights, tmp_path / "bad.engine", trt=FakeTensorRT("10.9.0.34"))
    assert not (tmp_path / "bad.engine").exists()


# --------------------------------------------------------------------------- real TensorRT (GPU machines only)


def _real_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return torch.cuda.is_available()


@pytest.mark.trt
@pytest.mark.skipif(not _real_tensorrt(), reason="needs TensorRT and a CUDA GPU")
@pytest.mark.parametrize("fp16", [False, True])
def test_real_engine_build_and_parity(tmp_path, fp16):
    from bilalora.export.pipeline import ExportOptions, run_export

    options = ExportOptions(
        base=True,
        backbone="dea-net-t",
        random_weights=True,
        out=tmp_path / "out",
        trt=True,
        fp16=fp16,
        refit=True,
        min_hw="64x64",
        opt_hw="128x128",
        max_hw="256x256",
        batch=2,
        workspace_gb=1,
    )
    result = run_export(options)
    engine = next(a for a in result.artefacts if a.format == "tensorrt")
    assert engine.parity is not None and engine.parity.passed
    record = result.record
    assert record["trt"]["refittable_weights"] and record["trt"]["gpu"]
    import tensorrt

    assert sidecar.engine_mismatch(record, tensorrt.__version__, torch.cuda.get_device_capability()) is None


@pytest.mark.trt
@pytest.mark.skipif(not _real_tensorrt(), reason="needs TensorRT and a CUDA GPU")
def test_real_int8_engine_and_refit(tmp_path, hazy_folder):
    """GPU session: an INT8 engine from the QDQ graph passes its gate; a refit engine takes adapter B's weights."""
    from bilalora.export.pipeline import ExportOptions, run_export

    options = ExportOptions(base=True, backbone="dea-net-t", random_weights=True, out=tmp_path / "int8", trt=True,
                            int8=True, calib=hazy_folder, calib_images=4, min_hw="32x32", opt_hw="64x64",
                            max_hw="512x512", workspace_gb=1)  # fmt: skip
    result = run_export(options)
    engine = next(a for a in result.artefacts if a.format == "tensorrt")
    assert engine.precision == "int8" and engine.parity is not None and engine.parity.passed
