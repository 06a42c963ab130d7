"""NeMo Gym resources server for the arithmetic environment: /verify scores the answer text."""

from gymrl.envs.nemo_server import TextVerifyServer
from rewards.arithmetic import score_arithmetic


class ArithmeticServer(TextVerifyServer):
    def score(self, row, text):
        return score_arithmetic(text, int(row["expected"]))
