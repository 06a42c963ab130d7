"""The trace disk fills up mid-run (a 32 MiB tmpfs as the run directory; after step 2 another file takes all the
room left): the run stops with an error that says so, and the store keeps every rollout written before,
readable and whole."""

import sqlite3
import subprocess
from contextlib import closing

import pytest

from gymrl.traces.store import TRACE_FILE
from gymrl.train.loop import train
from gymrl.train.metrics import read_metrics


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)], check=True)  # CI runs as root
    yield disk
    subprocess.run(["umount", str(disk)], check=True)  # busy if the run left a file open


def test_a_full_trace_disk_stops_the_run_and_keeps_what_was_written(reset_session, small_disk, run_config, trained_per_step):
    session = reset_session()

    def fill_after_step_2(step, record, eval_reward):
        if step == 2:
            with (small_disk / "filler").open("wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * (1 << 16))
                except OSError:  # ENOSPC: the disk is full
                    pass

    with run_config(session, small_disk, 8):
        with pytest.raises(OSError, match=r"disk full|No space left on device") as caught:
            train(session, fill_after_step_2)
    print(f"the run stopped with: {caught.value}")
    assert "could not write rollouts" in str(caught.value) or "metrics" in str(caught.traceback[-1].path), caught
    with closing(sqlite3.connect(small_disk / TRACE_FILE)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        evals = db.execute("SELECT count(*) FROM rollouts WHERE split = 'eval'").fetchone()[0]
    per_step = trained_per_step(small_disk)
    trained = [r["step"] for r in read_metrics(small_disk / "metrics.jsonl") if r["step"] > 0]
    assert evals > 0 and 2 <= len(trained) < 8
    for step in trained:  # every step that trained has all its rollouts in the store
        assert per_step[step] == 128, (step, per_step)
