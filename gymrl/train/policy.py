"""The trainer's view of the policy: per-token logprobs of completions under an HF causal LM."""

import torch
import torch.nn.functional as F


def stop_banned_mask(prompt_lengths: list[int], spans: list[list[tuple[int, int]]], width: int) -> torch.Tensor:
    """[B, width - 1] bool, aligned like :func:`pad_batch`'s completion mask: True where the target token was
    sampled with the stop tokens banned (completion positions ``start <= k < end`` of each span)."""
    banned = torch.zeros((len(prompt_lengths), width - 1), dtype=torch.bool)
    for i, (p, row) in enumerate(zip(prompt_lengths, spans)):
        for start, end in row:
            banned[i, p - 1 + start : p - 1 + end] = True
    return banned


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """The ids vLLM's min_tokens bans: the tokenizer's EOS and the generation config's EOS ids
    (``SamplingParams.all_stop_token_ids`` without stop strings' ids)."""
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([int(eos)] if isinstance(eos, int) else [int(i) for i in eos or []])
    return sorted(ids)


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
                         temperature: float | torch.Tensor = 1.0, stop_banned: torch.Tensor | None = None,
                         stop_ids: list[int] | None = None) -> torch.Tensor:
    """:func:`token_logprobs` from the model's logits [B, T, V] (for callers that need the logits too).
    ``stop_banned`` [B, T-1] (bool, aligned with the shifted targets) marks the positions where the engine sampled
    with ``stop_ids`` banned (``sampling.min_tokens``): there the stop tokens' logits are -inf, as in vLLM's
    min-tokens logits processor, so the logprobs are of the distribution that was sampled."""
    logits = logits[:, :-1].float()
    if isinstance(temperature, torch.Tensor):
        logits = logits / temperature.to(logits).view(-1, 1, 1)
    elif temperature != 1.0:
        logits = logits / temperature
    if stop_banned is not None and stop_ids and bool(stop_banned.any()):
        is_stop = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        is_stop[[i for i in stop_ids if i < logits.shape[-1]]] = True
        logits = logits.masked_fill(stop_banned[..., None] & is_stop, float("-inf"))
    return torch.gather(F.log_softmax(logits, dim=-1), 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def greedy_hits(model, prompt: list[int], completion: list[int]) -> list[bool]:
    """Whether each completion token is the model's greedy choice given the text before it (teacher-forced): how a
    greedy engine's text is checked against the trainer's model, e.g. that speculative drafts left it unchanged."""
    with torch.no_grad():
        ids = torch.tensor([prompt + completion], device=model.device)
        choice = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
    return [a == b for a, b in zip(choice, completion)]
