"""Run-folder numbering and the newest-run lookup that chains adapt -> export -> bench."""

import os
from pathlib import Path

from bilalora.runs import ADAPTER_NAME, latest_adapter_run, new_run_dir


def test_numbering(tmp_path):
    root = tmp_path / "runs" / "adapt"
    assert new_run_dir(root).name == "exp"
    assert new_run_dir(root).name == "exp2"
    assert new_run_dir(root).name == "exp3"
    assert new_run_dir(root, "day").name == "day"
    assert new_run_dir(root, "day").name == "day2"
    assert new_run_dir(root, "day", exist_ok=True).name == "day"


def test_latest_adapter_run(tmp_path):
    root = tmp_path / "adapt"
    assert latest_adapter_run(root) is None
    first, second, unfinished = new_run_dir(root), new_run_dir(root), new_run_dir(root)
    (first / ADAPTER_NAME).write_bytes(b"a")
    (second / ADAPTER_NAME).write_bytes(b"b")
    os.utime(first / ADAPTER_NAME, ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))
    assert latest_adapter_run(root) == first
    assert unfinished.exists() and latest_adapter_run(root) != unfinished


def test_choose_run_dir_refuses_an_earlier_run(tmp_path):
    import pytest

    from bilalora.errors import UserError
    from bilalora.runs import CHECKPOINT_NAME, check_run_dir, choose_run_dir, latest_resumable_run

    root = tmp_path / "adapt"
    out = tmp_path / "mine"
    assert choose_run_dir(out, None, resume=False, root=root) == out  # a new folder is fine
    out.mkdir()
    assert choose_run_dir(out, None, resume=False, root=root) == out  # an empty one too
    (out / "summary.json").write_text("{}")
    with pytest.raises(UserError, match="already holds a run.*--resume.*--exist-ok"):
        choose_run_dir(out, None, resume=False, root=root)
    assert choose_run_dir(out, None, resume=False, exist_ok=True, root=root) == out
    with pytest.raises(UserError, match="no checkpoint"):
        choose_run_dir(out, None, resume=True, root=root)
    with pytest.raises(UserError, match="no interrupted run"):
        choose_run_dir(None, None, resume=True, root=root)
    older, newer = root / "a", root / "b"
    for folder, stamp in ((older, 1_000_000_000), (newer, 2_000_000_000)):
        (folder / CHECKPOINT_NAME).parent.mkdir(parents=True)
        (folder / CHECKPOINT_NAME).write_bytes(b"x")
        os.utime(folder / CHECKPOINT_NAME, (stamp, stamp))
    assert latest_resumable_run(root) == newer
    (newer / ADAPTER_NAME).write_bytes(b"finished")  # a finished run is not what a bare --resume means
    assert latest_resumable_run(root) == older
    (newer / ADAPTER_NAME).unlink()
    assert choose_run_dir(None, None, resume=True, root=root) == newer
    assert choose_run_dir(None, "a", resume=True, root=root) == older
    assert choose_run_dir(None, "a", resume=False, root=root).name == "a2"  # a name is numbered, never reused
    check_run_dir(older, resume=True, exist_ok=False)


def test_read_split_resolves_against_images_root(tmp_path):
    import json

    import pytest

    from bilalora.errors import UserError
    from bilalora.runs import read_split

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(UserError, match="no split.json"):
        read_split(run)
    (run / "split.json").write_text(json.dumps({"images_root": "/data/cam", "train": ["a.jpg"], "val": ["b.jpg"],
                                                "test": ["sub/c.jpg"]}))
    split = read_split(run)
    assert split == {"train": [Path("/data/cam/a.jpg")], "val": [Path("/data/cam/b.jpg")],
                     "test": [Path("/data/cam/sub/c.jpg")]}
    (run / "split.json").write_text(json.dumps({"train": ["x/a.jpg"], "val": ["x/b.jpg"]}))  # written before 'test'
    assert read_split(run)["test"] == [] and read_split(run)["val"] == [Path("x/b.jpg")]
    (run / "split.json").write_text("[1, 2")
    with pytest.raises(UserError, match="not readable"):
        read_split(run)
