"""The torch-free runtime: frames, tiling, backends (onnxruntime; TensorRT with stand-ins), switching, streams."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from bilalora import backbones
from bilalora.errors import UserError
from bilalora.padding import pad_to_multiple as torch_pad
from bilalora.runtime import Dehazer, HazeRule, LuminanceRule, ModelSwitch, open_sink, open_source, process
from bilalora.runtime.frames import blend_window, frame_to_rgb01, pad_to_multiple, plan_tiles, rgb01_to_frame
from conftest import run_without_torch  # tests/ is on sys.path under pytest


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A width-8 DEA-Net with known weights, exported (fp32 + fp16 ONNX, dynamic shapes) with model.json."""
    from safetensors.torch import save_file

    from bilalora.export.pipeline import ExportOptions, run_export

    folder = tmp_path_factory.mktemp("exported")
    torch.manual_seed(3)
    model = backbones.create("dea-net-t").eval()
    weights = folder / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    options = ExportOptions(
        base=True, backbone="dea-net-t", weights=str(weights), out=folder / "export", fp16=True,
        parity_sizes=((64, 96),), slim=False,
    )  # fmt: skip
    run_export(options)
    return model, folder / "export"


def _elementwise_onnx(path: Path, height=None, width=None) -> Path:
    """A graph computing 1 - x on (N, 3, H, W) float32 (static H, W when given): tiling must be exact for it."""
    dims = ["N", 3, height or "H", width or "W"]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, dims)
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    graph = helper.make_graph([helper.make_node("Sub", ["one", "input"], ["output"])], "invert", [x], [y], [one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _frame(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 0 else (height, width, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _torch_reference(model, frame_bgr: np.ndarray) -> np.ndarray:
    """What the runtime must compute: RGB [0, 1], reflect-pad bottom-right to 4, run, crop, round."""
    rgb = torch.from_numpy(frame_bgr[:, :, ::-1].copy()).permute(2, 0, 1)[None].float() / 255
    padded, size = torch_pad(rgb, 4)
    with torch.no_grad():
        out = model(padded)[..., : size[0], : size[1]].clamp(0, 1)
    return (out[0].permute(1, 2, 0).numpy()[:, :, ::-1] * 255).round().astype(np.uint8)


# --------------------------------------------------------------------------- frames


@pytest.mark.parametrize("channels, color", [(3, "bgr"), (3, "rgb"), (4, "bgr"), (0, "bgr"), (1, "rgb")])
def test_frames_round_trip_exactly(channels, color):
    frame = _frame(13, 17, channels)
    if channels in (0, 1):  # grey comes back as the luma of grey RGB: itself
        rgb = frame_to_rgb01(frame, color)
        assert rgb.shape == (3, 13, 17) and np.array_equal(rgb[0], rgb[2])
    back = rgb01_to_frame(frame_to_rgb01(frame, color), frame, color)
    assert back.shape == frame.shape and back.dtype == np.uint8
    assert np.array_equal(back, frame)


def test_colour_order_is_respected():
    frame = np.zeros((2, 2, 3), np.uint8)
    frame[..., 0] = 255  # blue in BGR
    assert frame_to_rgb01(frame, "bgr")[2].min() == 1.0 and frame_to_rgb01(frame, "rgb")[0].min() == 1.0


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros(5, np.uint8)])
def test_bad_frames_are_rejected(bad):
    with pytest.raises(ValueError):
        frame_to_rgb01(bad)


@pytest.mark.parametrize("height, width", [(5, 7), (61, 83), (64, 64), (2, 3)])
def test_numpy_padding_matches_the_torch_side(height, width):
    x = np.random.default_rng(0).random((3, height, width)).astype(np.float32)
    ours = pad_to_multiple(x, 4)
    theirs, _ = torch_pad(torch.from_numpy(x)[None], 4)
    assert ours.shape == tuple(theirs.shape[1:])
    np.testing.assert_array_equal(ours, theirs[0].numpy())


def test_tiles_cover_the_frame_with_the_overlap():
    tiles = plan_tiles(100, 150, 48, 64, 16)
    covered = np.zeros((100, 150), int)
    for t in tiles:
        assert 0 <= t.top and t.top + t.height <= 100 and 0 <= t.left and t.left + t.width <= 150
        covered[t.top : t.top + t.height, t.left : t.left + t.width] += 1
    assert covered.min() >= 1
    tops = sorted({t.top for t in tiles})
    assert all(b - a <= 48 - 16 for a, b in zip(tops, tops[1:]))
    assert plan_tiles(20, 30, 48, 64, 16) == [plan_tiles(20, 30, 48, 64, 16)[0]] and len(plan_tiles(20, 30, 48, 64, 16)) == 1
    weights = blend_window(48, 64, 16)
    assert weights.min() > 0 and weights[24, 32] == 1.0
    with pytest.raises(ValueError):
        plan_tiles(10, 10, 8, 8, 8)


# --------------------------------------------------------------------------- Dehazer on onnxruntime


def test_dehazer_matches_pytorch_on_odd_frames(exported):
    model, folder = exported
    dehaze = Dehazer(folder)
    assert dehaze.backend.name == "onnxruntime" and dehaze.path.name == "model.onnx"
    assert dehaze.pad_multiple == 4 and "CPUExecutionProvider" in dehaze.backend.device
    frame = _frame(61, 83)
    out = dehaze(frame)
    assert out.shape == frame.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - _torch_reference(model, frame).astype(int))
    assert diff.max() <= 1  # float rounding at .5 boundaries only
    # RGB input gives the same pixels, in RGB order
    rgb_out = Dehazer(folder, color="rgb")(np.ascontiguousarray(frame[:, :, ::-1]))
    np.testing.assert_array_equal(rgb_out[:, :, ::-1], out)
    # grey in -> grey out; BGRA keeps alpha
    assert dehaze(_frame(30, 41, 0)).shape == (30, 41)
    bgra = _frame(30, 41, 4)
    assert np.array_equal(dehaze(bgra)[:, :, 3], bgra[:, :, 3])
    info = dehaze.describe()
    assert info["backend"] == "onnxruntime" and info["base_fingerprint"] and dehaze.frames == 3


def test_dehazer_fp16_graph_and_file_paths(exported):
    model, folder = exported
    frame = _frame(40, 52, seed=1)
    fp16 = Dehazer(folder, precision="fp16")
    assert fp16.path.name == "model_fp16.onnx"
    diff = np.abs(fp16(frame).astype(int) - _torch_reference(model, frame).astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 3
    direct = Dehazer(folder / "model.onnx")  # a file: model.json beside it is still read
    assert direct.record is not None and direct(frame).shape == frame.shape


def test_dehazer_tiles_exactly_for_a_local_model(tmp_path):
    graph = _elementwise_onnx(tmp_path / "invert.onnx")
    frame = _frame(101, 157, seed=2)
    whole = Dehazer(graph)(frame)
    np.testing.assert_array_equal(whole, 255 - frame)
    tiled = Dehazer(graph, tile=48, overlap=12)
    calls = []
    run = tiled.backend.run
    tiled.backend.run = lambda batch: (calls.append(batch.shape), run(batch))[1]
    np.testing.assert_array_equal(tiled(frame), 255 - frame)
    assert len(calls) > 4 and all(s[2] <= 48 and s[3] <= 48 for s in calls)


def test_static_graph_pads_small_frames_and_tiles_large_ones(tmp_path):
    graph = _elementwise_onnx(tmp_path / "fixed.onnx", 32, 32)
    dehaze = Dehazer(graph, overlap=8)
    assert dehaze.backend.fixed_hw == (32, 32)
    for shape in [(20, 25), (32, 32), (50, 77)]:
        frame = _frame(*shape, seed=3)
        np.testing.assert_array_equal(dehaze(frame), 255 - frame)


def test_dehazer_with_the_export_pipeline_tiles_deanet_seamlessly(exported):
    model, folder = exported
    frame = _frame(90, 120, seed=4)
    whole = Dehazer(folder)(frame).astype(int)
    tiled = Dehazer(folder, tile=64, overlap=24)(frame).astype(int)
    # DEA-Net has global pooling, so tiles differ slightly from the whole frame; no seams
    assert np.abs(tiled - whole).mean() < 12


def test_model_errors_are_one_line(tmp_path, exported):
    _, folder = exported
    with pytest.raises(UserError, match="no such file"):
        Dehazer(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="not a .onnx, .xml or .engine"):
        Dehazer(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="bilalora export"):
        Dehazer(tmp_path / "empty")
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    with pytest.raises(UserError, match="onnxruntime cannot load"):
        Dehazer(tmp_path / "bad.onnx")
    with pytest.raises(UserError, match="--providers"):
        Dehazer(folder, providers=["NoSuchExecutionProvider"])
    with pytest.raises(UserError, match="--color"):
        Dehazer(folder, color="hsv")
    with pytest.raises(UserError, match="frame"):
        Dehazer(folder)(np.zeros((4, 4, 3), np.float32))


# --------------------------------------------------------------------------- TensorRT with stand-ins


class _FakeCudart(types.SimpleNamespace):
    """cuda-python's runtime API over host memory: pointers index numpy buffers."""

    def __init__(self):
        super().__init__()
        self.memory: dict[int, np.ndarray] = {}
        self.calls: list[str] = []
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def cudaGetDevice(self):
        return (0, 0)

    def cudaGetDeviceProperties(self, device):
        return (0, types.SimpleNamespace(name=b"Fake GPU", major=9, minor=0))

    def cudaStreamCreate(self):
        return (0, "stream")

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamDestroy(self, stream):
        self.calls.append("destroy")
        return (0,)

    def cudaMalloc(self, nbytes):
        pointer = 4096 * (len(self.memory) + 1)
        self.memory[pointer] = np.zeros(nbytes, np.uint8)
        return (0, pointer)

    def cudaFree(self, pointer):
        self.calls.append("free")
        return (0,)

    def cudaMallocHost(self, nbytes):
        import ctypes

        buffer = (ctypes.c_uint8 * nbytes)()
        pointer = ctypes.addressof(buffer)
        self.host = getattr(self, "host", {})
        self.host[pointer] = buffer
        self.calls.append("pin")
        return (0, pointer)

    def cudaFreeHost(self, pointer):
        self.host.pop(pointer)
        self.calls.append("unpin")
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        import ctypes

        if kind == 1:
            self.memory[dst][:nbytes] = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(src))
        else:
            ctypes.memmove(dst, self.memory[src].ctypes.data, nbytes)
        return (0,)


def _fake_tensorrt(cudart: _FakeCudart, version="10.9.0.34", max_hw=(64, 64), io=None, batch=(1, 1), fail_run=False):
    """A ``tensorrt`` stand-in whose engine computes 1 - x on the fake device memory.

    ``io``: the engine's I/O tensors as (name, "input"|"output", dtype name); ``batch``: profile N (min, max);
    ``fail_run``: execute_async_v3 raises like a CUDA error would surface.
    """
    io = io or [("input", "input", "FLOAT"), ("output", "output", "FLOAT")]
    TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    DataType = types.SimpleNamespace(FLOAT="float32", HALF="float16")

    class Context:
        def __init__(self):
            self.shape = None
            self.addresses = {}
            self.shapes = []

        def set_input_shape(self, name, shape):
            assert name == "input"
            n, c, h, w = shape
            if h > max_hw[0] or w > max_hw[1] or h < 16 or w < 16:
                return False
            self.shape = shape
            self.shapes.append(tuple(shape))
            return True

        def get_tensor_shape(self, name):
            return self.shape

        def set_tensor_address(self, name, pointer):
            self.addresses[name] = pointer

        def execute_async_v3(self, stream):
            if fail_run:
                raise RuntimeError("CUDA error 700: an illegal memory access was encountered")
            count = int(np.prod(self.shape))
            x = cudart.memory[self.addresses["input"]][: 4 * count].view(np.float32)
            cudart.memory[self.addresses["output"]][: 4 * count] = (1.0 - x).view(np.uint8)
            return True

    class Engine:
        def __init__(self):
            self.context = Context()

        num_io_tensors = len(io)

        def create_execution_context(self):
            return self.context

        def get_tensor_name(self, index):
            return io[index][0]

        def get_tensor_mode(self, name):
            mode = next(m for n, m, _ in io if n == name)
            return TensorIOMode.INPUT if mode == "input" else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return getattr(DataType, next(d for n, _, d in io if n == name))

        def get_tensor_profile_shape(self, name, index):
            return [(batch[0], 3, 16, 16), (batch[0], 3, 32, 32), (batch[1], 3, *max_hw)]

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine() if data == b"engine" else None

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    return types.SimpleNamespace(
        __version__=version, Runtime=Runtime, Logger=Logger, TensorIOMode=TensorIOMode, DataType=DataType
    )


def test_tensorrt_backend_runs_tiles_and_frees(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"engine")
    cudart = _FakeCudart()
    dehaze = Dehazer(engine, _trt=_fake_tensorrt(cudart), _cudart=cudart, overlap=8)
    assert dehaze.backend.name == "tensorrt" and "Fake GPU" in dehaze.backend.device
    assert dehaze.backend.max_hw == (64, 64) and dehaze.backend.min_hw == (16, 16)
    for shape in [(10, 12), (40, 52), (100, 130)]:  # below the profile minimum, inside, above the maximum
        frame = _frame(*shape, seed=5)
        np.testing.assert_array_equal(dehaze(frame), 255 - frame)
    shapes = dehaze.backend.context.shapes
    assert all(16 <= s[2] <= 64 and 16 <= s[3] <= 64 for s in shapes) and len(shapes) > 3
    assert "pin" in cudart.calls  # page-locked host buffers for the copies
    dehaze.close()
    assert "free" in cudart.calls and "destroy" in cudart.calls and "unpin" in cudart.calls
    assert dehaze.backend.context is None and dehaze.backend.engine is None and dehaze.backend.runtime is None
    assert not cudart.host  # every pinned buffer freed
    cudart.cudaMallocHost = lambda nbytes: (2, 0)  # cudaErrorMemoryAllocation: pageable buffers instead
    dehaze = Dehazer(engine, _trt=_fake_tensorrt(cudart), _cudart=cudart)
    frame = _frame(20, 20, seed=6)
    np.testing.assert_array_equal(dehaze(frame), 255 - frame)
    assert not any(buffer.pinned for buffer in dehaze.backend._host.values())
    cudart.cudaFree = lambda pointer: (700,)  # a sticky CUDA error: close still drops everything, raises nothing
    dehaze.close()
    assert dehaze.backend.close_errors and dehaze.backend.engine is None and not dehaze.backend._buffers


def test_engine_from_another_tensorrt_falls_back_to_onnx(exported, tmp_path):
    _, folder = exported
    import shutil

    target = tmp_path / "export"
    shutil.copytree(folder, target)
    (target / "model.engine").write_bytes(b"engine")
    record = json.loads((target / "model.json").read_text())
    record["trt"] = {"version": "10.0.1", "compute_capability": "8.9", "gpu": "NVIDIA L4"}
    record["artefacts"]["model.engine"] = {"path": "model.engine", "format": "tensorrt"}
    (target / "model.json").write_text(json.dumps(record))
    cudart = _FakeCudart()
    dehaze = Dehazer(target, _trt=_fake_tensorrt(cudart), _cudart=cudart)
    assert dehaze.backend.name == "onnxruntime"
    assert "TensorRT 10.0.1" in dehaze.notes[0] and "compute capability 8.9" in dehaze.notes[0]
    with pytest.raises(UserError, match="rebuild it here"):
        Dehazer(target, prefer="engine", _trt=_fake_tensorrt(cudart), _cudart=cudart)


def test_missing_tensorrt_is_one_line(tmp_path, monkeypatch):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"engine")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(UserError, match=r"pip install 'bilalora\[trt\]'"):
        Dehazer(engine)


