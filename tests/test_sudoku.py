"""Sudoku reward and generator: uniqueness, determinism, validity, and every reward branch."""

import random
import time

import pytest

from environments.sudoku.generate import generate_rows, main, read_jsonl, warmup_response
from rewards.sudoku import (
    DIFFICULTY_BLANKS,
    count_solutions,
    generate_puzzle,
    parse_grid,
    score_sudoku,
    solve,
)

# A fixed 4x4 puzzle with a unique solution (8 blanks: r1c1-r1c4, r2c1, r2c2, r3c1, r3c3), and its solution.
PUZZLE4 = "0000" "0012" "0103" "4321"
SOLUTION4 = "1234" "3412" "2143" "4321"
SOLVED9 = (
    "534678912" "672195348" "198342567" "859761423" "426853791" "713924856" "961537284" "287419635" "345286179"
)


def answer(cells: str, size: int = 4, think: str = "<think>ok</think>") -> str:
    return think + "<answer>" + "\n".join(cells[r * size : (r + 1) * size] for r in range(size)) + "</answer>"


def is_valid_solution(cells: str, size: int) -> bool:
    return score_sudoku(answer(cells, size), "0" * size * size, size).reward == 1.0


# --- generator -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [4, 9])
@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard"])
def test_generated_puzzles_are_unique_valid_and_keep_the_solution(size, difficulty):
    rng = random.Random(7)
    for _ in range(20 if size == 4 else 3):
        puzzle, solution = generate_puzzle(size, difficulty, rng)
        assert puzzle.count("0") == DIFFICULTY_BLANKS[size][difficulty]
        assert count_solutions(puzzle, size) == 1
        assert solve(puzzle, size) == solution
        assert is_valid_solution(solution, size)
        assert all(p in ("0", s) for p, s in zip(puzzle, solution, strict=True))


def test_solver_counts_several_solutions_and_none():
    assert count_solutions("0" * 16, 4) == 2  # stops at the limit
    assert count_solutions("0" * 16, 4, limit=1000) == 288  # all 4x4 sudoku grids
    assert count_solutions("1100" + "0" * 12, 4) == 0  # givens conflict
    assert count_solutions(PUZZLE4, 4, limit=10) == 1
    assert solve("1100" + "0" * 12, 4) is None


def test_generation_is_deterministic_by_seed():
    a = [generate_puzzle(9, "medium", random.Random(3)) for _ in range(2)]
    b = [generate_puzzle(9, "medium", random.Random(3)) for _ in range(2)]
    assert a == b
    assert generate_puzzle(9, "medium", random.Random(4)) != a[0]
    assert generate_rows(30, seed=1) == generate_rows(30, seed=1)
    assert generate_rows(30, seed=1) != generate_rows(30, seed=2)


def test_rows_have_the_nemo_gym_shape_and_distinct_puzzles():
    train = generate_rows(200, seed=0, split="train", size=4, difficulty="medium")
    row = train[0]
    assert set(row) == {"responses_create_params", "puzzle", "size", "solution", "difficulty", "id", "split"}
    content = row["responses_create_params"]["input"][0]["content"]
    assert row["responses_create_params"]["input"][0]["role"] == "user"
    assert "\n".join(row["puzzle"][i : i + 4] for i in range(0, 16, 4)) in content and "<answer>" in content
    assert len({r["puzzle"] for r in train}) == 200 and len({r["id"] for r in train}) == 200
    seen = [r["puzzle"] for r in train]
    held_out = generate_rows(50, seed=0, split="eval", size=4, difficulty="medium", exclude=seen)
    assert not {r["puzzle"] for r in held_out} & {r["puzzle"] for r in train}
    assert {r["split"] for r in held_out} == {"eval"}


@pytest.mark.parametrize("size,difficulty", [(4, "hard"), (9, "easy")])
def test_warmup_response_scores_one(size, difficulty):
    for row in generate_rows(10, seed=5, size=size, difficulty=difficulty):
        r = score_sudoku(warmup_response(row), row["puzzle"], row["size"])
        assert (r.reward, r.reason) == (1.0, "solved")


def test_cli_writes_jsonl(tmp_path):
    out = tmp_path / "data" / "train.jsonl"
    main(["--n", "5", "--size", "4", "--out", str(out)])
    rows = read_jsonl(out)
    assert len(rows) == 5 and rows == generate_rows(5, seed=0, size=4)
    main(["--n", "3", "--size", "4", "--split", "eval", "--exclude", str(out), "--out", str(tmp_path / "eval.jsonl")])
    assert not {r["puzzle"] for r in read_jsonl(tmp_path / "eval.jsonl")} & {r["puzzle"] for r in rows}


def test_generation_speed_is_printed_not_asserted():
    rng = random.Random(0)
    t = time.perf_counter()
    for _ in range(1000):
        generate_puzzle(4, "hard", rng)
    t4 = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(100):
        generate_puzzle(9, "hard", rng)
    t9 = time.perf_counter() - t
    print(f"\n1000 4x4 hard puzzles: {t4:.2f}s; 100 9x9 hard puzzles: {t9:.2f}s")


