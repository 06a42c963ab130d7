"""Reward for sudoku grids (4x4 with 2x2 boxes, 9x9 with 3x3 boxes), plus a seeded puzzle generator.

What is verified: only the text after the last ``</think>`` counts (a response with an opening
``<think>`` and no closing one is all thinking and earns 0). That text must hold exactly one
``<answer>...</answer>``; its content must be ``size`` lines of ``size`` ASCII digits, with spaces,
tabs or commas tolerated between the digits and blank space around the block, and nothing else.
The grid then earns 1.0 iff it keeps every given of the puzzle, has no blank (0) cell, every value
is in 1..size, and no row, column or box repeats a value. The reason names the first violation, in
this order: format, value out of range, changed given (row-major), blank cell, row, column, box.

Partial credit (``partial_credit=True``): a response that fails the format checks or changes a
given still earns 0. Otherwise the reward is the fraction of the puzzle's blank cells that are
*good*: a blank cell is good when the answer puts a value in 1..size there and no other cell of its
row, column or box (givens included) holds the same value. A complete valid grid has every blank
cell good, so it earns exactly 1.0; nothing else does (given a conflict-free puzzle). Whenever the
answer parses as a grid, the result's breakdown gives ``cells_good`` and ``cells_total`` (the blank
cells), with partial credit on or off, so traces show how close a wrong grid came.

Adversarial cases: several answer tags (hedging) earn 0; full-width or other non-ASCII digits are
not digits of the format (0, "not a 4x4 grid"); a giant output is handled in linear time (tags are
found with ``str.find``, never a backtracking regex, and the answer content is capped at
``_MAX_ANSWER_CHARS`` before it is parsed).

The generator (``generate_puzzle``) is pure and seeded through the ``random.Random`` it is given: a
random complete grid by randomized backtracking, then cells are removed in random order, keeping a
removal only while the puzzle still has exactly one solution (``count_solutions`` stops at 2).
"""

import random

from rewards.types import RewardResult

BOX = {4: (2, 2), 9: (3, 3)}  # size -> (box rows, box columns)
DIFFICULTY_BLANKS = {
    4: {"easy": 4, "medium": 6, "hard": 8},
    9: {"easy": 30, "medium": 40, "hard": 50},
}
_MAX_ANSWER_CHARS = 2000  # a 9x9 grid with separators is ~200 chars; anything far longer is not a grid
_SEPARATORS = frozenset(" \t,")
_ASCII_DIGITS = frozenset("0123456789")
_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}


def _check_size(size: int) -> None:
    if size not in BOX:
        raise ValueError(f"sudoku size must be 4 or 9, got {size!r}")


def _strip_thinking(response: str) -> str | None:
    """The text after the last ``</think>``; None when a ``<think>`` is never closed (all thinking)."""
    head, sep, tail = response.rpartition("</think>")
    if sep:
        return tail
    return None if "<think>" in response else response


def parse_puzzle(puzzle: str, size: int) -> list[list[int]]:
    """A puzzle string (row-major, ``0`` or ``.`` for blanks, whitespace ignored) as rows of ints."""
    _check_size(size)
    cells = [ch for ch in puzzle if not ch.isspace()]
    if len(cells) != size * size:
        raise ValueError(f"puzzle has {len(cells)} cells, a {size}x{size} puzzle has {size * size}")
    values = []
    for ch in cells:
        if ch == ".":
            values.append(0)
        elif ch in _ASCII_DIGITS and int(ch) <= size:
            values.append(int(ch))
        else:
            raise ValueError(f"puzzle cell {ch!r} is not a digit 0-{size} or '.'")
    return [values[r * size : (r + 1) * size] for r in range(size)]


def _parse_grid(text: str, size: int) -> tuple[list[list[int]] | None, str]:
    """The grid and "" or None and why the text is not a ``size`` x ``size`` grid of digits."""
    what = f"not a {size}x{size} grid"
    if len(text) > _MAX_ANSWER_CHARS:
        return None, f"{what}: answer is {len(text)} characters long"
    lines = text.strip().splitlines()
    if len(lines) != size:
        return None, f"{what}: {len(lines)} lines"
    grid = []
    for r, line in enumerate(lines, 1):
        row = []
        for ch in line:
            if ch in _SEPARATORS:
                continue
            if ch not in _ASCII_DIGITS:
                return None, f"{what}: line {r} has {ch!r}, only digits, spaces and commas are allowed"
            row.append(int(ch))
        if len(row) != size:
            return None, f"{what}: line {r} has {len(row)} digits"
        grid.append(row)
    return grid, ""


def parse_grid(text: str, size: int) -> list[list[int]] | None:
    """The answer content as ``size`` rows of ``size`` ints (0-9), or None when it is not such a grid.

    ``text`` is what stands inside ``<answer>...</answer>``: ``size`` lines of ``size`` ASCII digits,
    spaces/tabs/commas allowed between digits, surrounding blank space allowed, nothing else.
    """
    _check_size(size)
    return _parse_grid(text, size)[0]