# --------------------------------------------------------------------------- switching


def test_switch_has_hysteresis():
    seen = iter(["day", "night", "day", "night", "night", "night", "night", "day"])
    switch = ModelSwitch({"day": lambda f: f + 1, "night": lambda f: f + 2}, rule=lambda f: next(seen), hold=3)
    frame = np.zeros((2, 2, 3), np.uint8)
    results = [int(switch(frame)[0, 0, 0]) for _ in range(8)]
    # day; a single night and a single day do not switch; the third consecutive night does
    assert results == [1, 1, 1, 1, 1, 2, 2, 2]
    assert switch.switches == 1 and switch.counts == {"day": 5, "night": 3}
    with pytest.raises(UserError, match="not one of"):
        ModelSwitch({"day": None}, rule=lambda f: "dusk")(frame)


def test_builtin_rules_on_made_up_scenes():
    dark = np.full((120, 160, 3), 20, np.uint8)
    bright = np.full((120, 160, 3), 170, np.uint8)
    assert LuminanceRule(0.22)(dark) == "night" and LuminanceRule(0.22)(bright) == "day"
    rng = np.random.default_rng(0)
    scene = rng.integers(0, 256, (240, 320, 3)).astype(np.float32)
    hazy = (0.3 * scene + 0.7 * 220).astype(np.uint8)  # low transmission, bright airlight
    assert HazeRule(0.3)(hazy) == "haze" and HazeRule(0.3)(scene.astype(np.uint8)) == "clear"
    passthrough = ModelSwitch({"clear": None, "haze": lambda f: 255 - f}, HazeRule(0.3), hold=1)
    clear = scene.astype(np.uint8)
    assert np.array_equal(passthrough(clear), clear)


