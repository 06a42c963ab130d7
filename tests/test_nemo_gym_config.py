"""An `envs:` entry naming a NeMo Gym environment, unchanged: by its config or shipped server's name, by a server
package plus JSONL tasks, or by a running server's url plus JSONL tasks; rows reach /verify with every field."""

import json

import pytest
from typer.testing import CliRunner

from gymrl.cli import app
from gymrl.config import EnvConfig, RunConfig
from gymrl.envs.launcher import DEFAULT_GYM_PYTHON
from gymrl.envs.nemo_gym import NemoGymConfigError, gym_root
from gymrl.envs.sources import JsonlTasks, open_environment, read_rows, server_process

EXAMPLES = gym_root() / "resources_servers"


def _rows(path, n, extra=lambda i: {}):
    path.write_text("".join(json.dumps({"responses_create_params": {"input": f"q{i % (n // 2 or 1)}"}, **extra(i)})
                            + "\n" for i in range(n)))
    return path


def test_each_way_a_nemo_gym_user_names_an_environment(tmp_path):
    data = _rows(tmp_path / "tasks.jsonl", 20, lambda i: {"answer": str(i)})
    by_name = EnvConfig(nemo_gym="reasoning_gym", data=data)
    by_yaml = EnvConfig(nemo_gym=str(EXAMPLES / "mcqa/configs/mcqa.yaml"))
    by_module = EnvConfig(module="resources_servers.mcqa", data=data, options={"grading_mode": "strict_single_letter_boxed"})
    by_url = EnvConfig(url="http://127.0.0.1:1", data=data, name="mine")
    assert [c.name for c in (by_name, by_yaml, by_module, by_url)] == ["reasoning_gym", "mcqa", "mcqa", "mine"]
    env = open_environment(by_name)
    assert env.server.module == "resources_servers.reasoning_gym" and env.server.cwd == EXAMPLES / "reasoning_gym"
    assert env.server.requirements_of == "reasoning_gym"
    mcqa = open_environment(by_yaml)  # no train file shipped: the config's example dataset
    assert mcqa.config["data"] == str(EXAMPLES / "mcqa/data/example.jsonl")
    assert "grading_mode" in mcqa.server.options
    module = open_environment(by_module)
    assert module.server.options == {"grading_mode": "strict_single_letter_boxed"}
    assert module.server.cwd == EXAMPLES / "mcqa"
    assert open_environment(by_url).server is None
    run = RunConfig(model={"path": "x"}, envs=[by_name.model_dump(), {"name": "arithmetic"}])
    assert [e.is_nemo_gym for e in run.envs] == [True, False]


