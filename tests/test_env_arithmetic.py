from environments.arithmetic import ArithmeticEnv
from gymrl.envs.registry import available, load_environment


def test_splits_are_disjoint_and_cover_all_facts():
    env = ArithmeticEnv()
    train = {t.id for t in env.tasks("train")}
    held_out = {t.id for t in env.tasks("eval")}
    assert train.isdisjoint(held_out)
    assert len(train) + len(held_out) == 100 + 55  # a+b and a-b (a >= b) over 0..9
    assert held_out == {t.id for t in ArithmeticEnv().tasks("eval")}  # deterministic


def test_verify_uses_ground_truth():
    env = ArithmeticEnv()
    task = env.tasks("eval")[0]
    expected = task.ground_truth["expected"]
    assert env.verify(task, f"<answer>{expected}</answer>").reward == 1.0
    assert env.verify(task, f"<answer>{expected + 1}</answer>").reward == 0.0


def test_warmup_mixes_right_and_off_by_one_answers():
    env = ArithmeticEnv(warmup_correct=0.3)
    examples = env.warmup_examples(2000, seed=1)
    right = 0
    for messages, response in examples:
        a_op_b = messages[0]["content"].removeprefix("What is ").removesuffix("?")
        expected = eval(a_op_b)  # noqa: S307 - our own generated "a+b" strings
        got = int(response.split("<answer>")[1].split("</answer>")[0])
        assert got in (expected, expected + 1)
        right += got == expected
    assert 0.25 < right / len(examples) < 0.35


def test_registry_finds_and_rejects():
    assert "arithmetic" in available()
    assert isinstance(load_environment("arithmetic", {"seed": 3}), ArithmeticEnv)
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
