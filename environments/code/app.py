"""NeMo Gym resources server for code: /verify runs the unit tests against the model's code, sandboxed."""

from gymrl.envs.nemo_server import TextVerifyServer
from rewards.code import score_code


class CodeServer(TextVerifyServer):
    score_in_thread = True  # a sandboxed run mostly waits on its processes: let other requests in meanwhile
    def score(self, row, text):
        return score_code(text, row["tests"], entry_point=row.get("entry_point"), mode=row.get("mode", "fraction"))
