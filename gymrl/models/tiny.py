"""A tiny Qwen2 policy built offline: tokenizer, random init, supervised warm-up on an environment.

The result is an ordinary HF checkpoint folder (config.json, model.safetensors, tokenizer files,
generation_config.json) that transformers and vLLM load like any other. Builds are deterministic for
a given spec, environment and machine, and cached by a hash of all three inputs; the folder appears
atomically, so a crash mid-build never leaves a half model behind.
"""

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from gymrl.models.chat import as_turns, chat_tools, tokenize_transcript
from gymrl.models.tokenizer import IM_END, build_tokenizer

log = logging.getLogger(__name__)

# Bump when the build procedure changes in a way that changes the weights: old cache entries then miss.
BUILD_VERSION = 1
COMPLETE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
WARMUP_REPORT = "warmup.json"


class TinyModelSpec(BaseModel):
    """Shape and warm-up of a tiny policy. The defaults build in about a minute on 2 CPU cores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: Literal["qwen2"] = Field(
        default="qwen2", description="Model family; qwen2 (Qwen2ForCausalLM) is served by vLLM on CPU."
    )
    hidden_size: int = Field(default=128, ge=8, description="Width of the residual stream.")
    num_hidden_layers: int = Field(default=2, ge=1, description="Transformer blocks.")
    num_attention_heads: int = Field(default=2, ge=1, description="Query heads; hidden_size / heads is the head dim.")
    num_key_value_heads: int = Field(default=2, ge=1, description="Key/value heads (GQA when fewer than query heads).")
    head_dim: int = Field(
        default=64, description="Per-head width; must equal hidden_size / num_attention_heads (vLLM CPU needs 64, 16 fails)."
    )
    intermediate_size: int = Field(default=384, ge=1, description="MLP width.")
    max_position_embeddings: int = Field(default=256, ge=16, description="Longest sequence (prompt + completion).")
    vocab_size: int = Field(default=384, ge=300, description="Tokenizer and embedding size (byte-level BPE).")
    tie_word_embeddings: bool = Field(default=True, description="Share the input embedding and the LM head.")
    seed: int = Field(default=0, description="Seeds the warm-up data, the initial weights and the batch order.")
    warmup_examples: int = Field(
        default=10000, ge=1, description="(prompt, response) pairs drawn from the environment for the warm-up."
    )
    warmup_steps: int = Field(default=800, ge=0, description="AdamW steps of supervised warm-up (0 = random model).")
    warmup_lr: float = Field(default=3e-3, gt=0, description="Peak warm-up learning rate (cosine decay to zero).")
    warmup_batch_size: int = Field(default=64, ge=1, description="Sequences per warm-up step.")

    @model_validator(mode="after")
    def _shapes(self) -> "TinyModelSpec":
        if self.hidden_size != self.num_attention_heads * self.head_dim:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must equal num_attention_heads ({self.num_attention_heads}) "
                f"x head_dim ({self.head_dim})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


def _plain(value: Any) -> Any:
    """``value`` if it is JSON data (nested), else None: objects such as HTTP clients must not reach the hash."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return None


def _env_config(env: Any) -> Any:
    """The environment's settings that can change its warm-up data (``env.config``), as JSON data."""
    return {k: v for k, v in sorted(_plain(env.config).items()) if v is not None}


def model_dir_name(spec: TinyModelSpec, env: Any) -> str:
    """``tiny-<hash>``: a short hash of the spec, the environment's name and config, and the builder version."""
    key = {
        "builder": BUILD_VERSION,
        "spec": spec.model_dump(mode="json"),
        "env": getattr(env, "name", type(env).__name__),
        "env_config": _env_config(env),
    }
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return f"tiny-{hashlib.sha256(blob).hexdigest()[:12]}"


def is_complete(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in COMPLETE_FILES)