@pytest.mark.parametrize("entry, message", [
    ({"module": "resources_servers.mcqa"}, "envs[mcqa].module: needs data"),
    ({"data": "t.jsonl"}, "envs[t].data: needs nemo_gym, module or url"),
    ({"nemo_gym": "mcqa", "module": "resources_servers.mcqa"}, "not both"),
    ({"nemo_gym": "mcqa", "args": {"a": 1}}, "envs[mcqa].args"),
    ({"name": "arithmetic", "options": {"a": 1}}, "envs[arithmetic].options: only for a NeMo Gym environment"),
    ({}, "each entry needs name"),
])
def test_a_bad_entry_is_an_error_naming_its_key(entry, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        EnvConfig(**entry)


def test_held_out_prompts_are_never_trained_on_and_rows_keep_every_field(tmp_path):
    data = _rows(tmp_path / "tasks.jsonl", 40, lambda i: {"answer": str(i % 20), "metadata": {"k": i}})
    tasks = JsonlTasks(str(data), eval_fraction=0.25, seed=3)
    train, held_out = tasks.rows("train"), tasks.rows("eval")
    prompts = {json.dumps(r["responses_create_params"]["input"]) for r in held_out}
    assert len(held_out) == len(prompts) == 5  # a quarter of 20 distinct prompts, one row each
    assert not prompts & {json.dumps(r["responses_create_params"]["input"]) for r in train}
    assert len(train) == 30 and all("metadata" in r for r in train + held_out)
    assert JsonlTasks(str(data), eval_fraction=0.25, seed=3).rows("eval") == held_out  # seeded
    own = _rows(tmp_path / "eval.jsonl", 4)
    assert len(JsonlTasks(str(data), eval_data=str(own)).rows("eval")) == 4
    seeded = tmp_path / "seeded.jsonl"  # one prompt, tasks a seed apart (grl_sokoban's puzzles): held out by seed
    seeded.write_text("".join(json.dumps({"responses_create_params": {"input": "play"}, "seed": i}) + "\n"
                              for i in range(20)))
    by_seed = JsonlTasks(str(seeded), eval_fraction=0.25, seed=3)
    seeds = {r["seed"] for r in by_seed.rows("eval")}
    assert len(seeds) == 5 and not seeds & {r["seed"] for r in by_seed.rows("train")}


def test_the_warm_up_answers_from_the_rows(tmp_path):
    import random

    data = _rows(tmp_path / "tasks.jsonl", 10, lambda i: {"answer": "7"})
    tasks = JsonlTasks(str(data))
    answers = [tasks.warmup_response(tasks.rows("train")[0], random.Random(i)) for i in range(200)]
    assert set(answers) == {"<answer>7</answer>", "<answer>8</answer>"}
    assert 0.2 < answers.count("<answer>7</answer>") / 200 < 0.4
    bare = JsonlTasks(str(_rows(tmp_path / "bare.jsonl", 4)))
    with pytest.raises(ValueError, match="no 'answer' field"):
        bare.warmup_response(bare.rows("train")[0], random.Random(0))


def test_bad_task_files_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"responses_create_params": {"input": "a"}}\n{"question": "no params"}\n')
    with pytest.raises(NemoGymConfigError, match=f"{bad}:2: a task row needs responses_create_params"):
        read_rows(bad)
    bad.write_text('{"responses_create_params": {"input": "a"}}\nnot json\n')
    with pytest.raises(NemoGymConfigError, match=f"{bad}:2: not JSON"):
        read_rows(bad)
    with pytest.raises(NemoGymConfigError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")
    one = _rows(tmp_path / "one.jsonl", 1)
    with pytest.raises(NemoGymConfigError, match="held-out split needs at least two"):
        JsonlTasks(str(one))
    with pytest.raises(NemoGymConfigError, match="no train or example dataset file here"):
        open_environment(EnvConfig(nemo_gym="reasoning_gym"))  # its train file is a hub download


def test_an_unchanged_server_verifies_rows_with_their_own_fields(tmp_path):
    """NeMo Gym's mcqa server, started by gymrl from its config, scores the example rows by their own fields."""
    env = open_environment(EnvConfig(nemo_gym="mcqa"))
    task = env.tasks("train")[0]
    assert "expected_answer" in task.row
    from gymrl.envs.client import EnvClient

    with server_process(env, DEFAULT_GYM_PYTHON, tmp_path) as server:
        env.attach(EnvClient(env.name, server.url))
        try:
            right = env.verify(task, f"The answer is \\boxed{{{task.row['expected_answer']}}}")
            wrong = env.verify(task, "The answer is \\boxed{Z}")
        finally:
            env.close()
    assert (right.reward, wrong.reward) == (1.0, 0.0)


def test_envs_list_and_test_take_nemo_gym_environments():
    runner = CliRunner()
    listed = runner.invoke(app, ["envs", "list"], env={"COLUMNS": "300"})
    assert listed.exit_code == 0, listed.output
    assert "arithmetic" in listed.output and "NeMo Gym environments" in listed.output and "mcqa" in listed.output
    tested = runner.invoke(app, ["envs", "test", "example_single_tool_call"], env={"COLUMNS": "300"})
    assert tested.exit_code == 0 and "5 of 5 recorded rewards replayed equal" in tested.output, tested.output
    unknown = runner.invoke(app, ["envs", "test", "no_such_env"], env={"COLUMNS": "300"})
    assert unknown.exit_code != 0 and "unknown environment 'no_such_env'" in unknown.output, unknown.output


# Measured with configs/reasoning_gym.yaml (seed 0, on CPU): held-out greedy reward 0.14 at the start, 0.43 after
# 10 steps, 0.64 after 20, 0.61 after 30 (28 held-out prompts). 0.25 is well clear of noise.
MIN_GAIN = 0.25


@pytest.mark.slow
def test_training_on_nemo_gyms_reasoning_gym_raises_held_out_reward(tmp_path):
    """The tiny model, warmed up on the environment's own rows, trained against NeMo Gym's reasoning_gym server
    (its app.py, config and requirements unchanged) on tasks its own dataset script wrote."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "gymrl.cli", "train", "configs/reasoning_gym.yaml", "--set",
                           "train.steps=30", "--set", f"run_dir={run_dir}"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_tasks"] == 28 and summary["initial_eval_reward"] <= 0.3, summary
    assert summary["eval_reward_gain"] >= MIN_GAIN, summary


def test_episodes_are_played_as_simple_agent_plays_them(tmp_path):
    """A NeMo Gym environment's episode: its session seeded (as simple_agent always does), tools from the row,
    and simple_agent's max_steps: the last model call's tool calls still run, then /verify."""
    from gymrl.config import RolloutConfig, SamplingConfig
    from gymrl.envs.client import EnvClient
    from gymrl.envs.nemo_gym import load_server
    from gymrl.eval.endpoint import ChatReply
    from gymrl.eval.episodes import EndpointRunner
    from gymrl.rollout.tool_calls import ParsedTurn, ToolCall

    assert (load_server("workplace_assistant").max_steps, load_server("asr_with_pc").max_steps) == (6, 1)
    assert load_server("blackjack").max_steps == 5  # gymnasium_agent's
    env = open_environment(EnvConfig(nemo_gym="example_single_tool_call"))
    env.max_steps = 2

    class AlwaysCallsTheTool:
        calls = 0

        def chat(self, messages, tools, sampling, kwargs):
            self.calls += 1
            call = ToolCall("get_weather", {"city": "sf"}, '{"city": "sf"}', f"call_{self.calls}")
            return ChatReply("", "stop", ParsedTurn("", [call]))

    endpoint = AlwaysCallsTheTool()
    with server_process(env, DEFAULT_GYM_PYTHON, tmp_path) as server:
        env.attach(EnvClient(env.name, server.url))
        try:
            task = env.tasks("train")[0]
            assert env.open_episode(task).cookies  # seeded: the server's session cookie came back
            rollout = EndpointRunner(endpoint, {env.name: env}, RolloutConfig()).episode(task, SamplingConfig())
        finally:
            env.close()
    assert endpoint.calls == 2 and rollout.finish_reason == "max_turns"
    assert [t["role"] for t in rollout.turns].count("tool") == 2  # both model calls' tools ran


def test_a_row_whose_tools_the_server_does_not_serve_is_named(tmp_path):
    from gymrl.envs.client import EnvClient
    from gymrl.envs.sources import check_tool_routes

    shipped_rows = EXAMPLES / "example_single_tool_call/data/example.jsonl"
    rows = [json.loads(line) for line in shipped_rows.read_text().splitlines()]
    rows[1]["responses_create_params"]["tools"][0]["name"] = "launch_rocket"
    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    good = open_environment(EnvConfig(nemo_gym="example_single_tool_call"))
    bad = open_environment(EnvConfig(nemo_gym="example_single_tool_call", data=data, eval_data=shipped_rows))
    with server_process(good, DEFAULT_GYM_PYTHON, tmp_path) as server:
        for env in (good, bad):
            env.attach(EnvClient(env.name, server.url))
        try:
            check_tool_routes(good)
            with pytest.raises(NemoGymConfigError, match=f"{data}: task 'train-1' .*offers tool 'launch_rocket', "
                                                         "which server 'example_single_tool_call' does not serve"):
                check_tool_routes(bad)
        finally:
            good.close()
            bad.close()


def test_gymnasium_episodes_are_played_as_gymnasium_agent_plays_them(tmp_path):
    """blackjack, unchanged, through the rollout runner: /reset's deal ends each episode's own prompt, every model
    turn goes to /step, whose observation is the environment's (loss mask 0), until the hand ends or the agent's
    max_steps; the reward is the sum of the /step rewards (no /verify). The engine pool is scripted (always hit)."""
    from gymrl.config import RolloutConfig, SamplingConfig
    from gymrl.envs.client import EnvClient
    from gymrl.eval.endpoint import ChatReply
    from gymrl.eval.episodes import EndpointRunner
    from gymrl.models.tokenizer import build_tokenizer
    from gymrl.rollout.engine import Completion, Generation
    from gymrl.rollout.runner import RolloutRunner, play_episode
    from gymrl.rollout.tool_calls import ToolCallParser

    env = open_environment(EnvConfig(nemo_gym="blackjack"))
    assert env.gymnasium and env.max_steps == 5 and len(env.tasks("eval")) == 5
    tokenizer = build_tokenizer([])
    hit = "<action>hit</action>"

    class AlwaysHits:
        calls: list = []

        def generate(self, prompts, n, sampling, engine_ids=None, seeds=None):
            self.calls.append((len(prompts), n))
            ids = tokenizer(hit + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            return Generation([[Completion(ids, [0.0] * len(ids), hit, "stop") for _ in range(n)] for _ in prompts])

    class StepsSeen(EnvClient):
        steps: list = []

        def post_for_reply(self, route, payload, cookies=None):
            reply = super().post_for_reply(route, payload, cookies)
            if route == "/step":
                self.steps.append(reply[0])
            return reply

    class HitsByChat:
        seen: list = []

        def chat(self, messages, tools, sampling, kwargs):
            self.seen.append([m["role"] for m in messages])
            return ChatReply(hit, "stop", None)

    pool = AlwaysHits()
    with server_process(env, DEFAULT_GYM_PYTHON, tmp_path) as server:
        client = StepsSeen(env.name, server.url)
        env.attach(client)
        try:
            tasks = env.tasks("train")[:2]
            batch = RolloutRunner(pool, {env.name: env}, tokenizer, RolloutConfig(max_turns=8)).run(
                tasks, 3, SamplingConfig(), 0, seed=1)
            verdict, turns = play_episode(env, tasks[0], ["<action>stand</action>"], ToolCallParser("hermes", tokenizer))
            endpoint = HitsByChat()  # eval --endpoint's path: chat messages, the observations as user messages
            served = EndpointRunner(endpoint, {env.name: env}, RolloutConfig(max_turns=8)).episode(tasks[0],
                                                                                                   SamplingConfig())
        finally:
            env.close()
    rollouts = batch.rollouts
    assert len(rollouts) == 6 and pool.calls[0] == (6, 1)  # a prompt of its own per episode
    for r in rollouts:
        prompt = tokenizer.decode(r.prompt_ids)
        assert "Deal me in." in prompt and "Your hand: [" in prompt.split("Deal me in.")[1]
        model = tokenizer.decode([t for t, m in zip(r.completion_ids, r.completion_mask) if m])
        shown = tokenizer.decode([t for t, m in zip(r.completion_ids, r.completion_mask) if not m])
        hits = model.count(hit)
        assert hits == len([t for t in r.turns if t["role"] == "assistant"]) and 1 <= hits <= 5
        # every step's observation, masked out; the last step's only where max_steps, not the server, ended the hand
        assert shown.count("Your hand: [") == hits - (r.finish_reason != "max_turns")
        assert (r.reward == -1.0 and r.finish_reason == "stop") or (hits == 5 and r.finish_reason == "max_turns")
    assert endpoint.seen[0] == ["system", "user", "user"] \
        and len(endpoint.seen) == sum(t["role"] == "assistant" for t in served.turns)
    assert served.reward == -1.0 or served.finish_reason == "max_turns"
    step_rewards = [s["reward"] for s in client.steps]
    assert len(step_rewards) == sum(len([t for t in r.turns if t["role"] == "assistant"])
                                    for r in rollouts + [served]) + 1
    assert sum(r.reward for r in rollouts + [served]) + verdict.reward == pytest.approx(sum(step_rewards))
    assert verdict.reward in (-1.0, 0.0, 1.0) and [t["role"] for t in turns] == ["assistant"]


def test_gymnasium_episodes_run_on_the_real_engine(session, tmp_path):
    """The same episodes on the shared vLLM engine (the demo's tiny model, 128 tokens): each episode is sampled from its
    own prompt, the row's and /reset's deal, with the engine's logprobs, and its reward is the sum of the /step replies
    the real blackjack server gave it. Short rows keep the dealt prompt inside the engine's context."""
    from gymrl.config import RolloutConfig, SamplingConfig
    from gymrl.envs.client import EnvClient
    from gymrl.rollout.runner import RolloutRunner

    data = tmp_path / "deal.jsonl"
    data.write_text("".join(json.dumps({"responses_create_params": {"input": p}}) + "\n" for p in ("Deal.", "Deal me.")))
    env = open_environment(EnvConfig(nemo_gym="blackjack", data=str(data), eval_data=str(data)))
    steps: list = []

    class StepsSeen(EnvClient):
        def post_for_reply(self, route, payload, cookies=None):
            reply = super().post_for_reply(route, payload, cookies)
            if route == "/step":
                steps.append(reply[0]["reward"])
            return reply

    with server_process(env, DEFAULT_GYM_PYTHON, tmp_path) as server:
        env.attach(StepsSeen(env.name, server.url))
        try:
            batch = RolloutRunner(session.pool, {env.name: env}, session.tokenizer, RolloutConfig(max_turns=4),
                                  max_model_len=session.cfg.engine.max_model_len).run(
                env.tasks("train"), 2, SamplingConfig(max_tokens=12), 0, seed=5)
        finally:
            env.close()
    assert len(batch.rollouts) == 4
    for r in batch.rollouts:
        assert "Dealer shows:" in session.tokenizer.decode(r.prompt_ids)
        model = [lp for lp, m in zip(r.logprobs, r.completion_mask) if m]
        assert model and all(lp <= 0 for lp in model) and any(lp < 0 for lp in model)
    assert len(steps) >= 4 and sum(r.reward for r in batch.rollouts) == pytest.approx(sum(steps))