# --------------------------------------------------------------------------- streams


def _write_video(path: Path, frames: int, size=(96, 64)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    for index in range(frames):
        writer.write(np.full((size[1], size[0], 3), 15 * index, np.uint8))
    writer.release()


def _count_frames(path: Path) -> int:
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


def test_image_folder_skips_unreadable_files(tmp_path):
    src = tmp_path / "frames"
    src.mkdir()
    for index in range(3):
        cv2.imwrite(str(src / f"f{index}.png"), _frame(20, 30, seed=index))
    (src / "broken.jpg").write_bytes(b"not an image")
    source = open_source(src)
    assert source.kind == "images" and source.total == 4
    report = process(source, open_sink(tmp_path / "out", source), lambda f: 255 - f)
    assert report.frames == 3 and report.skipped == [("broken.jpg", "not an image (OpenCV cannot decode it)")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f0.png", "f1.png", "f2.png"]
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "out" / "f1.png")), 255 - _frame(20, 30, seed=1))
    assert report.as_dict()["latency_ms"]["p50"] >= 0


def test_video_round_trip_and_interruption_keeps_frames(tmp_path):
    clip = tmp_path / "clip.avi"
    _write_video(clip, 8)
    source = open_source(clip)
    assert source.kind == "video" and source.total == 8 and source.fps == pytest.approx(10)
    report = process(source, open_sink(tmp_path / "out.mp4", source), lambda f: 255 - f)
    assert report.frames == 8 and _count_frames(tmp_path / "out.mp4") == 8
    assert oct((tmp_path / "out.mp4").stat().st_mode & 0o777) != oct(0o600)

    def stop_at_five(frame, count=[0]):
        count[0] += 1
        if count[0] == 5:
            raise KeyboardInterrupt
        return frame

    source = open_source(clip)
    report = process(source, open_sink(tmp_path / "cut.avi", source), stop_at_five)
    assert report.interrupted and report.frames == 4 and _count_frames(tmp_path / "cut.avi") == 4
    assert not list(tmp_path.glob(".*.tmp*"))  # no temporary file left


