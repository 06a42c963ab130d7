"""Moving policy weights from the trainer into running vLLM engines.

The trainer packs its state dict into one safetensors blob (one Ray object, no per-tensor calls); each
engine's workers unpack it and load it in place with vLLM's ``reload_weights``. This class is
installed into vLLM's workers through ``worker_extension_cls`` so ``collective_rpc`` can call it by
name, with no pickled functions (vLLM otherwise needs VLLM_ALLOW_INSECURE_SERIALIZATION).
"""

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors


def pack_state_dict(state_dict: dict[str, torch.Tensor]) -> bytes:
    """The trainer's weights as one contiguous blob (tied tensors are stored once)."""
    seen: dict[int, str] = {}
    tensors = {}
    for name, tensor in state_dict.items():
        ptr = tensor.data_ptr()
        if ptr in seen:  # tied weights (e.g. lm_head = embed_tokens): vLLM ties them itself
            continue
        seen[ptr] = name
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return save_safetensors(tensors)


class WeightSyncExtension:
    """Mixed into vLLM's worker class; methods run inside every engine worker."""

    def gymrl_load_weights(self, blob: bytes) -> int:
        weights = load_safetensors(blob)
        # In-place reload through vLLM's own path (handles fused qkv / gate_up layouts). A plain
        # model.load_weights() after start-up fails on CPU ("'Parameter' has no attribute 'weight_loader'").
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
        self._refresh_tied_lm_head()
        return len(weights)

    def _refresh_tied_lm_head(self) -> None:
        """Re-tie and re-prepare an lm_head that shares the input embedding.

        vLLM's CPU build packs the lm_head matrix into its own GEMM handle at load time; the in-place
        reload refreshes the embedding but never touches the tied head, so without this the engine
        keeps the old output projection (measured: logprob error 0.56 after a push that moved the
        embedding). On GPU the re-preparation is a no-op.
        """
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        if head is None or not getattr(self.model_runner.model_config.hf_config, "tie_word_embeddings", False):
            return
        head.weight = model.model.embed_tokens.weight
        head.quant_method.process_weights_after_loading(head)
