"""A Qwen2-family HF checkpoint as one GGUF file that llama.cpp loads, tokenizer and chat template included.

Written with ``gguf`` (llama.cpp's own writer package) and its tensor-name map, the way llama.cpp's
``convert_hf_to_gguf.py`` writes Qwen2 (no Q/K permutation: Qwen2 uses NeoX-style RoPE). That script
cannot take gymrl's tokenizer: it recognises a pre-tokenizer by hashing its output on a test text, and
gymrl's (digits split one by one, then GPT-2's byte-level regex) is not in its table. llama.cpp has
exactly that pre-tokenizer under the name ``refact`` (also ``starcoder``, ``smollm``: the regexes
``\\p{N}`` then GPT-2's), so the file says so, and llama.cpp tokenizes as the HF tokenizer does
(``tests/test_eval.py`` compares the ids through llama.cpp's server). Weights stay float32, so greedy decoding can agree with vLLM's.
"""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

PRE_TOKENIZER = "refact"  # llama.cpp's name for: each digit alone, then GPT-2's byte-level regex
GPT2_PATTERN_PRE_TOKENIZER = [{"type": "Digits", "individual_digits": True},
                              {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]


class GGUFExportError(ValueError):
    """A checkpoint this exporter cannot write faithfully; the message says what differs."""


def _check_tokenizer(tok: dict) -> None:
    pre = tok.get("pre_tokenizer") or {}
    if tok["model"]["type"] != "BPE" or pre.get("pretokenizers") != GPT2_PATTERN_PRE_TOKENIZER or tok.get("normalizer"):
        raise GGUFExportError("GGUF export knows gymrl's tokenizer (byte-level BPE, digits split, no normalizer); "
                              f"this one has model {tok['model']['type']}, pre-tokenizer {json.dumps(pre)}")


def _vocab(tok: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order and their llama.cpp types: special tokens are CONTROL (matched only when the
    caller parses specials, as a chat template's are), other added ones USER_DEFINED (always atomic,
    as ``<think>`` is for the HF tokenizer)."""
    from gguf import TokenType

    by_id = {i: (t, TokenType.NORMAL) for t, i in tok["model"]["vocab"].items()}
    for added in tok["added_tokens"]:
        by_id[added["id"]] = (added["content"], TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED)
    if sorted(by_id) != list(range(vocab_size)):
        raise GGUFExportError(f"tokenizer ids do not cover 0..{vocab_size - 1} (the model's vocab_size) exactly")
    return [by_id[i][0] for i in range(vocab_size)], [int(by_id[i][1]) for i in range(vocab_size)]


def _merges(tok: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]


def write_gguf(model_dir: str | Path, out: str | Path) -> Path:
    """Write ``model_dir`` (an HF Qwen2 folder) to the file ``out``; returns it."""
    import gguf

    model_dir, out = Path(model_dir), Path(out)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "qwen2":
        raise GGUFExportError(f"GGUF export writes Qwen2-family models; '{model_dir}' is {config.get('model_type')!r}")
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    _check_tokenizer(tok)
    tokens, types = _vocab(tok, config["vocab_size"])
    ids = {t: i for i, t in enumerate(tokens)}

    arch = gguf.MODEL_ARCH.QWEN2
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(model_dir.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tok))
    writer.add_eos_token_id(ids[tok_cfg["eos_token"]])
    if tok_cfg.get("pad_token"):
        writer.add_pad_token_id(ids[tok_cfg["pad_token"]])
    writer.add_add_bos_token(False)  # gymrl's template and tokenizer add no BOS
    writer.add_add_eos_token(False)
    writer.add_chat_template(tok_cfg["chat_template"])

    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    weights = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        weights |= load_file(path)
    for name, tensor in weights.items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp reuses token_embd.weight when output.weight is absent
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise GGUFExportError(f"no GGUF name for tensor '{name}' of a Qwen2 model")
        writer.add_tensor(mapped, np.ascontiguousarray(tensor.astype(np.float32)))

    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