def test_source_and_sink_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        open_source(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="unknown file type"):
        open_source(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        open_source(tmp_path / "empty")
    cv2.imwrite(str(tmp_path / "empty" / "a.png"), _frame(8, 8))
    with pytest.raises(UserError, match="one input image"):
        open_sink(tmp_path / "x.png", open_source(tmp_path / "empty"))


# --------------------------------------------------------------------------- torch-free


def test_runtime_and_run_command_work_without_torch(exported, tmp_path):
    _, folder = exported
    frames = tmp_path / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "a.png"), _frame(37, 45))
    code = (
        "import numpy as np\n"
        "from bilalora.runtime import Dehazer, ModelSwitch, LuminanceRule\n"
        f"d = Dehazer({str(folder)!r})\n"
        "assert d(np.zeros((9, 11, 3), np.uint8)).shape == (9, 11, 3)\n"
        "from bilalora.cli.app import app\n"
        f"app(['run', '--model', {str(folder)!r}, '--input', {str(frames)!r}, '--output', {str(tmp_path / 'out')!r}])\n"
    )
    result = run_without_torch(code)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "torch" not in result.stderr
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["frames"] == 1 and record["models"][0]["backend"] == "onnxruntime"


# --------------------------------------------------------------------------- bilalora run


def _invoke(*args: str):
    from typer.testing import CliRunner

    from bilalora.cli.app import app

    return CliRunner().invoke(app, ["run", *args], terminal_width=200)


