"""A small byte-level BPE tokenizer, trained offline, with a Nemotron-3 style chat template.

Digits are split one per token before byte-level BPE, so numbers are spelled digit by digit (as in
the Nemotron and Qwen tokenizers). ``<think>`` and ``</think>`` are atomic tokens but not *special*
ones: decoding with ``skip_special_tokens=True`` (vLLM's default) keeps them, so a verifier sees the
reasoning block; so are ``<tool_call>`` and ``</tool_call>`` when the corpus has tool calls (a
corpus without them gets exactly the tokenizer it got before they existed). Decoding round-trips
any text exactly (every byte is in the vocabulary).
"""

import json
from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]
THINK_TOKENS = [THINK_START, THINK_END]
TOOL_CALL_TOKENS = ["<tool_call>", "</tool_call>"]  # atomic in Qwen and Nemotron vocabularies too

# Nemotron-3's chat format: `<|im_start|>{role}\n{content}<|im_end|>\n` per message; the generation
# prompt opens the assistant turn, and `enable_thinking=false` pre-fills an empty reasoning block.
# Tools, when given, open the conversation as one short system line, `Tools: name(arg, ...) ...`
# (real checkpoints render full JSON schemas; a tiny model's context is too short for them). Tool
# results are ordinary `tool` messages.
CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\nTools:' -}}"
    "{%- for tool in tools -%}"
    "{%- set fn = tool['function'] if tool['function'] is defined else tool -%}"
    "{%- set params = fn['parameters']['properties'] if fn['parameters'] is defined and fn['parameters']['properties'] is defined else {} -%}"
    "{{- ' ' + fn['name'] + '(' + (params | list | join(', ')) + ')' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>' + '\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think></think>' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def _unmark_special(tok: Tokenizer, tokens: list[str]) -> Tokenizer:
    """The same tokenizer with ``tokens`` as plain added tokens (the trainer registers all its tokens special)."""
    data = json.loads(tok.to_str())
    for added in data["added_tokens"]:
        if added["content"] in tokens:
            added["special"] = False
    return Tokenizer.from_str(json.dumps(data))


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of exactly ``vocab_size`` tokens on ``corpus`` (deterministic for a given corpus).

    Ids: 0 ``<|endoftext|>`` (pad), 1 ``<|im_start|>``, 2 ``<|im_end|>`` (eos), 3 ``<think>``,
    4 ``</think>``, then ``<tool_call>`` and ``</tool_call>`` if the corpus has tool calls, then the
    256 byte symbols, the learned merges and reserved fillers.
    """
    texts = list(corpus)
    atomic = THINK_TOKENS + (TOOL_CALL_TOKENS if any(TOOL_CALL_TOKENS[0] in t for t in texts) else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS + atomic],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The trainer's tokens are atomic in the corpus (no merge is wasted on their pieces) and come first.
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok = _unmark_special(tok, atomic)
    # A narrow corpus runs out of merges before ``vocab_size``: fill the rest with reserved special
    # tokens so every id the model can emit decodes (to nothing, as specials are skipped).
    missing = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    if missing > 0:
        tok.add_special_tokens([AddedToken(f"<|reserved_{i}|>", special=True, normalized=False) for i in range(missing)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