def build_tiny_model(spec: TinyModelSpec, env: Any, cache_dir: Path) -> Path:
    """Build (or find in ``cache_dir``) the tiny policy for ``env``; returns its checkpoint folder.

    ``env`` needs ``name``, ``warmup_examples(n, seed)`` and, for the cache key, its settings as a
    ``config`` dict (``gymrl.envs.base.Environment`` and ``gymrl.session.WarmupMix`` have all three).
    """
    cache_dir = Path(cache_dir)
    out = cache_dir / model_dir_name(spec, env)
    if is_complete(out):
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=cache_dir))
    try:
        _build_into(spec, env, tmp)
        _publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _publish(tmp: Path, out: Path) -> None:
    try:
        os.rename(tmp, out)
        return
    except OSError:
        if is_complete(out):  # another process finished the same build first: keep theirs
            return
    # Something incomplete squats on the name (not ours: we only ever rename whole builds into place).
    stale = out.with_name(f".{out.name}.stale-{os.getpid()}")
    os.rename(out, stale)
    shutil.rmtree(stale, ignore_errors=True)
    os.rename(tmp, out)


def _build_into(spec: TinyModelSpec, env: Any, out: Path) -> None:
    started, cpu_started = time.perf_counter(), time.process_time()
    examples = env.warmup_examples(spec.warmup_examples, spec.seed)
    if not examples:
        raise ValueError(f"environment {getattr(env, 'name', env)!r} gave no warm-up examples")

    # Tokenizer: trained on the warm-up conversations exactly as the policy will see them.
    plain = build_tokenizer([], vocab_size=spec.vocab_size)  # only its chat template is used here
    corpus = [plain.apply_chat_template(ex.messages + as_turns(ex.response), tools=chat_tools(ex.tools), tokenize=False)
              for ex in examples]
    tokenizer = build_tokenizer(corpus, vocab_size=spec.vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.pad_token_id

    config = Qwen2Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_sliding_window=False,
        max_window_layers=spec.num_hidden_layers,
    )
    tokenizer.model_max_length = spec.max_position_embeddings
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(spec.seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)

    report = _warmup(model, tokenizer, examples, spec, pad_id)

    model.config.use_cache = True
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out, save_jinja_files=False)
    report["build_seconds"] = round(time.perf_counter() - started, 2)
    report["build_cpu_seconds"] = round(time.process_time() - cpu_started, 2)
    (out / WARMUP_REPORT).write_text(json.dumps(report, indent=2) + "\n")


def _warmup(model: Qwen2ForCausalLM, tokenizer, examples, spec: TinyModelSpec, pad_id: int) -> dict[str, Any]:
    """Supervised fine-tuning; the loss covers the model's turns, each closed by ``<|im_end|>``, only."""
    rows = [tokenize_transcript(tokenizer, ex.messages, ex.response, ex.tools) for ex in examples]
    length = max(len(r.prompt_ids) + len(r.completion_ids) for r in rows)
    if length > spec.max_position_embeddings:
        raise ValueError(f"warm-up sequences reach {length} tokens, over max_position_embeddings {spec.max_position_embeddings}")
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

    report: dict[str, Any] = {"examples": len(rows), "steps": spec.warmup_steps, "sequence_length": length}
    if spec.warmup_steps == 0:
        return report
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.warmup_lr, betas=(0.9, 0.98), weight_decay=0.0)
    total = spec.warmup_steps
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    )
    gen = torch.Generator().manual_seed(spec.seed)
    order = torch.randperm(len(rows), generator=gen)
    cursor, ema = 0, None
    bar = tqdm(range(total), desc="tiny-model warm-up", unit="step", mininterval=0.5, leave=False)
    for _ in bar:
        if cursor + spec.warmup_batch_size > len(rows):
            order, cursor = torch.randperm(len(rows), generator=gen), 0
        idx = order[cursor : cursor + spec.warmup_batch_size]
        cursor += spec.warmup_batch_size
        loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
    bar.close()
    model.eval()
    report["final_loss_ema"] = round(ema, 4)
    return report
