"""gymrl export --gguf: what the file holds, read back with the gguf package (llama.cpp loading it and
tokenizing as transformers does is in tests/test_eval.py, against llama.cpp's server)."""

import json
import shutil

import numpy as np
from safetensors.numpy import load_file
from transformers import AutoTokenizer
from typer.testing import CliRunner

from gymrl.cli import app


def test_gguf_holds_the_weights_tokenizer_and_template(demo_model, tmp_path):
    from gguf import GGUFReader

    out = tmp_path / "tiny.gguf"
    result = CliRunner().invoke(app, ["export", str(demo_model), str(out), "--gguf"])
    assert result.exit_code == 0, result.output
    reader = GGUFReader(out)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    assert field("tokenizer.ggml.tokens") == [t for t, _ in vocab]
    assert field("tokenizer.ggml.pre") == "refact"
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field("tokenizer.chat_template") == tokenizer.chat_template
    types = field("tokenizer.ggml.token_type")
    assert types[tokenizer.convert_tokens_to_ids("<|im_end|>")] == 3  # CONTROL
    assert types[tokenizer.convert_tokens_to_ids("<think>")] == 4  # USER_DEFINED: atomic in plain text
    weights = load_file(demo_model / "model.safetensors")
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(weights) - ("lm_head.weight" in weights)  # the tied lm_head is token_embd
    embed = tensors["token_embd.weight"]
    assert np.array_equal(np.asarray(embed.data).reshape(weights["model.embed_tokens.weight"].shape),
                          weights["model.embed_tokens.weight"])


def test_gguf_export_errors_are_one_line(demo_model, tmp_path):
    out = tmp_path / "a.gguf"
    out.write_bytes(b"")
    exists = CliRunner().invoke(app, ["export", str(demo_model), str(out), "--gguf"])
    assert exists.exit_code == 2 and "exists; give a new file name" in exists.output
    other = tmp_path / "other"
    shutil.copytree(demo_model, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    refused = CliRunner().invoke(app, ["export", str(other), str(tmp_path / "b.gguf"), "--gguf"])
    assert refused.exit_code == 2 and "GGUF export writes Qwen2-family models" in refused.output
    assert not (tmp_path / "b.gguf").exists() and not list(tmp_path.glob(".b.gguf.tmp-*"))
