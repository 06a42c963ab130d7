import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gymrl.config import ConfigError, describe_fields, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def demo_dict() -> dict:
    return yaml.safe_load(DEMO.read_text())


def test_demo_config_is_valid():
    cfg = load_config(DEMO)
    assert cfg.sampling.temperature == 1.0 and cfg.sampling.top_p == 1.0
    assert cfg.model.build_tiny is not None


def test_typo_names_the_key():
    data = demo_dict()
    data["train"]["learning_rat"] = 0.1
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rat'"):
        parse_config(data, "x.yaml")


def test_bad_value_names_key_and_value():
    data = demo_dict()
    data["train"]["group_size"] = "many"
    with pytest.raises(ConfigError, match=r"bad value for 'train.group_size'.*'many'"):
        parse_config(data, "x.yaml")


def test_missing_required_section():
    with pytest.raises(ConfigError, match=r"missing key 'model'"):
        parse_config({}, "x.yaml")


def test_context_too_small_for_max_tokens():
    with pytest.raises(ConfigError, match=r"max_tokens .* engine.max_model_len"):
        load_config(DEMO, {"engine.max_model_len": 16, "sampling.max_tokens": 20})


def test_overrides_and_missing_file(tmp_path):
    assert load_config(DEMO, {"train.steps": 3}).train.steps == 3
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_field_is_documented():
    rows = describe_fields()
    assert any(key == "train.loss_type" for key, _, _ in rows)
    undocumented = [key for key, _, desc in rows if not desc]
    assert undocumented == []


def _gymrl(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gymrl.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    # Progress output (e.g. a first-time model build) may come before it; the error is one line.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    for needle in needles:
        assert needle in errors[0]


def test_cli_typo_gives_one_line_error(tmp_path):
    data = demo_dict()
    data["sampling"]["temprature"] = 0.5
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(data))
    _assert_one_line_error(_gymrl("train", str(path)), "unknown key 'sampling.temprature'")


def test_cli_missing_model_path_gives_one_line_error(tmp_path):
    data = demo_dict()
    data["model"] = {"path": str(tmp_path / "no-such-model")}
    path = tmp_path / "nomodel.yaml"
    path.write_text(yaml.safe_dump(data))
    _assert_one_line_error(_gymrl("train", str(path)), "model.path", "no-such-model")


def test_cli_prompt_longer_than_context_gives_one_line_error(tmp_path, demo_model):
    # The tiny model is in the cache (built by the fixture); the check fails before Ray or vLLM start.
    proc = _gymrl("train", str(DEMO), "--set", "engine.max_model_len=24", "--set", "sampling.max_tokens=16",
                  "--set", f"model.cache_dir={ROOT / '.cache' / 'models'}")
    _assert_one_line_error(proc, "exceeds engine.max_model_len=24")


def test_cli_bad_lora_targets_give_one_line_error(demo_model, tmp_path):
    # Checked against the loaded model, before the environment server, Ray or vLLM start (nothing in run_dir).
    proc = _gymrl("train", str(DEMO), "--set", "train.lora.target_modules=[query, value]",
                  "--set", f"model.cache_dir={ROOT / '.cache' / 'models'}", "--set", f"run_dir={tmp_path / 'run'}")
    _assert_one_line_error(proc, "train.lora.target_modules", "match no linear module", "q_proj")
    assert not (tmp_path / "run").exists()


def test_cli_unknown_tool_call_parser_gives_one_line_error():
    proc = _gymrl("train", str(ROOT / "configs" / "tool_use.yaml"), "--set", "rollout.tool_call_parser=qwen9",
                  "--set", "model.path=/nonexistent")
    _assert_one_line_error(proc, "rollout.tool_call_parser: unknown parser 'qwen9'", "qwen3_coder")


def test_help_config_lists_keys():
    proc = _gymrl("train", "--help-config")
    assert proc.returncode == 0 and "train.group_size" in proc.stdout


def test_sleep_while_training_needs_a_cuda_engine_and_a_sync_run():
    cuda = {"engine.device": "cuda", "train.device": "cuda", "engine.sleep_while_training": True}
    assert load_config(DEMO, cuda).engine.sleep_while_training
    with pytest.raises(ConfigError, match=r"engine.sleep_while_training needs engine.device cuda.*cpu and 0"):
        load_config(DEMO, {"engine.sleep_while_training": True})
    with pytest.raises(ConfigError, match=r"engine.sleep_while_training .* train.max_staleness 0.*cuda and 1"):
        load_config(DEMO, cuda | {"train.max_staleness": 1})
