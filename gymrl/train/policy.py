"""The trainer's view of the policy: per-token logprobs of completions under an HF causal LM."""

import torch
import torch.nn.functional as F

from gymrl.memory import LOGPROB_CHUNK_ELEMENTS


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
                         stop_ids: list[int] | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """:func:`token_logprobs` from the model's logits [B, T, V] (for callers that need the logits too).
    ``stop_banned`` [B, T-1] (bool, aligned with the shifted targets) marks the positions where the engine sampled
    with ``stop_ids`` banned (``sampling.min_tokens``): there the stop tokens' logits are -inf, as in vLLM's
    min-tokens logits processor, so the logprobs are of the distribution that was sampled. Computed in float32
    ``chunk_rows`` positions at a time (:class:`TokenLogprob`)."""
    batch, width, vocab = logits.shape
    targets = F.pad(input_ids[:, 1:], (0, 1))  # position t scores token t+1; the last position's is unused
    scale = torch.ones(batch, device=logits.device, dtype=torch.float32)
    scale = scale / (temperature.to(scale) if isinstance(temperature, torch.Tensor) else temperature)
    banned = is_stop = None
    if stop_banned is not None and stop_ids:
        is_stop = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
        is_stop[[i for i in stop_ids if i < vocab]] = True
        banned = F.pad(stop_banned, (0, 1)).reshape(-1)
    rows = chunk_rows or max(1, LOGPROB_CHUNK_ELEMENTS // vocab)
    out = TokenLogprob.apply(logits.reshape(-1, vocab), targets.reshape(-1),
                             scale.repeat_interleave(width), banned, is_stop, rows)
    return out.view(batch, width)[:, :-1]


class TokenLogprob(torch.autograd.Function):
    """log softmax(logits * scale)[target] per row, in float32 chunks of rows: neither pass holds the float32 logits
    of the whole micro-batch (the backward recomputes each chunk's softmax from the logits the model returned),
    which at a real vocabulary (Nemotron-3's 131k) would be gigabytes. ``banned`` [N] marks rows where the
    ``is_stop`` [V] tokens are excluded (-inf)."""

    @staticmethod
    def _scaled(logits, scale, banned, is_stop, rows: slice) -> torch.Tensor:
        x = logits[rows].float() * scale[rows, None]
        if banned is not None:
            x = x.masked_fill(banned[rows, None] & is_stop, float("-inf"))
        return x

    @staticmethod
    def forward(ctx, logits, targets, scale, banned, is_stop, chunk_rows: int):
        out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for start in range(0, logits.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            x = TokenLogprob._scaled(logits, scale, banned, is_stop, rows)
            lse[rows] = torch.logsumexp(x, dim=-1)
            out[rows] = x.gather(1, targets[rows, None]).squeeze(1) - lse[rows]
        ctx.save_for_backward(logits, targets, scale, banned, is_stop, lse)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad):
        logits, targets, scale, banned, is_stop, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            g = grad[rows].float()[:, None]
            d = torch.exp(TokenLogprob._scaled(logits, scale, banned, is_stop, rows) - lse[rows, None]) * -g
            d.scatter_add_(1, targets[rows, None], g)  # d/dx of x[target] - logsumexp(x)
            grad_logits[rows] = d * scale[rows, None]
        return grad_logits, None, None, None, None, None


def greedy_hits(model, prompt: list[int], completion: list[int]) -> list[bool]:
    """Whether each completion token is the model's greedy choice given the text before it (teacher-forced): how a
    greedy engine's text is checked against the trainer's model, e.g. that speculative drafts left it unchanged."""
    with torch.no_grad():
        ids = torch.tensor([prompt + completion], device=model.device)
        choice = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
    return [a == b for a, b in zip(choice, completion)]
