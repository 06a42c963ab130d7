import random

from environments.arithmetic import Tasks
from gymrl.envs.registry import available, load_environment


def test_splits_are_disjoint_and_cover_all_facts():
    tasks = Tasks()
    train = {r["id"] for r in tasks.rows("train")}
    held_out = {r["id"] for r in tasks.rows("eval")}
    assert train.isdisjoint(held_out)
    assert len(train) + len(held_out) == 100 + 55  # a+b and a-b (a >= b) over 0..9
    assert held_out == {r["id"] for r in Tasks().rows("eval")}  # deterministic
    assert held_out != {r["id"] for r in Tasks(seed=1).rows("eval")}


def test_rows_are_nemo_gym_rows():
    row = Tasks().rows("train")[0]
    assert row["responses_create_params"]["input"][0]["role"] == "user"
    assert isinstance(row["expected"], int)


def test_warmup_mixes_right_and_off_by_one_answers():
    env = load_environment("arithmetic", {"warmup_correct": 0.3})
    examples = env.warmup_examples(2000, seed=1)
    right = 0
    for ex in examples:
        response = ex.response
        a_op_b = ex.messages[0]["content"].removeprefix("What is ").removesuffix("?")
        expected = eval(a_op_b)  # noqa: S307 - our own generated "a+b" strings
        got = int(response.split("<answer>")[1].split("</answer>")[0])
        assert got in (expected, expected + 1)
        right += got == expected
    assert 0.25 < right / len(examples) < 0.35


def test_registry_finds_and_rejects():
    assert "arithmetic" in available()
    env = load_environment("arithmetic", {"seed": 3})
    assert env.config["seed"] == 3 and env.tasks("eval")[0].env == "arithmetic"
    try:
        load_environment("nope")
    except ValueError as err:
        assert "unknown environment 'nope'" in str(err) and "arithmetic" in str(err)
    else:
        raise AssertionError("an unknown environment must raise")
    try:
        load_environment("arithmetic", {"bogus": 1})
    except ValueError as err:
        assert "bogus" in str(err)
    else:
        raise AssertionError("bad env.args must raise")


def test_gold_response_is_right_by_construction():
    tasks = Tasks()
    row = tasks.rows("eval")[0]
    assert f"<answer>{row['expected']}</answer>" in tasks.gold_response(row)
    assert tasks.warmup_response(row, random.Random(0)).startswith("<think>")