def test_bad_difficulty_and_size_raise():
    with pytest.raises(ValueError):
        generate_puzzle(4, "impossible", random.Random(0))
    with pytest.raises(ValueError):
        generate_puzzle(4, 15, random.Random(0))
    with pytest.raises(ValueError):
        generate_puzzle(6, "easy", random.Random(0))
    with pytest.raises(ValueError):
        score_sudoku(answer(SOLUTION4), "12", 4)  # a malformed puzzle is a data bug


# --- parse_grid ----------------------------------------------------------------------------------


def test_parse_grid_tolerates_spaces_and_commas_only():
    want = [[1, 2, 3, 4], [3, 4, 1, 2], [2, 1, 4, 3], [4, 3, 2, 1]]
    assert parse_grid("1234\n3412\n2143\n4321", 4) == want
    assert parse_grid("\n 1 2 3 4\n3,4,1,2\n2, 1, 4, 3\n4\t3 2 1 \n\n", 4) == want
    assert parse_grid("1234\r\n3412\r\n2143\r\n4321", 4) == want
    for bad in ["1234\n3412\n2143", "1234\n3412\n2143\n4321\n1234", "12345\n3412\n2143\n4321",
                "1234\n3412\n\n2143\n4321", "1234\n34|12\n2143\n4321", "1234\n3412\n2143\n432x", "",
                "１234\n3412\n2143\n4321", "1234 3412 2143 4321"]:
        assert parse_grid(bad, 4) is None, bad


# --- score_sudoku: every branch ------------------------------------------------------------------


def test_right_answer():
    assert score_sudoku(answer(SOLUTION4), PUZZLE4, 4) == score_sudoku(answer(SOLUTION4, think=""), PUZZLE4, 4)
    r = score_sudoku(answer(SOLUTION4), PUZZLE4.replace("0", "."), 4)
    assert (r.reward, r.reason) == (1.0, "solved")
    assert score_sudoku(answer(SOLVED9, 9), SOLVED9[:40] + "0" * 41, 9).reward == 1.0


def test_wrong_cell_names_the_duplicate():
    wrong = "1243" "3412" "2143" "4321"  # r1c3 and r1c4 swapped: column 3 repeats the 4 of r3c3
    r = score_sudoku(answer(wrong), PUZZLE4, 4)
    assert r.reward == 0.0 and r.reason == "column 3 has two 4s"
    wrong = "1234" "3412" "2143" "4323"  # row 4 has two 3s
    r = score_sudoku(answer(wrong), "0" * 16, 4)
    assert r.reward == 0.0 and r.reason == "row 4 has two 3s"
    boxy = "1234" "2341" "3412" "4123"  # Latin square: rows and columns fine, boxes not
    r = score_sudoku(answer(boxy), "0" * 16, 4)
    assert r.reward == 0.0 and r.reason.startswith("box 1 (rows 1-2, columns 1-2) has two 2s")


def test_changed_given():
    other = "2134" "3412" "1243" "4321"  # a valid grid, but not this puzzle's: r3c2 was a given 1
    assert is_valid_solution(other, 4)
    r = score_sudoku(answer(other), PUZZLE4, 4)
    assert r.reward == 0.0 and r.reason == "given at r3c2 changed (1 -> 2)"
    assert score_sudoku(answer(other), PUZZLE4, 4, partial_credit=True).reward == 0.0


def test_incomplete_and_out_of_range():
    r = score_sudoku(answer("1230" "3412" "2143" "4321"), PUZZLE4, 4)
    assert r.reward == 0.0 and r.reason == "incomplete: 1 blank cell(s), first at r1c4"
    r = score_sudoku(answer("1237" "3412" "2143" "4321"), PUZZLE4, 4)
    assert r.reward == 0.0 and r.reason == "r1c4 is 7, outside 1-4"


@pytest.mark.parametrize(
    "response,reason",
    [
        ("", "no <answer> after the thinking part"),
        ("1234\n3412\n2143\n4321", "no <answer> after the thinking part"),
        ("<answer>1234\n3412\n2143\n4321", "unclosed <answer>"),
        ("<answer>1234\n3412\n2143</answer>", "not a 4x4 grid: 3 lines"),
        ("<answer>1234\n3412\n2143\n43210</answer>", "not a 4x4 grid: line 4 has 5 digits"),
        ("<answer>|1234|\n3412\n2143\n4321</answer>",
         "not a 4x4 grid: line 1 has '|', only digits, spaces and commas are allowed"),
        ("<answer>The grid is 1234 3412 2143 4321</answer>", "not a 4x4 grid: 1 lines"),
    ],
)
def test_malformed(response, reason):
    assert score_sudoku(response, PUZZLE4, 4) == score_sudoku(response, PUZZLE4, 4, partial_credit=True)
    r = score_sudoku(response, PUZZLE4, 4)
    assert (r.reward, r.reason) == (0.0, reason)


