"""NeMo Gym resources server for sudoku: /verify checks the grid against the puzzle's rules and givens."""

from gymrl.envs.nemo_server import TextVerifyServer
from rewards.sudoku import score_sudoku_row


class SudokuServer(TextVerifyServer):
    def score(self, row, text):
        return score_sudoku_row(row, text)
