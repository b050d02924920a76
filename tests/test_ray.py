"""Fleet runs on a real local Ray cluster: same bytes as a one-process run, retries, resume, catalogue; plus the
Ray-free parts (manifest, ledger, keyframe chunks) and the torch-free / Ray-absent imports."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from bilalora.runtime.chunks import VideoInfo, iter_video_range, plan_chunks, scan_video
from bilalora.runtime.manifest import Job, Ledger, file_digest, input_stamp, model_key, read_manifest
from conftest import run_without_torch, write_hazy_images  # tests/ is on sys.path under pytest

from bilalora.errors import UserError



# --------------------------------------------------------------------------- inputs


def _write_video(path: Path, frames: int = 30, size=(40, 56), fourcc: str = "mp4v") -> Path:
    """A smooth moving pattern (so mp4v makes P-frames between its keyframes)."""
    height, width = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 25, (width, height))
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(frames):
        writer.write(np.stack([(xx * 4 + i * 3) % 256, (yy * 5 + i) % 256, ((xx + yy) * 2 + i) % 256], -1).astype(np.uint8))
    writer.release()
    return path


def _decode_all(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, image = capture.read()
        if not ok:
            break
        frames.append(image)
    capture.release()
    return frames


# --------------------------------------------------------------------------- Ray-free parts


def test_manifest_csv_and_json_resolve_relative_paths(tmp_path):
    (tmp_path / "m.csv").write_text("input,output,model\ncam1/a.mp4,out/a.mp4,cams/1\n/abs/b,out/b,\n")
    jobs = read_manifest(tmp_path / "m.csv")
    assert jobs == [Job(str(tmp_path / "cam1/a.mp4"), str(tmp_path / "out/a.mp4"), str(tmp_path / "cams/1")),
                    Job("/abs/b", str(tmp_path / "out/b"), None)]  # fmt: skip
    (tmp_path / "m.json").write_text(json.dumps({"jobs": [{"input": "x", "output": "y", "export": "e"}]}))
    assert read_manifest(tmp_path / "m.json") == [Job(str(tmp_path / "x"), str(tmp_path / "y"), str(tmp_path / "e"))]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("a.csv", "input,output\nx,\n", "no output"),
        ("b.csv", "x,y\n1,2\n", "header"),
        ("c.csv", "input,output\nx,o\ny,./o\n", "both write"),
        ("d.json", "{not json", "not valid JSON"),
        ("e.json", "[1, 2]", "list of"),
        ("f.yaml", "input: x", ".csv or .json"),
        ("g.csv", "input,output,model\n", "no rows"),
    ],
)
def test_bad_manifests_are_one_line_errors(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=message):
        read_manifest(tmp_path / name)


def test_ledger_matches_only_unchanged_outputs(tmp_path):
    source, output = tmp_path / "in.png", tmp_path / "out" / "in.png"
    source.write_bytes(b"input")
    output.parent.mkdir()
    output.write_bytes(b"dehazed")
    ledger = Ledger(output.parent)
    ledger.add("in.png", *file_digest(output), input_stamp(source), "key1")
    with open(ledger.path, "a") as handle:
        handle.write('{"name": "torn')  # a crash mid-line
    fresh = Ledger(output.parent)
    assert fresh.done("in.png", input_stamp(source), "key1")
    assert not fresh.done("in.png", input_stamp(source), "key2")  # another model
    assert not fresh.done("other.png", input_stamp(source), "key1")
    output.write_bytes(b"dehazeX")  # same size, other bytes
    assert not Ledger(output.parent).done("in.png", input_stamp(source), "key1")
    output.write_bytes(b"dehazed")
    source.write_bytes(b"changed input")
    assert not Ledger(output.parent).done("in.png", input_stamp(source), "key1")


def test_model_key_follows_the_files_and_the_pixel_options(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"graph")
    key = model_key(tmp_path, {"tile": None})
    assert key == model_key(tmp_path, {"tile": None})
    assert key != model_key(tmp_path, {"tile": 64})
    (tmp_path / "model.onnx").write_bytes(b"graph2")
    assert key != model_key(tmp_path, {"tile": None})


def test_chunks_start_on_keyframes_and_cover_the_video():
    info = VideoInfo("v.mp4", 100, 25.0, 64, 48, keyframes=[0, 12, 24, 36, 48, 60, 72, 84, 96])
    assert plan_chunks(info, 20) == [(0, 24), (24, 48), (48, 72), (72, 96), (96, 100)]
    assert plan_chunks(info, 5) == [(0, 12), (12, 24), (24, 36), (36, 48), (48, 60), (60, 72), (72, 84), (84, 96), (96, 100)]
    # groups of pictures over 4x the chunk (or one keyframe for the whole file, or none known): fixed ranges
    assert plan_chunks(info, 2) == [(i, min(i + 2, 100)) for i in range(0, 100, 2)]
    assert plan_chunks(VideoInfo("v", 200, 25.0, 8, 8, keyframes=[0]), 30) == [(i, min(i + 30, 200)) for i in range(0, 200, 30)]
    assert plan_chunks(VideoInfo("v", 100, 25.0, 8, 8, keyframes=[0]), 30) == [(0, 100)]  # within 4x: one chunk
    assert plan_chunks(VideoInfo("v", 10, 25.0, 8, 8, keyframes=None), 4) == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(UserError, match="chunk-frames"):
        plan_chunks(info, 0)


def test_scanned_chunks_decode_to_the_sequential_frames(tmp_path):
    video = _write_video(tmp_path / "v.mp4", frames=40)
    info = scan_video(video)
    assert info.frames == 40 and info.keyframes and info.keyframes[0] == 0
    assert len(info.keyframes) < 40  # P-frames between keyframes, so chunking at keyframes means something
    sequential = _decode_all(video)
    for chunks in (plan_chunks(info, 5), [(0, 7), (7, 19), (19, 40)]):  # keyframe-aligned, then arbitrary
        frames = [f for start, stop in chunks for f in iter_video_range(video, start, stop)]
        assert len(frames) == 40 and all(np.array_equal(a, b) for a, b in zip(frames, sequential))


def test_fleet_modules_are_torch_free_and_ray_is_lazy():
    code = (
        "import builtins\n"
        "real2 = builtins.__import__\n"
        "def no_ray(name, *a, **k):\n"
        "    if name == 'ray' or name.startswith('ray.'): raise ImportError('no ray here')\n"
        "    return real2(name, *a, **k)\n"
        "builtins.__import__ = no_ray\n"
        "import sys\n"
        "import bilalora.runtime.ray as r, bilalora.runtime.fleet, bilalora.runtime.chunks, bilalora.runtime.manifest\n"
        "from bilalora.errors import UserError\n"
        "try:\n"
        "    r.import_ray()\n"
        "except UserError as exc:\n"
        "    print('MSG', exc.message)\n"
        "assert 'torch' not in sys.modules\n"
        "print('OK')\n"
    )
    done = run_without_torch(code)
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout and "pip install 'bilalora[ray]'" in done.stdout


# --------------------------------------------------------------------------- real cluster


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU local Ray cluster for this module, shut down at the end (its address is yielded)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the crash-once factory below
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _export(folder: Path, seed: int) -> Path:
    import torch
    from bilalora.export.pipeline import ExportOptions, run_export
    from safetensors.torch import save_file

    from bilalora import backbones

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = backbones.create("dea-net-t").eval()
    weights = folder / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    run_export(ExportOptions(base=True, backbone="dea-net-t", weights=str(weights), out=folder / "export", fp16=False,
                             parity_sizes=((32, 48),), slim=False))  # fmt: skip
    return folder / "export"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two tiny exported dea-net-t models (different weights), 6 images and a 30-frame video."""
    root = tmp_path_factory.mktemp("fleet")
    write_hazy_images(root / "frames", count=6, size=(40, 56))
    return {
        "root": root,
        "model_a": _export(root / "a", 3),
        "model_b": _export(root / "b", 4),
        "frames": root / "frames",
        "video": _write_video(root / "flight.mp4", frames=30),
    }


