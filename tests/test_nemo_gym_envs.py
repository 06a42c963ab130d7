"""NeMo Gym's shipped environments, unchanged: their configs read from the harness side, and the conformance
replay of their recorded rollouts (``gymrl envs conform``) on real servers of different kinds."""

import json
import subprocess
import sys

import pytest

from gymrl.envs.conform import conform, opened_row, played_row, task_row, write_table
from gymrl.envs.gymnasium import model_turns
from gymrl.envs.nemo_gym import NemoGymConfigError, gym_root, load_server, shipped


def test_the_installed_nemo_gym_ships_its_servers():
    names = shipped()
    assert len(names) >= 90 and {"mcqa", "reasoning_gym", "example_multi_step"} <= set(names)


def test_a_shipped_servers_config_gives_its_package_options_and_datasets():
    server = load_server("mcqa")
    assert server.module == "resources_servers.mcqa" and server.name == "mcqa"
    assert "grading_mode" in server.options and "entrypoint" not in server.options
    assert server.agents == ["simple_agent"]
    assert {d.type for d in server.datasets} >= {"train", "validation", "example"}
    example = server.dataset("example")
    assert example is not None and example.path == gym_root() / "resources_servers/mcqa/data/example.jsonl"
    assert server.dataset("train") is None  # NeMo Gym downloads it; the package ships none
    judged = load_server("math_with_judge")
    assert judged.needs_servers() == ["responses_api_models/policy_model"]


def test_bad_nemo_gym_configs_are_one_line_naming_the_file(tmp_path):
    with pytest.raises(NemoGymConfigError, match="gymrl envs list"):
        load_server("no_such_server")
    empty = tmp_path / "agents_only.yaml"
    empty.write_text("my_agent:\n  responses_api_agents:\n    simple_agent:\n      entrypoint: app.py\n")
    with pytest.raises(NemoGymConfigError, match=f"{empty}: no resources server"):
        load_server(empty)
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(NemoGymConfigError, match=f"{broken}: not valid YAML"):
        load_server(broken)
    with pytest.raises(NemoGymConfigError, match="does not exist"):
        load_server(tmp_path / "missing.yaml")
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text("x:\n  resources_servers:\n    not_shipped:\n      entrypoint: app.py\n")
    with pytest.raises(NemoGymConfigError, match="'not_shipped' is not in the installed nemo-gym"):
        load_server(elsewhere)


def test_a_recording_is_replayed_with_the_example_row_of_its_prompt():
    """NeMo Gym's dump writes the input in its own shape (content parts, ``type: message``) and drops task
    fields; the example row with the same prompt is the one it was played from."""
    rows = [{"responses_create_params": {"input": [{"role": "user", "content": "2+2?"}]}, "answer": "4", "k": 1},
            {"responses_create_params": {"input": [{"role": "user", "content": "2+2?"}]}, "answer": "4", "k": 2},
            {"responses_create_params": {"input": "3+3?"}, "answer": "6"}]
    dumped = {"responses_create_params": {"input": [{"role": "user", "type": "message",
                                                     "content": [{"type": "input_text", "text": "2+2?"}]}]},
              "k": 2, "response": {}, "reward": 1.0}
    assert played_row(dumped, rows) is rows[1]  # of two with its prompt, the one whose kept fields agree
    as_list = {"responses_create_params": {"input": [{"role": "user", "content": "3+3?"}]}}
    assert played_row(as_list, rows) is rows[2]
    assert played_row({"responses_create_params": {"input": "5+5?"}}, rows) is None


def test_a_recording_becomes_the_task_row_it_was_played_from():
    recording = {"responses_create_params": {"input": "q", "parallel_tool_calls": None, "tools": []},
                 "expected_answer": "B", "extracted_answer": "C", "response": {"output": []}, "reward": 0.0}
    row = task_row(recording, {"responses_create_params", "expected_answer", "options"})
    assert row == {"responses_create_params": {"input": "q", "tools": []}, "expected_answer": "B"}
    assert task_row(recording, None)["extracted_answer"] == "C"  # no example rows: only the verdict's keys go


