"""``gymrl bench --suite env-load`` at a small budget on the real arithmetic server, and its knee rule."""

import json

from gymrl.bench.env_load import LoadBudget, find_knee, run_envload_bench


def _level(c, rate, p99=10.0, errors=0):
    return {"concurrency": c, "req_per_s": rate, "p99_ms": p99, "errors": errors}


def test_knee_is_the_last_level_that_still_gained():
    budget = LoadBudget()
    assert find_knee([_level(1, 100), _level(2, 180), _level(4, 190), _level(8, 195)], budget)["concurrency"] == 2
    # compared with every lower level: 8 is 10% above 4 but not above 2's 200
    assert find_knee([_level(1, 100), _level(2, 200), _level(4, 150), _level(8, 170)], budget)["concurrency"] == 2
    assert find_knee([_level(1, 100), _level(2, 105), _level(4, 120)], budget)["concurrency"] == 4
    # p99 over the bound or errors end the ramp: the level before is the knee even while throughput still rose
    assert find_knee([_level(1, 100), _level(2, 180), _level(4, 400, p99=5000)], budget)["concurrency"] == 2
    assert find_knee([_level(1, 100), _level(2, 180, errors=1)], budget)["concurrency"] == 1
    assert find_knee([_level(1, 100, errors=3)], budget) is None


def test_env_load_suite_writes_levels_and_a_knee(tmp_path):
    budget = LoadBudget(max_concurrency=4, min_requests=20, max_seconds=30, level_seconds=1)
    run_envload_bench(tmp_path, ("arithmetic",), budget)
    results = json.loads((tmp_path / "env-load.json").read_text())
    run = results["envs"]["arithmetic"]
    levels = [level["concurrency"] for level in run["levels"]]
    assert levels[0] == 1 and levels == [2**i for i in range(len(levels))] and max(levels) <= 4
    for level in run["levels"]:
        assert level["requests"] >= 20 and level["req_per_s"] > 0
        assert level["p50_ms"] <= level["p99_ms"] <= level["max_ms"]
        assert level["errors"] == 0, level["error_kinds"]  # a lightly loaded server answers every call right
    assert run["knee"]["concurrency"] in levels and run["stopped"]
    assert "machine" in results and len(results["load_average_before"]) == 3
    table = (tmp_path / "env-load.md").read_text()
    assert "| arithmetic |" in table and "(knee)" in table and "load average" in table