def _units(size: int) -> list[tuple[str, list[tuple[int, int]]]]:
    """Every row, column and box as (name, cells), in the order violations are reported."""
    br, bc = BOX[size]
    rows = [(f"row {r + 1}", [(r, c) for c in range(size)]) for r in range(size)]
    cols = [(f"column {c + 1}", [(r, c) for r in range(size)]) for c in range(size)]
    boxes = []
    for b in range(size):
        r0, c0 = (b // (size // bc)) * br, (b % (size // bc)) * bc
        cells = [(r0 + i, c0 + j) for i in range(br) for j in range(bc)]
        boxes.append((f"box {b + 1} (rows {r0 + 1}-{r0 + br}, columns {c0 + 1}-{c0 + bc})", cells))
    return rows + cols + boxes


def _first_violation(grid: list[list[int]], givens: list[list[int]], size: int) -> str:
    for r in range(size):
        for c in range(size):
            if grid[r][c] > size:
                return f"r{r + 1}c{c + 1} is {grid[r][c]}, outside 1-{size}"
    for r in range(size):
        for c in range(size):
            if givens[r][c] and grid[r][c] != givens[r][c]:
                return f"given at r{r + 1}c{c + 1} changed ({givens[r][c]} -> {grid[r][c]})"
    blanks = [(r, c) for r in range(size) for c in range(size) if grid[r][c] == 0]
    if blanks:
        r, c = blanks[0]
        return f"incomplete: {len(blanks)} blank cell(s), first at r{r + 1}c{c + 1}"
    for name, cells in _units(size):
        seen: dict[int, int] = {}
        for r, c in cells:
            seen[grid[r][c]] = seen.get(grid[r][c], 0) + 1
        for value in sorted(seen):
            if seen[value] > 1:
                return f"{name} has {_COUNT_WORDS[seen[value]]} {value}s"
    return ""


def _good_blank_cells(grid: list[list[int]], givens: list[list[int]], size: int) -> tuple[int, int]:
    """(good, total) over the puzzle's blank cells: value in 1..size and no equal value among its peers."""
    br, bc = BOX[size]
    good = total = 0
    for r in range(size):
        for c in range(size):
            if givens[r][c]:
                continue
            total += 1
            v = grid[r][c]
            if not 1 <= v <= size:
                continue
            r0, c0 = r - r % br, c - c % bc
            peers = {(r, j) for j in range(size)} | {(i, c) for i in range(size)}
            peers |= {(r0 + i, c0 + j) for i in range(br) for j in range(bc)}
            peers.discard((r, c))
            if all(grid[i][j] != v for i, j in peers):
                good += 1
    return good, total


def score_sudoku(response: str, puzzle: str, size: int, partial_credit: bool = False) -> RewardResult:
    """1.0 for one ``<answer>`` grid after the thinking part that solves ``puzzle``; see the module doc.

    ``puzzle`` is row-major with ``0`` or ``.`` for blanks. A malformed puzzle or size raises
    ValueError (a data bug, not a model error).
    """
    givens = parse_puzzle(puzzle, size)
    tail = _strip_thinking(response)
    if tail is None:
        return RewardResult(0.0, "unclosed <think>: the whole response is thinking")
    n_open = tail.count("<answer>")
    if n_open == 0:
        return RewardResult(0.0, "no <answer> after the thinking part")
    if n_open > 1:
        return RewardResult(0.0, f"{n_open} answers given; exactly one is allowed")
    start = tail.find("<answer>") + len("<answer>")
    end = tail.find("</answer>", start)
    if end < 0:
        return RewardResult(0.0, "unclosed <answer>")
    grid, why = _parse_grid(tail[start:end], size)
    if grid is None:
        return RewardResult(0.0, why)
    violation = _first_violation(grid, givens, size)
    if not violation:
        blanks = sum(v == 0 for row in givens for v in row)
        return RewardResult(1.0, "solved", {"cells_good": blanks, "cells_total": blanks})
    good, total = _good_blank_cells(grid, givens, size)
    breakdown = {"cells_good": good, "cells_total": total}  # shown with or without partial credit
    if not partial_credit or violation.startswith("given at"):
        return RewardResult(0.0, violation, breakdown)
    reward = good / total if total else 0.0
    return RewardResult(reward, f"partial: {good}/{total} blank cells good; {violation}", breakdown)


def score_sudoku_row(row: dict, response: str) -> RewardResult:
    """:func:`score_sudoku` on a task row of the sudoku environment (``puzzle``, ``size``, ``partial_credit``)."""
    return score_sudoku(response, row["puzzle"], int(row["size"]), partial_credit=bool(row.get("partial_credit")))


# --- solver and generator ------------------------------------------------------------------------


def _geometry(size: int) -> tuple[list[int], list[int], list[int]]:
    br, bc = BOX[size]
    rows = [i // size for i in range(size * size)]
    cols = [i % size for i in range(size * size)]
    boxes = [(r // br) * (size // bc) + c // bc for r, c in zip(rows, cols, strict=True)]
    return rows, cols, boxes


def _search(cells: list[int], size: int, limit: int, rng: random.Random | None) -> int:
    """Fill ``cells`` (flat, 0 = blank) in place with the first solution found; return the number of
    solutions found, stopping at ``limit``. ``rng`` shuffles the value order (for random grids)."""
    rows_of, cols_of, boxes_of = _geometry(size)
    full = (1 << (size + 1)) - 2  # bits 1..size
    row_used, col_used, box_used = [0] * size, [0] * size, [0] * size
    for i, v in enumerate(cells):
        if v:
            bit = 1 << v
            if (row_used[rows_of[i]] | col_used[cols_of[i]] | box_used[boxes_of[i]]) & bit:
                return 0  # the givens already conflict
            row_used[rows_of[i]] |= bit
            col_used[cols_of[i]] |= bit
            box_used[boxes_of[i]] |= bit
    empty = [i for i, v in enumerate(cells) if v == 0]
    first: list[int] = []

    def candidates(i: int) -> int:
        return full & ~(row_used[rows_of[i]] | col_used[cols_of[i]] | box_used[boxes_of[i]])

    def solve(found: int) -> int:
        best, best_mask, best_n = -1, 0, size + 1
        for i in empty:
            if cells[i] == 0:
                mask = candidates(i)
                n = mask.bit_count()
                if n < best_n:
                    best, best_mask, best_n = i, mask, n
                    if n <= 1:
                        break
        if best < 0:  # no blank left: a solution
            if not first:
                first.extend(cells)
            return found + 1
        if best_n == 0:
            return found
        values = [v for v in range(1, size + 1) if best_mask >> v & 1]
        if rng is not None:
            rng.shuffle(values)
        r, c, b = rows_of[best], cols_of[best], boxes_of[best]
        for v in values:
            bit = 1 << v
            cells[best] = v
            row_used[r] |= bit
            col_used[c] |= bit
            box_used[b] |= bit
            found = solve(found)
            row_used[r] &= ~bit
            col_used[c] &= ~bit
            box_used[b] &= ~bit
            cells[best] = 0
            if found >= limit:
                break
        return found

    count = solve(0)
    if first:
        cells[:] = first
    return count


def _cells(puzzle: str, size: int) -> list[int]:
    return [v for row in parse_puzzle(puzzle, size) for v in row]


def count_solutions(puzzle: str, size: int, limit: int = 2) -> int:
    """How many solutions ``puzzle`` has, counting no further than ``limit``."""
    return _search(_cells(puzzle, size), size, limit, None)


def solve(puzzle: str, size: int) -> str | None:
    """One solution of ``puzzle`` as a row-major digit string, or None when it has none."""
    cells = _cells(puzzle, size)
    return "".join(map(str, cells)) if _search(cells, size, 1, None) else None


def _blanks(size: int, difficulty: str | int) -> int:
    if isinstance(difficulty, int) and not isinstance(difficulty, bool):
        blanks = difficulty
    elif difficulty in DIFFICULTY_BLANKS[size]:
        blanks = DIFFICULTY_BLANKS[size][difficulty]
    else:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTY_BLANKS[size])} or a number of blanks")
    if not 0 <= blanks <= size * size - (size - 1):
        raise ValueError(f"{blanks} blanks is impossible for a unique {size}x{size} puzzle")
    return blanks


def generate_puzzle(size: int, difficulty: str | int, rng: random.Random, max_tries: int = 100) -> tuple[str, str]:
    """A ``(puzzle, solution)`` pair of row-major digit strings (``0`` = blank) with a unique solution.

    ``difficulty`` is ``easy``/``medium``/``hard`` (4x4: 4/6/8 blanks, 9x9: 30/40/50) or a number of
    blank cells. Everything random comes from ``rng``, so the same seed gives the same puzzle.
    """
    _check_size(size)
    blanks = _blanks(size, difficulty)
    for _ in range(max_tries):
        cells = [0] * (size * size)
        _search(cells, size, 1, rng)
        solution = "".join(map(str, cells))
        order = list(range(size * size))
        rng.shuffle(order)
        removed = 0
        for i in order:
            if removed == blanks:
                break
            keep = cells[i]
            cells[i] = 0
            if _search(list(cells), size, 2, None) == 1:
                removed += 1
            else:
                cells[i] = keep
        if removed == blanks:
            return "".join(map(str, cells)), solution
    raise ValueError(f"no unique {size}x{size} puzzle with {blanks} blanks found in {max_tries} tries")
