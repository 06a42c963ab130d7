"""What a vLLM engine's drafter (MTP, EAGLE) was fed and what it proposed, step by step, and how each draft fared.

vLLM reports only totals of drafted and accepted tokens. When acceptance is far below the draft's agreement with
the model measured in PyTorch, the totals cannot say whether the drafter sees the wrong inputs (token, position,
hidden state) after some steps, or computes wrongly from the right ones. A trace can: the engine's workers record
each call of the drafter's ``propose`` (``start`` wraps it; the worker extension's ``gymrl_trace_drafts`` and
``gymrl_traced_drafts`` drive it), and :func:`draft_fates` lines the records up with the finished text.

Only the first draft token of each step is followed, and only one request may be in flight while tracing
(``max_num_seqs: 1``): positions are read from the batch as a whole.
"""

from dataclasses import dataclass

import torch

_records: list[dict] = []


def start(model_runner) -> bool:
    """Wrap ``model_runner.drafter.propose`` (once) and clear the records; False where the engine has no drafter
    that takes the target's hidden states (ngram, or no speculative decoding)."""
    drafter = getattr(model_runner, "drafter", None)
    if drafter is None or not hasattr(drafter, "propose") or not hasattr(drafter, "hidden_size"):
        return False
    _records.clear()
    if getattr(drafter, "_gymrl_traced", False):
        return True
    original = drafter.propose

    def propose(*args, **kwargs):
        drafts = original(*args, **kwargs)
        positions = kwargs["target_positions"]
        rejected = kwargs.get("num_rejected_tokens_gpu")
        hidden = kwargs["target_hidden_states"]
        next_position = int(positions.max()) + 1 - (int(rejected[0]) if rejected is not None else 0)
        row = int((positions == next_position - 1).nonzero()[0, 0])  # the row the first draft is drafted from
        _records.append({"next_position": next_position, "next_token": int(kwargs["next_token_ids"][0]),
                         "input_token": int(kwargs["target_token_ids"][row]),
                         "hidden": hidden[row].float().tolist(),  # plain lists cross any RPC encoding
                         "draft": int(drafts[0, 0]) if drafts.dim() == 2 else int(drafts[0])})
        return drafts

    drafter.propose = propose
    drafter._gymrl_traced = True
    return True


def take() -> list[dict]:
    """The records since ``start``, cleared."""
    out = list(_records)
    _records.clear()
    return out


@dataclass
class DraftFate:
    """One drafter step: the draft for ``position`` (first draft token only), fed the token at ``position - 1``
    and the hidden state at ``position - 2``."""

    position: int
    draft: int
    accepted: bool
    previous_accepted: bool | None  # None: the first draft of the completion
    inputs_match_text: bool  # the next token and the target's input token are the text's at their positions
    hidden: torch.Tensor  # the target's hidden state the draft was drafted from


def draft_fates(records: list[dict], text: list[int]) -> list[DraftFate]:
    """Each record of one greedy completion lined up with ``text`` (prompt + completion tokens): a greedy draft is
    accepted when it is the text's token at its position. Drafts past the end of the text are left out."""
    fates: list[DraftFate] = []
    for r in records:
        position = r["next_position"] + 1
        if position >= len(text):
            continue
        previous = fates[-1].accepted if fates else None
        inputs = text[r["next_position"]] == r["next_token"] and text[r["next_position"] - 1] == r["input_token"]
        fates.append(DraftFate(position, r["draft"], text[position] == r["draft"], previous, inputs,
                               torch.tensor(r["hidden"])))
    return fates


@torch.no_grad()
def trainer_drafts(model, layer, text: list[int]) -> tuple[list[int], torch.Tensor]:
    """The trainer's own first draft for every position of ``text`` (teacher-forced; -1 where there is none) and
    its normed hidden states [T, H]: what the engine's drafter should have proposed, and from what."""
    from gymrl.models.mtp import draft_logits

    ids = torch.tensor([text], device=model.device)
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    drafts = draft_logits(model, layer, ids, hidden)[0].argmax(-1).tolist()  # position t drafts token t + 2
    return [-1, -1] + drafts, hidden[0].float().cpu()


def compare(fates: list[DraftFate], text: list[int], drafts: list[int], hidden: torch.Tensor) -> list[dict]:
    """Per step: the engine's draft and inputs against the trainer's (:func:`trainer_drafts`)."""
    return [{"accepted": f.accepted, "previous_accepted": f.previous_accepted,
             "inputs_match_text": f.inputs_match_text,
             "draft_is_trainers": f.draft == drafts[f.position],
             "trainers_draft_accepted": drafts[f.position] == text[f.position],
             "hidden_cosine": torch.nn.functional.cosine_similarity(
                 f.hidden, hidden[f.position - 2].to(f.hidden.dtype), dim=0).item()} for f in fates]


def split_by_previous(rows: list[dict]) -> dict:
    """The mean of every measure of :func:`compare`'s rows, over all steps and split by the previous draft's fate
    (if every draft after an accepted one failed, acceptance would be a / (1 + a) at agreement a)."""
    groups = {"all": rows, "after_accepted": [r for r in rows if r["previous_accepted"]],
              "after_rejected": [r for r in rows if r["previous_accepted"] is False]}
    measures = ("accepted", "draft_is_trainers", "trainers_draft_accepted", "inputs_match_text", "hidden_cosine")
    return {name: {"steps": len(g), **{m: (sum(float(r[m]) for r in g) / len(g) if g else None) for m in measures}}
            for name, g in groups.items()}


def trace_greedy(pool, model, layer, prompts: list[list[int]], sampling) -> tuple[list[dict], list]:
    """Each prompt's greedy completion from ``pool``'s one engine, one request at a time, traced: (:func:`compare`'s
    rows over all prompts, each generation's spec stats)."""
    import ray

    (actor,) = pool.actors
    rows, spec = [], []
    for prompt in prompts:
        if not all(ray.get(actor.worker_call.remote("gymrl_trace_drafts"))):
            raise RuntimeError("this engine has no drafter that takes hidden states to trace")
        gen = pool.generate([prompt], 1, sampling)
        records = ray.get(actor.worker_call.remote("gymrl_traced_drafts"))[0]
        text = prompt + gen.groups[0][0].token_ids
        rows += compare(draft_fates(records, text), text, *trainer_drafts(model, layer, text))
        spec.append(gen.spec)
    return rows, spec
