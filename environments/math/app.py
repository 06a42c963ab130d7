"""NeMo Gym resources server for math: /verify compares the boxed answer with math-verify."""

from gymrl.envs.nemo_server import TextVerifyServer
from rewards.math import score_math


class MathServer(TextVerifyServer):
    def score(self, row, text):
        return score_math(text, str(row["expected_answer"]))
