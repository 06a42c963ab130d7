"""Supervised training on the warm-up conversations, shared by the tiny model's warm-up and its MTP head.

Both train on the same padded token batches (:class:`SftData`) with the same loop (:func:`fit`): AdamW,
a linear warm-up to the peak rate and cosine decay to zero, batches drawn in a seeded shuffled order.
"""

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from gymrl.models.chat import tokenize_transcript


@dataclass
class SftData:
    """Right-padded sequences: prompt, then the model's turns (and any tool results between them)."""

    ids: torch.Tensor  # (rows, length) token ids, pad after the end
    labels: torch.Tensor  # the token where the loss covers it (the model's own turns), else -100
    mask: torch.Tensor  # 1 on real tokens, 0 on padding

    def __len__(self) -> int:
        return self.ids.shape[0]

    def to(self, device: str | torch.device) -> "SftData":
        return SftData(self.ids.to(device), self.labels.to(device), self.mask.to(device))


def encode_examples(tokenizer, examples, max_length: int, pad_id: int) -> SftData:
    """The warm-up examples as one padded batch; ValueError when a sequence is longer than ``max_length``."""
    rows = [tokenize_transcript(tokenizer, ex.messages, ex.response, ex.tools) for ex in examples]
    length = max(len(r.prompt_ids) + len(r.completion_ids) for r in rows)
    if length > max_length:
        raise ValueError(f"warm-up sequences reach {length} tokens, over max_position_embeddings {max_length}")
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        ids[i, : p + c] = torch.tensor(r.prompt_ids + r.completion_ids)
        # The loss covers the model's own turns; tool results (mask 0) are context only.
        own = torch.tensor(r.completion_mask, dtype=torch.bool)
        labels[i, p : p + c] = torch.where(own, torch.tensor(r.completion_ids), torch.tensor(-100))
        mask[i, : p + c] = 1
    return SftData(ids, labels, mask)


def fit(params: Iterable[torch.nn.Parameter], loss_of: Callable[[torch.Tensor], torch.Tensor], rows: int,
        steps: int, lr: float, batch_size: int, seed: int, desc: str) -> float:
    """``steps`` AdamW steps on ``loss_of(row indices)``; returns the loss's moving average at the end."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
    )
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(rows, generator=gen)
    cursor, ema = 0, None
    bar = tqdm(range(steps), desc=desc, unit="step", mininterval=0.5, leave=False)
    for _ in bar:
        if cursor + batch_size > rows:
            order, cursor = torch.randperm(rows, generator=gen), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        loss = loss_of(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
    bar.close()
    return ema