# One conformance run per server, shared by the tests below (each starts a real server, about 2 s).
KINDS = {
    "arc_agi": "single-turn /verify",
    "bunsenbench_chemistry_mcq": "single-turn /verify",
    "example_single_tool_call": "tool calls through the server's routes, then /verify",
    "single_step_tool_use_with_argument_comparison": "a tool call compared with the expected arguments",
    "example_session_state_mgmt": "stateful tools, seeded by a field the recordings lost (the example row has it)",
    "workplace_assistant": "recordings of prompts no example row has, without the field /verify requires",
    "instruction_following": "a server whose requirement is a git URL",
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    lock = tmp_path_factory.mktemp("lock") / "servers.lock"
    return {name: conform(name, install_deps=True, lock=lock) for name in KINDS}


@pytest.mark.parametrize("name", ["arc_agi", "bunsenbench_chemistry_mcq", "example_single_tool_call",
                                  "single_step_tool_use_with_argument_comparison", "example_session_state_mgmt"])
def test_recorded_rewards_come_back_exactly(results, name):
    r = results[name]
    assert r.started and r.rows == 5 and r.equal == r.rows and r.conforms and r.reason == "", r


def test_a_server_that_cannot_replay_says_why(results, tmp_path):
    other = results["workplace_assistant"]
    assert other.started and not other.conforms and other.reason.startswith(
        "the recordings lack task fields the server requires (ground_truth) and 5 are of prompts no example row has")
    git = results["instruction_following"]
    assert not git.started and git.reason.startswith("dependency not installable here: server "
                                                     "'instruction_following': requirement 'git+https://")
    out = tmp_path / "table.md"
    write_table(list(results.values()), out)
    text = out.read_text()
    assert "\n5 of 7 servers replay every recorded reward exactly; 6 start.\n" in text
    assert "| replays every recorded reward | 5 |" in text
    assert "| a dependency that cannot be installed here | 1 |" in text
    assert "| arc_agi | yes | 5 of 5 |  |" in text and "| instruction_following | no | - |" in text
    assert len(json.loads(out.with_suffix(".json").read_text())) == 7


def test_a_servers_own_requirements_are_installed_pinned_and_used(tmp_path):
    """structeval imports xmltodict and toml, which .venv-gym lacks: installed from PyPI into the server's own
    folder, pinned in the lock, the server then replays its recordings; the next run installs nothing."""
    import shutil

    from gymrl.envs.launcher import DEFAULT_GYM_PYTHON
    from gymrl.envs.server_deps import deps_dir, read_lock, server_requirements

    folder = gym_root() / "resources_servers" / "structeval"
    shutil.rmtree(deps_dir(DEFAULT_GYM_PYTHON, "structeval"), ignore_errors=True)  # a cache: install it afresh
    assert server_requirements("structeval", folder) == ["xmltodict==1.0.2", "pyyaml>=6.0", "toml"]
    lock, said = tmp_path / "servers.lock", []
    r = conform("structeval", install_deps=True, say=said.append, lock=lock)
    assert r.conforms, r
    assert (deps_dir(DEFAULT_GYM_PYTHON, "structeval") / "xmltodict.py").is_file()
    assert "xmltodict==1.0.2" in read_lock(lock)["structeval"]
    again = []
    assert conform("structeval", install_deps=True, say=again.append, lock=lock).conforms and again == []
    assert len(said) == 1 and said[0].startswith("installing the requirements of NeMo Gym server 'structeval'")


def test_pips_conflict_explanation_names_what_clashes():
    """The causes pip prints under "The conflict is caused by:", once each, else its last error line."""
    from gymrl.envs.server_deps import conflict

    said = ("Collecting math-verify==0.8.0\nINFO: pip is looking at multiple versions of math-verify\n\n"
            "The conflict is caused by:\n    math-verify 0.8.0 depends on latex2sympy2_extended==1.10.2\n"
            "    The user requested (constraint) latex2sympy2-extended==1.11.0\n"
            "    math-verify 0.8.0 depends on latex2sympy2_extended==1.10.2\n\nTo fix this you could try to:\n"
            "ERROR: Cannot install math-verify==0.8.0 because these package versions have conflicting dependencies.\n")
    assert conflict(said) == ("math-verify 0.8.0 depends on latex2sympy2_extended==1.10.2; "
                              "The user requested (constraint) latex2sympy2-extended==1.11.0")
    assert conflict("WARNING: x\nERROR: No matching distribution found for nope==9\n") == (
        "ERROR: No matching distribution found for nope==9")


def test_a_server_pinning_other_versions_than_gym_venv_gets_those_nemo_gym_would(tmp_path):
    """polymath pins math-verify==0.8.0, which needs latex2sympy2_extended 1.10.2 where .venv-gym has 1.11.0:
    nemo-gym does not need either, so the server gets 1.10.2 in its own folder, as in NeMo Gym's venv for it, and
    a line says so. A pin nemo-gym itself rules out (openai<=2.7.2) is one line naming both sides."""
    import shutil

    from gymrl.envs.launcher import DEFAULT_GYM_PYTHON
    from gymrl.envs.server_deps import DependencyError, deps_dir, ensure_installed, read_lock

    shutil.rmtree(deps_dir(DEFAULT_GYM_PYTHON, "polymath"), ignore_errors=True)  # a cache: install it afresh
    lock, said = tmp_path / "servers.lock", []
    ensure_installed("polymath", gym_root() / "resources_servers" / "polymath", DEFAULT_GYM_PYTHON, said.append, lock)
    assert "latex2sympy2_extended==1.10.2" in read_lock(lock)["polymath"]
    assert len(said) == 2 and "latex2sympy2_extended==1.10.2 (.venv-gym: 1.11.0)" in said[1], said
    (tmp_path / "requirements.txt").write_text("openai==2.8.0\n")
    with pytest.raises(DependencyError, match=r"^server 'pins_openai': openai==2.8.0 cannot be installed with "
                                              r"nemo-gym==0.4.0: The user requested openai==2.8.0; nemo-gym 0.4.0 "
                                              r"depends on openai<=2.7.2$"):
        ensure_installed("pins_openai", tmp_path, DEFAULT_GYM_PYTHON, said.append, lock)


def test_a_gymnasium_recording_is_split_into_its_model_turns_and_its_row():
    """gymnasium_agent's recording: the model's items between the user messages and tool outputs it added; its input
    is the example row's with /reset's observation after it, and ``_ng_task_index`` picks the row (same prompts)."""
    said = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hit"}]}
    thought, call = {"type": "reasoning", "summary": []}, {"type": "function_call", "name": "f", "call_id": "c"}
    observed = {"type": "message", "role": "user", "content": "board"}
    output = [thought, said, observed, call, {"type": "function_call_output", "call_id": "c", "output": "1"}, said]
    assert model_turns(output) == [[thought, said], [call], [said]]
    rows = [{"responses_create_params": {"input": [{"role": "user", "content": "play"}]}, "seed": s} for s in (1, 2)]
    recording = {"responses_create_params": {"input": [{"role": "user", "content": "play"}, observed]},
                 "_ng_task_index": 1}
    assert opened_row(recording, rows) is rows[1]


def test_gymnasium_servers_replay_step_by_step(tmp_path):
    """/reset, then /step with each recorded turn, the rewards summed. The scripted follow-ups replay exactly;
    blackjack deals from an unseeded random.Random() on /reset, so a recording replays only where the deal agrees,
    and a differing reward says so."""
    lock = tmp_path / "servers.lock"
    scripted = conform("example_multi_turn_gymnasium", install_deps=True, lock=lock)
    assert scripted.conforms and scripted.equal == 5 and scripted.reason == "", scripted
    dealt = conform("blackjack", install_deps=True, lock=lock)
    assert dealt.started and dealt.replayed == 5, dealt
    # A deal that happens to agree at the start (a few in a thousand) can still end otherwise (the dealer's hidden
    # cards are drawn later), so one untagged mismatch is allowed; a different deal can also end with the same reward.
    tagged = [m for m in dealt.mismatches if m.endswith("(/reset observed otherwise than the recording)")]
    assert len(tagged) >= len(dealt.mismatches) - 1, dealt
    assert not dealt.mismatches or dealt.reason.startswith("the server's episodes went otherwise"), dealt


def test_the_cli_conforms_and_fails_on_a_server_that_does_not(tmp_path):
    run = [sys.executable, "-m", "gymrl.cli", "envs", "conform"]
    ok = subprocess.run(run + ["arc_agi", "--out", str(tmp_path / "ok.md")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "1 of 1 conform" in ok.stderr and (tmp_path / "ok.md").is_file()
    bad = subprocess.run(run + ["no_such_server", "--out", str(tmp_path / "bad.md")], capture_output=True, text=True)
    assert bad.returncode == 1 and "no_such_server" in bad.stderr and "Traceback" not in bad.stderr
    none = subprocess.run(run, capture_output=True, text=True)
    assert none.returncode == 2 and "--all" in none.stderr


def test_an_episodes_response_carries_its_token_usage_as_simple_agent_sums_it():
    """simple_agent sends /verify the Responses-API usage of the episode: each model call's prompt (input) and
    generated tokens (output), summed over the calls; gymrl's episodes send the same counts."""
    from gymrl.envs.base import Task
    from gymrl.rollout.engine import Completion
    from gymrl.rollout.runner import EpisodeState

    state = EpisodeState(Task("t", "e", [{"role": "user", "content": "q"}]), [1, 2, 3], episode=None)
    state.add_model_turn(Completion([4, 5], [0.0, 0.0], "a", "stop"), None)
    state.add_model_turn(Completion([6], [0.0], "b", "stop"), None)
    assert state.response()["usage"] == {  # the shape of .venv-gym's openai ResponseUsage
        "input_tokens": 3 + 5, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 2 + 1,
        "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 11}
    assert len(state.response()["output"]) == 2


def test_a_servers_needs_outside_gymrl_are_its_reason(tmp_path):
    """A server whose config points at a model server, or leaves a key to NeMo Gym's env.yaml, says which; a
    recording whose usage has chat-completions names (mrcr's) replays with the same counts under the Responses
    names; a server served from another file than app.py (aviary's gsm8k_app.py) is started from it."""
    lock = tmp_path / "servers.lock"
    xstest = conform("xstest")
    assert not xstest.started and xstest.reason.startswith(
        "needs an external service (model or resources servers responses_api_models/allenai_wildguard_model_server)")
    critpt = conform("critpt")
    assert critpt.reason.startswith("needs an external service (settings NeMo Gym's env.yaml gives, unset here: "
                                    "api_key=${oc.select:artificial_analysis_api_key,null}): does not start")
    mrcr = conform("mrcr", install_deps=True, lock=lock)
    assert mrcr.conforms and mrcr.equal == 5, mrcr
    assert load_server("aviary").options["entrypoint"] == "gsm8k_app.py"
