"""The runtime's refusals and choices: model.json trust, bad files, in-place runs, Ctrl-C, backend choice,
fallback, fixed batches, OpenVINO, onnxruntime's TensorRT options."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bad_corpus import make_bad_corpus  # tests/ is on sys.path under pytest
from bilalora.errors import UserError
from bilalora.runtime import Dehazer, open_sink, open_source, process
from bilalora.runtime import model_json
from bilalora.runtime.decode import UnreadableImage, read_frame
from bilalora.runtime.providers import session_providers, tensorrt_provider_options
from bilalora.runtime.select import resolve_model
from test_runtime import (  # noqa: F401 - exported is a fixture
    _FakeCudart,
    _count_frames,
    _elementwise_onnx,
    _fake_tensorrt,
    _frame,
    _invoke,
    _torch_reference,
    _write_video,
    exported,
)


def _copy_export(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


def _edit_record(folder: Path, change) -> None:
    path = folder / "model.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# --------------------------------------------------------------------------- model.json trust (#13.3, #13.13)


@pytest.mark.parametrize("path", ["../outside.onnx", "/etc/hostname", "sub/../../outside.onnx"])
def test_artefact_paths_outside_the_folder_are_refused(exported, tmp_path, path):
    _, folder = exported
    target = _copy_export(folder, tmp_path / "export")
    shutil.copy(target / "model.onnx", tmp_path / "outside.onnx")
    _edit_record(target, lambda r: r["artefacts"]["model.onnx"].update(path=path))
    with pytest.raises(UserError, match="outside the export folder|not a path inside") as info:
        Dehazer(target, precision="fp32")
    assert "\n" not in str(info.value)


def test_symlink_leading_out_is_refused(exported, tmp_path):
    _, folder = exported
    target = _copy_export(folder, tmp_path / "export")
    shutil.move(target / "model.onnx", tmp_path / "elsewhere.onnx")
    os.symlink(tmp_path / "elsewhere.onnx", target / "model.onnx")
    with pytest.raises(UserError, match="outside the export folder"):
        Dehazer(target, precision="fp32")


def test_swapped_artefact_is_refused_unless_no_verify(exported, tmp_path):
    _, folder = exported
    target = _copy_export(folder, tmp_path / "export")
    (target / "model_fp16.onnx").unlink()  # only model.onnx to fall back on
    _edit_record(target, lambda r: r["artefacts"].pop("model_fp16.onnx"))
    _elementwise_onnx(target / "model.onnx")  # another graph under the recorded name
    with pytest.raises(UserError, match=r"model.onnx: sha256 .* differs from model.json's .*--no-verify"):
        Dehazer(target, precision="fp32")
    frame = _frame(20, 24)
    swapped = Dehazer(target, precision="fp32", verify=False)
    np.testing.assert_array_equal(swapped(frame), 255 - frame)  # it really is the swapped graph that runs
    result = _invoke("-m", str(target), "-i", str(_write_image(tmp_path / "a.png")), "-o", str(tmp_path / "o"))
    assert result.exit_code == 2 and "sha256" in result.output and "Traceback" not in result.output


def _write_image(path: Path) -> Path:
    cv2.imwrite(str(path), _frame(20, 24))
    return path


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda r: r["input"].update(pad_multiple=0), "input.pad_multiple"),
        (lambda r: r["input"].update(pad_multiple="4"), "input.pad_multiple"),
        (lambda r: r.update(input=[1, 3, 64, 64]), "field input "),
        (lambda r: r.update(artefacts=None), "field artefacts "),
        (lambda r: r["artefacts"].update({"model.onnx": "model.onnx"}), "artefacts.model.onnx"),
        (lambda r: r["shapes"].update(fixed=[1, 3, "h", 64]), "shapes.fixed"),
        (lambda r: r.update(trt="yes"), "field trt "),
    ],
)
def test_malformed_model_json_is_one_line(exported, tmp_path, change, field):
    _, folder = exported
    target = _copy_export(folder, tmp_path / "export")
    _edit_record(target, change)
    with pytest.raises(UserError) as info:
        Dehazer(target)
    assert field in str(info.value) and "model.json" in str(info.value) and "\n" not in str(info.value)


def test_bad_json_and_failed_gates(exported, tmp_path):
    _, folder = exported
    target = _copy_export(folder, tmp_path / "export")
    (target / "model.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        Dehazer(target)
    target = _copy_export(folder, tmp_path / "export2")
    _edit_record(target, lambda r: r["artefacts"]["model.onnx"]["parity"].update(passed=False))
    dehaze = Dehazer(target, precision="fp32")  # model.onnx failed its gate: never run, said so
    assert dehaze.path.name == "model_fp16.onnx"
    assert any("model.onnx: it failed its parity gate" in n for n in dehaze.notes)


# --------------------------------------------------------------------------- bad files (#13.10, #13.11)


def test_decode_names_every_bad_file(tmp_path):
    corpus = make_bad_corpus(tmp_path / "mixed")
    for name in corpus["bad"]:
        with pytest.raises(UnreadableImage):
            read_frame(corpus["folder"] / name)
    for name in corpus["good"]:
        frame = read_frame(corpus["folder"] / name)
        assert frame.dtype == np.uint8 and frame.ndim in (2, 3)
    with pytest.raises(UnreadableImage, match="1,600,000,000 pixels"):
        read_frame(corpus["folder"] / "huge_header.png")
    with pytest.raises(UnreadableImage, match="symlink loop"):
        read_frame(corpus["folder"] / "loop.png")
    with pytest.raises(UnreadableImage, match="directory"):
        read_frame(corpus["folder"] / "x.png")


def test_truncated_jpeg_without_end_marker_is_refused(tmp_path):
    """libjpeg decodes a JPEG cut before its end-of-image marker with grey filler and only a warning."""
    ok, encoded = cv2.imencode(".jpg", _frame(64, 64, seed=2))
    data = encoded.tobytes()
    assert data.endswith(b"\xff\xd9")
    (tmp_path / "cut.jpg").write_bytes(data[:-2])  # all scan data there, only the EOI missing
    assert cv2.imread(str(tmp_path / "cut.jpg")) is not None  # OpenCV alone would process it
    with pytest.raises(UnreadableImage, match="truncated JPEG"):
        read_frame(tmp_path / "cut.jpg")


def test_run_goes_through_the_bad_corpus(exported, tmp_path):
    _, folder = exported
    corpus = make_bad_corpus(tmp_path / "mixed")
    result = _invoke("-m", str(folder), "-i", str(corpus["folder"]), "-o", str(tmp_path / "out"), "--precision", "fp32")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    for name in corpus["bad"]:
        assert f"skipped {name}:" in " ".join(result.output.split()), name
    written = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != "run.json")
    assert written == corpus["good"]
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert sorted(s["name"] for s in record["skipped"]) == corpus["bad"] and record["frames"] == len(corpus["good"])
    grey = cv2.imread(str(tmp_path / "out" / "grey.png"), cv2.IMREAD_UNCHANGED)
    rgba = cv2.imread(str(tmp_path / "out" / "rgba.png"), cv2.IMREAD_UNCHANGED)
    assert grey.shape == (64, 64) and rgba.shape == (64, 64, 4) and (rgba[:, :, 3] == 200).all()
    assert cv2.imread(str(tmp_path / "out" / "one.png")).shape == (1, 1, 3)


def test_single_bad_inputs_are_one_line(exported, tmp_path):
    _, folder = exported
    corpus = make_bad_corpus(tmp_path / "mixed")
    result = _invoke("-m", str(folder), "-i", str(corpus["folder"] / "huge_header.png"), "-o", str(tmp_path / "o"))
    assert result.exit_code == 2 and "no frame could be read" in result.output and "Traceback" not in result.output
    assert "1,600,000,000 pixels" in " ".join(result.output.split())
    result = _invoke("-m", str(folder), "-i", str(corpus["folder"] / "loop.png"), "-o", str(tmp_path / "o"))
    assert result.exit_code == 2 and "symlink loop" in result.output


# --------------------------------------------------------------------------- in place, Ctrl-C (#13.4, #13.15)


def test_in_place_runs_are_refused_unless_overwrite(exported, tmp_path):
    _, folder = exported
    photos = tmp_path / "photos"
    photos.mkdir()
    original = _frame(24, 32, seed=4)
    cv2.imwrite(str(photos / "a.png"), original)
    for output in (photos, photos / "a.png", Path(str(photos) + "/./")):
        result = _invoke("-m", str(folder), "-i", str(photos if output != photos / "a.png" else photos / "a.png"),
                         "-o", str(output))  # fmt: skip
        assert result.exit_code == 2 and "would overwrite the input" in result.output and "--overwrite" in result.output
    result = _invoke("-m", str(folder), "-i", str(photos / "a.png"), "-o", str(photos))  # -o the image's folder
    assert result.exit_code == 2 and "would overwrite" in result.output
    np.testing.assert_array_equal(cv2.imread(str(photos / "a.png")), original)  # untouched
    result = _invoke("-m", str(folder), "-i", str(photos), "-o", str(photos), "--overwrite")
    assert result.exit_code == 0, result.output
    assert not np.array_equal(cv2.imread(str(photos / "a.png")), original)
    clip = tmp_path / "clip.avi"
    _write_video(clip, 3)
    before = clip.read_bytes()
    result = _invoke("-m", str(folder), "-i", str(clip), "-o", str(clip))
    assert result.exit_code == 2 and "would overwrite" in result.output and clip.read_bytes() == before


def test_ctrl_c_during_a_video_keeps_frames_and_exits_130(exported, tmp_path, monkeypatch):
    _, folder = exported
    clip = tmp_path / "clip.avi"
    _write_video(clip, 8)
    real = Dehazer.run_frames
    calls = []

    def interrupt_at_four(self, frames):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, frames)

    monkeypatch.setattr(Dehazer, "run_frames", interrupt_at_four)
    result = _invoke("-m", str(folder), "-i", str(clip), "-o", str(tmp_path / "out.avi"))
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and _count_frames(tmp_path / "out.avi") == 3
    record = json.loads((tmp_path / "out.run.json").read_text())
    assert record["interrupted"] is True and record["frames"] == 3


def test_an_error_mid_run_is_one_line_and_recorded(exported, tmp_path):
    _, folder = exported
    frames = tmp_path / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "a.png"), _frame(20, 24))
    cv2.imwrite(str(frames / "b.png"), _frame(30, 30))  # another size: a video cannot take it
    result = _invoke("-m", str(folder), "-i", str(frames), "-o", str(tmp_path / "out.avi"), "--precision", "fp32")
    assert result.exit_code == 2 and "differs from the video's" in result.output and "Traceback" not in result.output
    record = json.loads((tmp_path / "out.run.json").read_text())
    assert record["frames"] == 1 and "differs from the video's 24x20" in record["error"]
    assert _count_frames(tmp_path / "out.avi") == 1  # what was written is kept


def test_real_sigint_during_a_video_run(exported, tmp_path):
    """A real Ctrl-C (SIGINT to the process) while `bilalora run` writes a video: exit 130, frames and record kept."""
    import signal
    import subprocess
    import sys
    import time

    _, folder = exported
    clip = tmp_path / "long.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 25, (128, 96))
    for index in range(2000):
        writer.write(np.full((96, 128, 3), (7 * index) % 256, np.uint8))
    writer.release()
    out = tmp_path / "out" / "clear.avi"
    process_ = subprocess.Popen(
        [sys.executable, "-m", "bilalora.cli.app", "run", "-m", str(folder), "-i", str(clip), "-o", str(out),
         "--precision", "fp32"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # a shell's background job inherits SIGINT ignored, and Python then installs no handler: restore it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process_.poll() is None:
        if list(out.parent.glob(".clear.*.tmp.avi")):  # the sink has started writing frames
            time.sleep(1.0)
            break
        time.sleep(0.1)
    if process_.poll() is not None:
        pytest.skip("the run finished before it could be interrupted (machine too fast for 2000 frames)")
    process_.send_signal(signal.SIGINT)
    output, _ = process_.communicate(timeout=120)
    assert process_.returncode == 130, output
    record = json.loads((out.parent / "clear.run.json").read_text())
    assert record["interrupted"] is True and 0 < record["frames"] < 2000
    assert _count_frames(out) == record["frames"]
    assert not list(out.parent.glob(".clear.*"))  # no temporary file left


# --------------------------------------------------------------------------- choice of backend (#14.1)


def _add_openvino(folder: Path, passed: bool = True) -> Path:
    import openvino as ov

    model = ov.convert_model(str(folder / "model.onnx"))
    ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=True)

    def change(record):
        entry = model_json.file_entry(folder / "model.xml", folder, format="openvino", precision="fp16")
        entry["bin"] = model_json.file_entry(folder / "model.bin", folder)
        entry["parity"] = {"passed": passed, "inference_precision": "bf16"}
        record["artefacts"]["model.xml"] = entry

    _edit_record(folder, change)
    return folder


def test_openvino_bf16_is_chosen_where_the_cpu_has_bf16(exported, tmp_path):
    from bilalora.runtime.ov_backend import cpu_has_bf16

    model, folder = exported
    target = _add_openvino(_copy_export(folder, tmp_path / "export"))
    frame = _frame(37, 53, seed=9)
    reference = _torch_reference(model, frame)
    auto = Dehazer(target)
    if cpu_has_bf16():
        assert auto.backend.name == "openvino" and auto.describe()["precision"] == "bf16"
    else:
        assert auto.backend.name == "onnxruntime"
    assert _psnr(auto(frame), reference) >= 40.0
    fp32 = Dehazer(target, precision="fp32")
    assert fp32.backend.name == "onnxruntime" and fp32.path.name == "model.onnx"
    assert _psnr(fp32(frame), reference) >= 50.0
    big = _frame(70, 90, seed=10)  # tiled: windows from several calls are blended, none may alias another
    tiled_auto, tiled_fp32 = Dehazer(target, tile=32, overlap=8), Dehazer(target, precision="fp32", tile=32, overlap=8)
    assert _psnr(tiled_auto(big), tiled_fp32(big)) >= 40.0
    (target / "model.bin").write_bytes(b"\0" * 16)  # the weights beside model.xml swapped
    with pytest.raises(UserError, match="model.bin: sha256"):
        Dehazer(target)


def test_openvino_gated_in_f32_is_not_chosen_for_bf16_by_auto(exported, tmp_path, monkeypatch):
    from bilalora.runtime import ov_backend

    monkeypatch.setattr(ov_backend, "cpu_has_bf16", lambda: True)
    _, folder = exported
    target = _add_openvino(_copy_export(folder, tmp_path / "export"))
    _edit_record(target, lambda r: r["artefacts"]["model.xml"]["parity"].update(inference_precision="f32"))
    candidates, _ = resolve_model(target, precision="auto", notes=(notes := []))
    assert [c.backend for c in candidates] == ["onnxruntime", "onnxruntime"] and "its gate ran in f32" in notes[0]
    candidates, _ = resolve_model(target, precision="bf16", notes=(notes := []))
    assert candidates[0].backend == "openvino" and "gate ran in f32 at export" in notes[0]


def test_openvino_backend_works_without_torch(exported, tmp_path):
    from conftest import run_without_torch

    _, folder = exported
    target = _add_openvino(_copy_export(folder, tmp_path / "export"))
    from bilalora.runtime.ov_backend import cpu_has_bf16

    code = (
        "import numpy as np\n"
        "from bilalora.runtime import Dehazer\n"
        f"d = Dehazer({str(target)!r})\n"
        "assert d(np.zeros((21, 30, 3), np.uint8)).shape == (21, 30, 3)\n"
        "print('backend', d.backend.name)\n"
    )
    result = run_without_torch(code)
    assert result.returncode == 0, result.stderr + result.stdout
    assert f"backend {'openvino' if cpu_has_bf16() else 'onnxruntime'}" in result.stdout


def test_openvino_that_failed_its_gate_is_not_run(exported, tmp_path):
    _, folder = exported
    target = _add_openvino(_copy_export(folder, tmp_path / "export"), passed=False)
    printed: list[str] = []
    dehaze = Dehazer(target, precision="bf16", on_note=printed.append)
    assert dehaze.backend.name == "onnxruntime" and any("failed its parity gate" in n for n in dehaze.notes)
    assert printed == dehaze.notes  # passed-over artefacts are said as they happen, not only recorded
    result = _invoke("-m", str(target), "-i", str(_write_image(tmp_path / "a.png")), "-o", str(tmp_path / "o"),
                     "--precision", "bf16")  # fmt: skip
    assert result.exit_code == 0 and "model.xml: it failed its parity gate" in " ".join(result.output.split())


def test_int8_graph_runs_in_openvino_on_cpu_and_first_in_onnxruntime_with_tensorrt(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    for name in ("model.onnx", "model_int8.onnx"):
        _elementwise_onnx(folder / name)
    record = {"format_version": 1, "input": {"pad_multiple": 4}, "artefacts": {
        "model.onnx": model_json.file_entry(folder / "model.onnx", folder, format="onnx", precision="fp32",
                                            parity={"passed": True}),
        "model_int8.onnx": model_json.file_entry(folder / "model_int8.onnx", folder, format="onnx", precision="int8",
                                                 parity={"passed": True}),
    }}  # fmt: skip
    model_json.write_sidecar(folder, record)
    cpu, _ = resolve_model(folder, precision="int8")
    assert [(c.path.name, c.backend) for c in cpu] == [
        ("model_int8.onnx", "openvino"), ("model_int8.onnx", "onnxruntime"), ("model.onnx", "onnxruntime")
    ]
    gpu, _ = resolve_model(folder, precision="int8", providers=["TensorrtExecutionProvider", "CPUExecutionProvider"])
    assert gpu[0].backend == "onnxruntime" and gpu[0].precision == "int8"
    frame = _frame(20, 28)
    dehaze = Dehazer(folder, precision="int8")
    assert dehaze.backend.name == "openvino"
    np.testing.assert_array_equal(dehaze(frame), 255 - frame)
    notes: list[str] = []
    resolve_model(folder, precision="bf16", notes=notes)
    assert any("no model.xml" in n for n in notes)
    record["artefacts"]["model_int8.onnx"].update(removed=True, parity={"passed": False})  # failed gate, file gone
    record.update(status="failed", error="parity gate failed for model_int8.onnx (int8)")
    (folder / "model_int8.onnx").unlink()
    model_json.write_sidecar(folder, record)
    candidates, _ = resolve_model(folder, precision="int8", notes=(notes := []))
    assert [c.path.name for c in candidates] == ["model.onnx"]
    assert notes == ["this export is failed: parity gate failed for model_int8.onnx (int8)",
                     "skipped model_int8.onnx: it failed its parity gate at export"]  # fmt: skip


# --------------------------------------------------------------------------- fallback (#14.4)


def _export_with_engine(folder: Path, target: Path) -> Path:
    _copy_export(folder, target)
    (target / "model.engine").write_bytes(b"engine")

    def change(record):
        record["trt"] = {"version": "10.9.0.34", "compute_capability": "9.0", "gpu": "Fake GPU", "precision": "fp32"}
        record["artefacts"]["model.engine"] = model_json.file_entry(target / "model.engine", target,
                                                                    format="tensorrt", precision="fp32", parity=None)

    _edit_record(target, change)
    return target


def test_engine_with_foreign_io_falls_back_to_onnx_at_open(exported, tmp_path):
    _, folder = exported
    target = _export_with_engine(folder, tmp_path / "export")
    cudart = _FakeCudart()
    fake = _fake_tensorrt(cudart, io=[("images", "input", "HALF"), ("output", "output", "FLOAT")])
    dehaze = Dehazer(target, precision="fp32", _trt=fake, _cudart=cudart)
    assert dehaze.backend.name == "onnxruntime"
    assert "foreign engine I/O" in dehaze.notes[0] and "input images" in dehaze.notes[0]


def test_engine_failing_while_running_falls_back_to_onnx(exported, tmp_path):
    model, folder = exported
    target = _export_with_engine(folder, tmp_path / "export")
    cudart = _FakeCudart()
    printed: list[str] = []
    dehaze = Dehazer(target, precision="fp32", _trt=_fake_tensorrt(cudart, fail_run=True), _cudart=cudart,
                     on_note=printed.append)  # fmt: skip
    assert dehaze.backend.name == "tensorrt"
    frame = _frame(30, 36, seed=3)
    out = dehaze(frame)
    assert dehaze.backend.name == "onnxruntime" and dehaze.path.name == "model.onnx"
    assert any("failed while running (CUDA error 700" in n for n in printed) and printed == dehaze.notes
    assert "free" in cudart.calls  # the failed engine was closed
    assert _psnr(out, _torch_reference(model, frame)) >= 50.0
    only_engine = Dehazer(target / "model.engine", prefer="engine", _trt=_fake_tensorrt(cudart, fail_run=True),
                          _cudart=cudart)  # fmt: skip
    with pytest.raises(RuntimeError, match="CUDA error 700"):  # nothing to fall back to: the error stands
        only_engine(frame)


def test_onnx_graph_with_foreign_io_dtypes_is_one_line(tmp_path):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT16, ["N", 3, "H", "W"])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT16, ["N", 3, "H", "W"])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "half", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "half.onnx"))
    with pytest.raises(UserError, match=r"tensor\(float16\) -> output tensor\(float16\); bilalora graphs take float32"):
        Dehazer(tmp_path / "half.onnx")


# --------------------------------------------------------------------------- fixed batch (#14.4)


def _static_batch_onnx(path: Path, batch: int) -> Path:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, "H", "W"])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, 3, "H", "W"])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    graph = helper.make_graph([helper.make_node("Sub", ["one", "input"], ["output"])], "invert", [x], [y], [one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_fixed_batch_exports_run_in_batches_of_n(tmp_path):
    dehaze = Dehazer(_static_batch_onnx(tmp_path / "b3.onnx", 3))
    assert dehaze.batch_size == 3
    batches = []
    real_run = dehaze.backend.run
    dehaze.backend.run = lambda batch: batches.append(batch.shape) or real_run(batch)
    frames = [_frame(20, 24, seed=i) for i in range(5)]
    for out, frame in zip(dehaze.run_frames(frames), frames):
        np.testing.assert_array_equal(out, 255 - frame)
    assert [b[0] for b in batches] == [3, 3]  # 5 frames: a full batch and one padded with copies
    one = _frame(17, 19, seed=8)
    np.testing.assert_array_equal(dehaze(one), 255 - one)  # one frame alone is padded to N too
    src = tmp_path / "frames"
    src.mkdir()
    for index in range(7):
        cv2.imwrite(str(src / f"f{index}.png"), _frame(20, 24, seed=index))
    batches.clear()
    source = open_source(src)
    report = process(source, open_sink(tmp_path / "out", source), dehaze)
    assert report.frames == 7 and [b[0] for b in batches] == [3, 3, 3]
    for index in range(7):
        np.testing.assert_array_equal(cv2.imread(str(tmp_path / "out" / f"f{index}.png")), 255 - _frame(20, 24, seed=index))


# --------------------------------------------------------------------------- onnxruntime TensorRT options (#14.5)


def test_tensorrt_provider_options(tmp_path, monkeypatch):
    monkeypatch.delenv("BILALORA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    record = {"shapes": {"fixed": None, "min": [1, 3, 64, 64], "opt": [1, 3, 720, 1280], "max": [2, 3, 1080, 1920]}}
    options = tensorrt_provider_options(record, precision="fp16")
    cache = tmp_path / "xdg" / "bilalora" / "trt" / "onnxruntime"
    assert options == {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        "trt_fp16_enable": True,
        "trt_int8_enable": False,
        "trt_profile_min_shapes": "input:1x3x64x64",
        "trt_profile_opt_shapes": "input:1x3x720x1280",
        "trt_profile_max_shapes": "input:2x3x1080x1920",
    }
    assert cache.is_dir()
    fixed = tensorrt_provider_options({"shapes": {"fixed": [4, 3, 256, 256]}}, precision="fp32", int8=True)
    assert fixed["trt_profile_min_shapes"] == fixed["trt_profile_max_shapes"] == "input:4x3x256x256"
    assert fixed["trt_fp16_enable"] is False and fixed["trt_int8_enable"] is True
    assert "trt_profile_min_shapes" not in tensorrt_provider_options(None)
    specs = session_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], record)
    assert specs[0][0] == "TensorrtExecutionProvider" and specs[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setenv("BILALORA_CACHE_DIR", str(tmp_path / "mine"))
    assert tensorrt_provider_options()["trt_engine_cache_path"] == str(tmp_path / "mine" / "trt" / "onnxruntime")


# --------------------------------------------------------------------------- CUDA majors in `bilalora info` (#14.3)


def test_cuda_majors_of_the_installed_pieces(monkeypatch):
    from bilalora.runtime import cuda_stack

    installed = {"torch": "2.6.0", "onnxruntime-gpu": "1.22.0", "tensorrt": "10.13.0", "tensorrt-cu13": "10.13.0",
                 "cuda-python": "13.0.1"}  # fmt: skip
    requires = {"torch": ["nvidia-cudnn-cu12==9.1; platform_system == 'Linux'"],
                "onnxruntime-gpu": ["nvidia-cuda-runtime-cu12~=12.0; extra == 'cuda'"],
                "tensorrt": ["tensorrt-cu13==10.13.0"]}  # fmt: skip
    monkeypatch.setattr(cuda_stack, "_dist_version", installed.get)
    monkeypatch.setattr(cuda_stack, "_dist_requires", lambda name: requires.get(name, []))
    majors = cuda_stack.cuda_majors(torch_cuda=None)
    assert {k: v["major"] for k, v in majors.items()} == {
        "torch": 12, "onnxruntime-gpu": 12, "tensorrt": 13, "cuda-python": 13
    }
    problem = cuda_stack.stack_problem(majors)
    assert "mixed CUDA majors" in problem and "tensorrt CUDA 13" in problem and "tensorrt-cu12" in problem
    installed.pop("tensorrt-cu13")
    installed.update({"tensorrt-cu12": "10.13.0", "cuda-python": "12.9.0"})
    assert cuda_stack.stack_problem(cuda_stack.cuda_majors(torch_cuda="12.4")) is None
    assert cuda_stack.cuda_majors("12.4")["torch"]["detail"] == "torch 2.6.0 (CUDA 12.4)"


def test_info_lists_cuda_majors():
    from typer.testing import CliRunner

    from bilalora.cli.app import app

    result = CliRunner().invoke(app, ["info"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for piece in ("torch", "onnxruntime-gpu", "tensorrt", "cuda-python"):
        assert f"CUDA major: {piece}" in result.output
    assert "CPU bf16 (OpenVINO)" in result.output


def test_fixed_shape_batch_export_runs_in_batches(tmp_path):
    """`export --shape 32x32 --batch 2` end to end: the runtime sends exactly 2 windows per call and matches PyTorch."""
    import torch
    from safetensors.torch import save_file

    from bilalora import backbones
    from bilalora.export.pipeline import ExportOptions, run_export

    torch.manual_seed(5)
    model = backbones.create("dea-net-t").eval()
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    run_export(ExportOptions(base=True, backbone="dea-net-t", weights=str(weights), out=tmp_path / "export",
                             shape="32x32", batch=2, slim=False))  # fmt: skip
    dehaze = Dehazer(tmp_path / "export", precision="fp32")
    assert dehaze.batch_size == 2 and dehaze.backend.fixed_hw == (32, 32)
    shapes = []
    real_run = dehaze.backend.run
    dehaze.backend.run = lambda batch: shapes.append(batch.shape) or real_run(batch)
    frames = [_frame(24, 28, seed=i) for i in range(3)]
    outs = dehaze.run_frames(frames)
    assert shapes == [(2, 3, 32, 32), (2, 3, 32, 32)]  # 3 frames: one full batch, one padded
    for out, frame in zip(outs, frames):
        # what the runtime must compute: RGB [0, 1], edge-padded bottom-right to the fixed 32x32, run, crop, round
        rgb = torch.from_numpy(frame[:, :, ::-1].copy()).permute(2, 0, 1)[None].float() / 255
        padded = torch.nn.functional.pad(rgb, (0, 32 - 28, 0, 32 - 24), mode="replicate")
        with torch.no_grad():
            ref = model(padded)[..., :24, :28].clamp(0, 1)
        ref = (ref[0].permute(1, 2, 0).numpy()[:, :, ::-1] * 255).round().astype(np.uint8)
        assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
