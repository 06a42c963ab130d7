"""The trainer's view of the policy: per-token logprobs of completions under an HF causal LM."""

import torch
import torch.nn.functional as F


def pad_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
              masks: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and a ``completion_mask`` aligned with the
    *shifted* targets (position t scores token t+1), so the mask covers exactly the completion tokens
    (only those marked 1 in ``masks``, when given: the environment's tokens in an episode are not the
    policy's to learn)."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        own = torch.tensor(masks[i], dtype=torch.float32) if masks is not None else 1.0
        completion_mask[i, len(p) - 1 : len(s) - 1] = own
    return input_ids, attention, completion_mask


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """logprob of token t+1 given tokens <= t, for every position: shape [B, T-1]. ``temperature`` is one
    for the batch or one per row (shape [B]): each sequence is scored at the temperature it was sampled with."""
    return logprobs_from_logits(model(input_ids=input_ids, attention_mask=attention_mask).logits, input_ids, temperature)


def logprobs_from_logits(logits: torch.Tensor, input_ids: torch.Tensor,
                         temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """:func:`token_logprobs` from the model's logits [B, T, V] (for callers that need the logits too)."""
    logits = logits[:, :-1].float()
    if isinstance(temperature, torch.Tensor):
        logits = logits / temperature.to(logits).view(-1, 1, 1)
    elif temperature != 1.0:
        logits = logits / temperature
    return torch.gather(F.log_softmax(logits, dim=-1), 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
