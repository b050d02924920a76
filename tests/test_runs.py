"""Run-folder numbering and the newest-run lookup that chains adapt -> export -> bench."""

import os

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
