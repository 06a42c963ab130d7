"""The draft trace's bookkeeping (gymrl/rollout/draft_trace.py) on hand-made drafter calls; tests/test_mtp.py traces
a real vLLM engine's drafter with it."""

from types import SimpleNamespace

import pytest
import torch

from gymrl.rollout import draft_trace

TEXT = [10, 11, 12, 13, 14, 15, 16]  # a 3-token prompt and its completion


class Drafter:
    """Stands in for vLLM's EagleProposer: ``propose`` drafts the given tokens, one request at a time."""

    hidden_size = 2

    def __init__(self, drafts: list[int]):
        self.drafts = iter(drafts)

    def propose(self, **kwargs) -> torch.Tensor:
        return torch.tensor([[next(self.drafts)]])


def step(runner, positions: list[int], next_token: int, rejected: int | None = None) -> None:
    runner.drafter.propose(
        target_token_ids=torch.tensor([TEXT[p] for p in positions]), target_positions=torch.tensor(positions),
        target_hidden_states=torch.tensor([[float(p), 1.0] for p in positions]),
        next_token_ids=torch.tensor([next_token]),
        num_rejected_tokens_gpu=None if rejected is None else torch.tensor([rejected]))


def test_each_draft_is_lined_up_with_the_text_and_split_by_the_previous_fate():
    runner = SimpleNamespace(drafter=Drafter([14, 99, 7]))
    assert draft_trace.start(runner)
    step(runner, [0, 1, 2], 13)  # prefill: drafts position 4 from position 2's hidden state -> accepted
    step(runner, [3, 4], 15, rejected=0)  # the draft 14 verified and accepted, 15 the bonus: drafts position 6
    step(runner, [5, 6], 16, rejected=1)  # the draft 99 rejected, 16 its correction: drafts position 7, past the end
    fates = draft_trace.draft_fates(draft_trace.take(), TEXT)
    assert [(f.position, f.accepted, f.previous_accepted, f.inputs_match_text) for f in fates] == [
        (4, True, None, True), (6, False, True, True)]
    assert fates[1].hidden.tolist() == [4.0, 1.0]  # drafted from position 4, the accepted draft's
    assert draft_trace.take() == []

    trainer_drafts = [-1, -1, 0, 0, 14, 0, 16, 0]
    hidden = torch.tensor([[float(p), 1.0] for p in range(len(TEXT))])
    rows = draft_trace.compare(fates, TEXT, trainer_drafts, hidden)
    split = draft_trace.split_by_previous(rows)
    assert split["all"]["steps"] == 2 and split["all"]["accepted"] == 0.5
    assert split["after_accepted"] == pytest.approx({"steps": 1, "accepted": 0.0, "draft_is_trainers": 0.0,
                                                     "trainers_draft_accepted": 1.0, "inputs_match_text": 1.0,
                                                     "hidden_cosine": 1.0})
    assert split["after_rejected"]["steps"] == 0 and split["after_rejected"]["accepted"] is None


def test_a_runner_without_a_hidden_state_drafter_is_not_traced():
    assert not draft_trace.start(SimpleNamespace(drafter=None))
    assert not draft_trace.start(SimpleNamespace())