def _single(inputs, source: Path, output: Path, model: Path) -> Path:
    """The one-process `run` this must equal."""
    from bilalora.runtime import Dehazer, open_sink, open_source, process

    src = open_source(str(source))
    with Dehazer(model, threads=1) as dehazer:
        process(src, open_sink(output, src), dehazer)
    return output


def _fleet(jobs, model, **options):
    from bilalora.runtime.ray import FleetOptions, run_fleet

    options.setdefault("dehazer", {"threads": 1})
    options.setdefault("batch", 2)
    options.setdefault("chunk_frames", 5)
    return run_fleet(jobs, str(model), FleetOptions(**options))


def _same_images(a: Path, b: Path) -> None:
    def images(folder: Path) -> list[str]:
        return sorted(p.name for p in folder.iterdir() if p.suffix in (".png", ".jpg"))

    names = images(a)
    assert names and names == images(b)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _same_video(a: Path, b: Path) -> None:
    frames_a, frames_b = _decode_all(a), _decode_all(b)
    assert len(frames_a) == len(frames_b) > 0
    assert all(np.array_equal(x, y) for x, y in zip(frames_a, frames_b))
    assert a.read_bytes() == b.read_bytes()


def test_two_workers_equal_one_process(cluster, inputs, tmp_path):
    model = inputs["model_a"]
    ref_images = _single(inputs, inputs["frames"], tmp_path / "ref_images", model)
    ref_video = _single(inputs, inputs["video"], tmp_path / "ref.mp4", model)
    one = inputs["frames"] / "hazy_02.png"
    jobs = [Job(str(inputs["frames"]), str(tmp_path / "images")), Job(str(inputs["video"]), str(tmp_path / "out.mp4")),
            Job(str(inputs["video"]), str(tmp_path / "video_frames")),
            Job(str(inputs["frames"]), str(tmp_path / "slideshow.avi")), Job(str(one), str(tmp_path / "one" / "x.png"))]  # fmt: skip
    record = _fleet(jobs, model, workers=2)
    _same_images(ref_images, tmp_path / "images")
    _same_video(ref_video, tmp_path / "out.mp4")
    # a folder of images to a video (in order, across tasks), and one image to an image path
    _same_video(_single(inputs, inputs["frames"], tmp_path / "ref_slideshow.avi", model), tmp_path / "slideshow.avi")
    _same_images(_single(inputs, one, tmp_path / "ref_one" / "x.png", model).parent, tmp_path / "one")
    # video -> image folder: the one-process run's frame_000001.png ... names and bytes
    ref_frames = _single(inputs, inputs["video"], tmp_path / "ref_frames", model)
    _same_images(ref_frames, tmp_path / "video_frames")
    workers = record["ray"]["workers"]
    assert len(workers) == 2 and all(w["frames"] > 0 for w in workers)  # both did work
    assert record["frames"] == 6 + 30 + 30 + 6 + 1 == sum(w["frames"] for w in workers)
    assert record["jobs"][1]["items"] > 1  # the video really was split
    assert all(w["model_loads"] == 1 for w in workers)  # loaded once per worker, not per task
    assert not list(tmp_path.glob("**/.*tmp*"))  # no temporary files left


