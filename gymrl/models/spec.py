"""The tiny policy's spec: its shape and warm-up, as the run config's ``model.build_tiny`` holds it.

Pydantic only (no torch): the config imports it, and ``gymrl.models.tiny`` builds from it."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Spec fields that only some architectures read. The cache key leaves out the fields the spec's architecture does
# not read, so a qwen2 spec hashes as it did before deepseek_v3 existed and its cached builds still hit.
ARCHITECTURE_FIELDS = {"qwen2": ("num_key_value_heads", "head_dim"), "deepseek_v3": ("mtp_steps", "mtp_lr"),
                       "nemotron_h": ("num_key_value_heads", "head_dim", "mtp_steps", "mtp_lr", "hybrid_pattern",
                                      "mtp_pattern", "mamba_num_heads", "mamba_head_dim")}
MTP_ARCHITECTURES = ("deepseek_v3", "nemotron_h")


def foreign_fields(architecture: str) -> set[str]:
    """Fields some other architecture reads and ``architecture`` does not."""
    own = set(ARCHITECTURE_FIELDS.get(architecture, ()))
    return {f for fields in ARCHITECTURE_FIELDS.values() for f in fields} - own

# Defaults of an architecture where they differ from the fields' own (which are qwen2's). deepseek_v3, measured
# on 2 CPU cores: with the qwen2 warm-up (800 steps of 64) it takes over 4 minutes, and 300 steps of 64 with one
# attention head left it unable to copy the operands (4 of 31 held-out prompts); 600 steps of 32 with two heads
# copies all 31 and builds in about 2.5 minutes. Its warm-up peak learning rate is 1e-3: at qwen2's 3e-3 the loss
# stalled at 0.18 (qwen2 reaches 0.048; the 30/70 right/off-by-one answers put the floor near 0.047), the model never
# learned the sums, its sampled answers were spread thin (top answer 0.38 likely instead of the designed 0.7) and
# GRPO could not raise held-out reward; at 1e-3, 0.056 in the same 600 steps. Its LM head is untied: vLLM's DeepSeek
# model has no tied head.
# nemotron_h: untied like deepseek_v3 (Nemotron-3's own checkpoints are), and a 3-layer hybrid, one layer of each
# kind vLLM's model has (Mamba-2, MoE, attention).
ARCHITECTURE_DEFAULTS = {"deepseek_v3": {"tie_word_embeddings": False, "warmup_steps": 600, "warmup_batch_size": 32,
                                         "warmup_lr": 1e-3},
                         "nemotron_h": {"tie_word_embeddings": False, "num_hidden_layers": 3, "warmup_steps": 600,
                                        "warmup_batch_size": 32}}


class TinyModelSpec(BaseModel):
    """Shape and warm-up of a tiny policy. The defaults build in about a minute on 2 CPU cores (deepseek_v3's in
    about 2.5)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: Literal["qwen2", "deepseek_v3", "nemotron_h"] = Field(
        default="qwen2",
        description="Model family: qwen2 (Qwen2ForCausalLM), deepseek_v3 (DeepseekV3ForCausalLM with MLA attention, "
        "MoE and one MTP layer trained for vLLM's mtp drafts), both served by vLLM on CPU, or nemotron_h "
        "(NemotronHForCausalLM: Mamba-2 / MoE / attention hybrid with one MTP layer; vLLM's CPU build drafts with it "
        "when mtp_pattern is '*', its GPU build with any).",
    )
    hidden_size: int = Field(default=128, ge=8, description="Width of the residual stream.")
    num_hidden_layers: int = Field(default=2, ge=1, description="Transformer blocks.")
    num_attention_heads: int = Field(
        default=2, ge=1, description="Query heads (qwen2: hidden_size / heads is the head dim)."
    )
    num_key_value_heads: int = Field(
        default=2, ge=1, description="qwen2, nemotron_h: key/value heads (GQA when fewer than query heads)."
    )
    head_dim: int = Field(
        default=64,
        description="qwen2, nemotron_h: per-head width; must equal hidden_size / num_attention_heads (vLLM CPU needs "
        "64, 16 fails). deepseek_v3 has MLA's fixed head sizes instead.",
    )
    hybrid_pattern: str = Field(
        default="M*E", pattern=r"^[ME*-]+$",
        description="nemotron_h: one character per layer, as Nemotron-H's hybrid_override_pattern: M Mamba-2, E MoE, "
        "* attention, - dense MLP; its length is num_hidden_layers.",
    )
    mtp_pattern: str = Field(
        default="*E", pattern=r"^[E*]+$",
        description="nemotron_h: the MTP layer's sub-layers, as Nemotron-H's mtp_hybrid_override_pattern: * attention, "
        "E MoE (vLLM builds no other kind). vLLM's CPU build has no non-gated MoE, so '*' is the one that drafts "
        "there.",
    )
    mamba_num_heads: int = Field(default=4, ge=1, description="nemotron_h: Mamba-2 heads.")
    mamba_head_dim: int = Field(default=32, ge=1, description="nemotron_h: Mamba-2 head width.")
    intermediate_size: int = Field(default=384, ge=1, description="MLP width.")
    max_position_embeddings: int = Field(default=256, ge=16, description="Longest sequence (prompt + completion).")
    vocab_size: int = Field(default=384, ge=300, description="Tokenizer and embedding size (byte-level BPE).")
    tie_word_embeddings: bool = Field(
        default=True, description="Share the input embedding and the LM head (deepseek_v3: must be false, its default)."
    )
    seed: int = Field(default=0, description="Seeds the warm-up data, the initial weights and the batch order.")
    warmup_examples: int = Field(
        default=10000, ge=1, description="(prompt, response) pairs drawn from the environment for the warm-up."
    )
    warmup_steps: int = Field(
        default=800, ge=0, description="AdamW steps of supervised warm-up (0 = random model; deepseek_v3 default 600)."
    )
    warmup_lr: float = Field(default=3e-3, gt=0, description="Peak warm-up learning rate, cosine decay to zero "
                             "(deepseek_v3 default 1e-3).")
    warmup_batch_size: int = Field(
        default=64, ge=1, description="Sequences per warm-up (and MTP) step (deepseek_v3 default 32)."
    )
    mtp_steps: int = Field(
        default=200, ge=0,
        description="deepseek_v3, nemotron_h: AdamW steps training the MTP layer on the frozen warmed-up model (0 = a "
        "random MTP layer).",
    )
    mtp_lr: float = Field(default=3e-3, gt=0, description="deepseek_v3, nemotron_h: peak learning rate of the MTP "
                          "layer.")

    @model_validator(mode="before")
    @classmethod
    def _architecture_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {**ARCHITECTURE_DEFAULTS.get(data.get("architecture"), {}), **data}
        return data

    @model_validator(mode="after")
    def _shapes(self) -> "TinyModelSpec":
        # A field at its default is no stray: a run's saved config.json (what --resume reads) holds every field.
        stray = sorted(f for f in foreign_fields(self.architecture) if f in self.model_fields_set
                       and getattr(self, f) != type(self).model_fields[f].default)
        if stray:
            readers = [arch for arch, fields in ARCHITECTURE_FIELDS.items() if stray[0] in fields]
            raise ValueError(f"{stray[0]} applies to architecture {' and '.join(readers)} only, not "
                             f"{self.architecture}")
        if self.architecture == "nemotron_h":
            if len(self.hybrid_pattern) != self.num_hidden_layers:
                raise ValueError(f"hybrid_pattern {self.hybrid_pattern!r} has {len(self.hybrid_pattern)} layers, "
                                 f"num_hidden_layers is {self.num_hidden_layers}")
            if self.tie_word_embeddings:
                raise ValueError("nemotron_h needs tie_word_embeddings false: the MTP layer shares the LM head vLLM "
                                 "loads as lm_head.weight")
        elif self.architecture == "deepseek_v3":
            if self.tie_word_embeddings:
                raise ValueError("deepseek_v3 needs tie_word_embeddings false: vLLM's DeepSeek model has no tied "
                                 "LM head")
            return self
        if self.hidden_size != self.num_attention_heads * self.head_dim:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must equal num_attention_heads ({self.num_attention_heads}) "
                f"x head_dim ({self.head_dim})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self