def test_a_9x9_grid_for_a_4x4_puzzle_is_malformed():
    r = score_sudoku(answer(SOLVED9, 9), PUZZLE4, 4)
    assert r.reward == 0.0 and r.reason.startswith("not a 4x4 grid")


def test_several_answers_are_rejected_even_if_one_is_right():
    text = answer("1234" "3412" "2143" "4312") + answer(SOLUTION4, think="")
    r = score_sudoku(text, PUZZLE4, 4)
    assert r.reward == 0.0 and r.reason == "2 answers given; exactly one is allowed"
    assert score_sudoku(text, PUZZLE4, 4, partial_credit=True).reward == 0.0


def test_answer_only_inside_think_earns_nothing():
    inner = answer(SOLUTION4, think="")
    assert score_sudoku(f"<think>{inner}</think>", PUZZLE4, 4).reward == 0.0
    assert score_sudoku(f"<think>{inner}</think>done", PUZZLE4, 4).reason == "no <answer> after the thinking part"
    r = score_sudoku(f"<think>{inner}", PUZZLE4, 4)  # never closed: all of it is thinking
    assert r.reward == 0.0 and "unclosed <think>" in r.reason
    assert score_sudoku(f"<think>{inner}</think>{inner}", PUZZLE4, 4).reward == 1.0


def test_giant_output_is_fast():
    text = "<think>" + "x" * 2_000_000 + "</think>" + answer(SOLUTION4, think="")
    t = time.perf_counter()
    assert score_sudoku(text, PUZZLE4, 4).reward == 1.0
    many = "<answer>" * 200_000
    assert score_sudoku(many, PUZZLE4, 4).reward == 0.0
    giant_answer = "<answer>" + "1" * 1_000_000 + "</answer>"
    r = score_sudoku(giant_answer, PUZZLE4, 4)
    assert r.reward == 0.0 and "characters long" in r.reason
    assert time.perf_counter() - t < 2.0


def test_unicode_digits_are_not_digits():
    fullwidth = SOLUTION4.translate(str.maketrans("1234", "１２３４"))
    arabic = SOLUTION4.translate(str.maketrans("1234", "١٢٣٤"))
    for cells in (fullwidth, arabic):
        r = score_sudoku(answer(cells), PUZZLE4, 4)
        assert r.reward == 0.0 and r.reason.startswith("not a 4x4 grid: line 1 has")


def test_partial_credit_values():
    # PUZZLE4 has 8 blank cells: r1c1 r1c2 r1c3 r1c4 r2c1 r2c2 r3c1 r3c3.
    assert score_sudoku(answer(SOLUTION4), PUZZLE4, 4, partial_credit=True).reward == 1.0
    # Two blank cells left empty: 6 of 8 good, and the others have no conflicts.
    r = score_sudoku(answer("1200" "3412" "2143" "4321"), PUZZLE4, 4, partial_credit=True)
    assert r.reward == pytest.approx(6 / 8) and "6/8" in r.reason and "incomplete" in r.reason
    # r1c3 and r1c4 swapped: r1c3=4 clashes with the blank r3c3=4, r1c4=3 with the given r3c4=3.
    r = score_sudoku(answer("1243" "3412" "2143" "4321"), PUZZLE4, 4, partial_credit=True)
    assert r.reward == pytest.approx(5 / 8) and r.reason == "partial: 5/8 blank cells good; column 3 has two 4s"
    assert r.breakdown == {"cells_good": 5, "cells_total": 8}
    # The breakdown comes with every grid that parses: solved, and wrong without partial credit.
    assert score_sudoku(answer(SOLUTION4), PUZZLE4, 4).breakdown == {"cells_good": 8, "cells_total": 8}
    assert score_sudoku(answer("1243" "3412" "2143" "4321"), PUZZLE4, 4).breakdown == {"cells_good": 5, "cells_total": 8}
    assert score_sudoku("<answer>12</answer>", PUZZLE4, 4).breakdown == {}
    # Row 1 = 1,2,1,1: the three blank cells holding a 1 are bad (the givens are never counted).
    r = score_sudoku(answer("1211" "3412" "2143" "4321"), PUZZLE4, 4, partial_credit=True)
    assert r.reward == pytest.approx(5 / 8) and "row 1 has three 1s" in r.reason
    # An out-of-range value is not good, and it clashes with nothing.
    r = score_sudoku(answer("1239" "3412" "2143" "4321"), PUZZLE4, 4, partial_credit=True)
    assert r.reward == pytest.approx(7 / 8) and "outside 1-4" in r.reason
    # All blanks empty: nothing earned. Without partial credit, any flaw is 0.
    assert score_sudoku(answer(PUZZLE4), PUZZLE4, 4, partial_credit=True).reward == 0.0
    assert score_sudoku(answer("1200" "3412" "2143" "4321"), PUZZLE4, 4).reward == 0.0