def test_run_ray_joins_a_running_cluster_in_a_process_without_torch(cluster, inputs, tmp_path):
    """The command as a fleet server runs it: torch not installed, the cluster named by $RAY_ADDRESS."""
    argv = ["bilalora", "run", "--ray", "-m", str(inputs["model_a"]), "-i", str(inputs["video"]), "-o",
            str(tmp_path / "out.mp4"), "--threads", "1", "--chunk-frames", "5"]  # fmt: skip
    code = (
        "import os, sys\n"
        f"os.environ['RAY_ADDRESS'] = {cluster!r}\n"
        f"sys.argv = {argv!r}\n"
        "from bilalora.cli.app import main\n"
        "try:\n"
        "    main()\n"
        "finally:\n"
        "    print('TORCH LOADED' if 'torch' in sys.modules else 'NO TORCH')\n"
    )
    done = run_without_torch(code, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "NO TORCH" in done.stdout and "run --ray:" in done.stdout
    _same_video(_single(inputs, inputs["video"], tmp_path / "ref.mp4", inputs["model_a"]), tmp_path / "out.mp4")
    record = json.loads((tmp_path / "out.run.json").read_text())
    assert record["ray"]["address"] == cluster and record["ray"]["items"] > 1
    # the same record as a one-process run, plus the fleet's keys
    from typer.testing import CliRunner

    from bilalora.cli.app import app

    one = CliRunner().invoke(app, ["run", "-m", str(inputs["model_a"]), "-i", str(inputs["video"]), "-o",
                                   str(tmp_path / "one.mp4"), "--threads", "1"])  # fmt: skip
    assert one.exit_code == 0, one.output
    single = json.loads((tmp_path / "one.run.json").read_text())
    assert set(single) <= set(record) and set(single["input"]) == set(record["input"])
    assert single["frames"] == record["frames"] == 30


def test_bad_files_are_skipped_and_named_as_in_one_process(cluster, inputs, tmp_path):
    from bad_corpus import make_bad_corpus

    from bilalora.runtime import Dehazer, open_sink, open_source, process

    corpus = make_bad_corpus(tmp_path / "mixed")
    source = open_source(str(tmp_path / "mixed"))
    with Dehazer(inputs["model_a"], threads=1) as dehazer:
        single = process(source, open_sink(tmp_path / "ref", source), dehazer)
    record = _fleet([Job(str(tmp_path / "mixed"), str(tmp_path / "out"))], inputs["model_a"], workers=2, batch=3)
    assert sorted((s["name"], s["reason"]) for s in record["skipped"]) == sorted(single.skipped)
    assert {s["name"] for s in record["skipped"]} == set(corpus["bad"])
    assert record["frames"] == single.frames == len(corpus["good"])
    _same_images(tmp_path / "ref", tmp_path / "out")


class CrashOnce:
    """A Dehazer factory whose dehazers kill their worker process on first use while ``marker`` exists."""

    def __init__(self, marker: str):
        self.marker = marker

    def __call__(self, model, **options):
        from bilalora.runtime.dehazer import Dehazer

        dehazer = Dehazer(model, **options)
        marker = self.marker

        class Crashing:
            def __call__(self, frame):
                try:
                    os.remove(marker)
                except FileNotFoundError:
                    return dehazer(frame)
                os._exit(1)  # the worker dies mid-item, as on a lost node or the OOM killer

            def describe(self):
                return dehazer.describe()

            def close(self):
                dehazer.close()

        return Crashing()


def test_a_dead_worker_is_restarted_and_its_item_retried(cluster, inputs, tmp_path):
    from bilalora.runtime.ray import FleetOptions, run_fleet

    model = inputs["model_a"]
    marker = tmp_path / "crash-once"
    marker.write_text("x")
    jobs = [Job(str(inputs["frames"]), str(tmp_path / "images")), Job(str(inputs["video"]), str(tmp_path / "out.mp4"))]
    record = run_fleet(jobs, str(model), FleetOptions(workers=2, batch=2, chunk_frames=5, dehazer={"threads": 1}),
                       factory=CrashOnce(str(marker)))  # fmt: skip
    assert not marker.exists()  # the crash happened
    assert sum(w["restarts"] for w in record["ray"]["workers"]) == 1
    _same_images(_single(inputs, inputs["frames"], tmp_path / "ref_images", model), tmp_path / "images")
    _same_video(_single(inputs, inputs["video"], tmp_path / "ref.mp4", model), tmp_path / "out.mp4")
    assert record["frames"] == 36


def test_resume_does_no_work_and_redoes_what_changed(cluster, inputs, tmp_path):
    frames = tmp_path / "frames"
    write_hazy_images(frames, count=6, size=(40, 56))
    jobs = [Job(str(frames), str(tmp_path / "images")), Job(str(inputs["video"]), str(tmp_path / "out.mp4"))]
    first = _fleet(jobs, inputs["model_a"], workers=2, resume=True)
    assert first["frames"] == 36
    outputs = sorted((tmp_path / "images").glob("*.png")) + [tmp_path / "out.mp4"]
    before = {p: p.stat().st_mtime_ns for p in outputs}

    again = _fleet(jobs, inputs["model_a"], workers=2, resume=True)
    assert again["frames"] == 0 and again["ray"]["items"] == 0 and again["ray"]["workers"] == []
    assert again["ray"]["resumed_outputs"] == 7
    assert {p: p.stat().st_mtime_ns for p in outputs} == before

    write_hazy_images(tmp_path / "new", count=1, size=(40, 56), seed=9)  # one input changes
    os.replace(tmp_path / "new" / "hazy_00.png", frames / "hazy_03.png")
    (tmp_path / "images" / "hazy_05.png").write_bytes(b"truncated")  # one output is damaged
    third = _fleet(jobs, inputs["model_a"], workers=2, resume=True)
    assert third["frames"] == 2 and third["ray"]["resumed_outputs"] == 5
    _same_images(_single(inputs, frames, tmp_path / "ref", inputs["model_a"]), tmp_path / "images")
    # another model is another result: nothing is skipped
    assert _fleet(jobs, inputs["model_b"], workers=2, resume=True)["frames"] == 36


def test_manifest_gives_each_camera_its_own_model_through_the_cli(cluster, inputs, tmp_path):
    from bilalora.cli.app import app
    from typer.testing import CliRunner

    manifest = tmp_path / "fleet.csv"
    manifest.write_text(
        "input,output,model\n"
        f"{inputs['frames']},cam_a/,{inputs['model_a']}\n"
        f"{inputs['frames']},cam_b/,{inputs['model_b']}\n"
        f"{inputs['video']},cam_b.mp4,\n"
    )
    result = CliRunner().invoke(app, ["run", "--ray", "--manifest", str(manifest), "--model", str(inputs["model_a"]),
                                      "--threads", "1", "--batch", "3", "--chunk-frames", "5"])  # fmt: skip
    assert result.exit_code == 0, result.output
    _same_images(_single(inputs, inputs["frames"], tmp_path / "ref_a", inputs["model_a"]), tmp_path / "cam_a")
    _same_images(_single(inputs, inputs["frames"], tmp_path / "ref_b", inputs["model_b"]), tmp_path / "cam_b")
    _same_video(_single(inputs, inputs["video"], tmp_path / "ref.mp4", inputs["model_a"]), tmp_path / "cam_b.mp4")
    with pytest.raises(AssertionError):  # the two cameras' models really differ
        _same_images(tmp_path / "cam_a", tmp_path / "cam_b")
    record = json.loads((tmp_path / "fleet.run.json").read_text())
    assert record["command"] == "run" and record["frames"] == 42 and len(record["jobs"]) == 3
    assert {m["model"] for m in record["models"]} == {str(inputs["model_a"]), str(inputs["model_b"])}
    assert all(w["fps_busy"] > 0 for w in record["ray"]["workers"])


def test_a_model_that_fails_in_the_workers_is_one_line_and_workers_fit_the_cluster(cluster, inputs, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"this is not an onnx graph")
    with pytest.raises(UserError) as caught:
        _fleet([Job(str(inputs["frames"]), str(tmp_path / "out"))], broken, workers=2)
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)
    record = _fleet([Job(str(inputs["frames"]), str(tmp_path / "out"))], inputs["model_a"], workers=5)
    assert len(record["ray"]["workers"]) == 2 and "fits 2 worker(s)" in record["ray"]["notes"][0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "0", "--output", "o"], "cameras and streams"),
        (["--input", "{frames}", "--output", "o", "--night-model", "{model}"], "--night-model is not available"),
        (["--input", "{frames}"], "give --input and --output"),
        (["--manifest", "missing.csv"], "no such file"),
        (["--input", "{frames}", "--output", "{frames}"], "would overwrite"),
        (["--input", "{video}", "--output", "o.mp4", "--chunk-frames", "0"], "--chunk-frames 0"),
    ],
)
def test_cli_mistakes_are_one_line(inputs, tmp_path, args, message):
    from bilalora.cli.app import app
    from typer.testing import CliRunner

    args = [a.format(frames=inputs["frames"], model=inputs["model_a"], video=inputs["video"]) for a in args]
    result = CliRunner().invoke(app, ["run", "--ray", "--model", str(inputs["model_a"]), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