def test_run_chains_to_the_newest_export(exported, tmp_path, monkeypatch):
    import shutil

    _, folder = exported
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "adapt" / "exp"
    run.mkdir(parents=True)
    (run / "adapter.safetensors").write_bytes(b"")  # only its presence marks a finished run
    shutil.copytree(folder, run / "export")
    clip = tmp_path / "clip.avi"
    _write_video(clip, 6)
    result = _invoke("--input", str(clip), "--output", "dehazed.avi", "--night-model", str(folder), "--hold", "2",
                     "--skip-clear", "--haze-above", "0.05")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "newest adapt run" in result.output and "6 frame(s)" in result.output
    record = json.loads((tmp_path / "dehazed.run.json").read_text())
    assert record["frames"] == 6 and record["input"]["kind"] == "video" and len(record["models"]) == 2
    assert record["switch"]["frames"] and record["latency_ms"]["p90"] >= record["latency_ms"]["p50"]
    assert _count_frames(tmp_path / "dehazed.avi") == 6


def test_run_one_image_to_an_image_path(exported, tmp_path):
    _, folder = exported
    image = tmp_path / "in.jpg"
    cv2.imwrite(str(image), _frame(33, 47))
    result = _invoke("-m", str(folder), "-i", str(image), "-o", str(tmp_path / "o" / "clear.png"), "--tile", "32")
    assert result.exit_code == 0, result.output
    assert cv2.imread(str(tmp_path / "o" / "clear.png")).shape == (33, 47, 3)
    assert json.loads((tmp_path / "o" / "clear.run.json").read_text())["models"][0]["tile"] == 32


@pytest.mark.parametrize(
    "args, message",
    [
        (["-i", "{tmp}/none", "-o", "{tmp}/o"], "no --model given"),
        (["-m", "{model}", "-i", "{tmp}/none", "-o", "{tmp}/o"], "--input"),
        (["-m", "{tmp}/none", "-i", "{tmp}", "-o", "{tmp}/o"], "--model"),
        (["-m", "{model}", "-i", "{tmp}", "-o", "{tmp}/o", "--precision", "int4"], "--precision"),
        (["-m", "{model}", "-i", "{tmp}", "-o", "{tmp}/o", "--tile", "4"], "--tile"),
        (["-m", "{model}", "-i", "{tmp}", "-o", "{tmp}/o", "--night-model", "{model}", "--night-below", "2"],
         "--night-below"),
    ],
)  # fmt: skip
def test_run_user_errors_are_one_line(exported, tmp_path, monkeypatch, args, message):
    _, folder = exported
    monkeypatch.chdir(tmp_path)
    cv2.imwrite(str(tmp_path / "a.png"), _frame(20, 20))
    result = _invoke(*[a.replace("{tmp}", str(tmp_path)).replace("{model}", str(folder)) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
