import os
import subprocess
import sys
import textwrap

import pytest

from sft import models
from sft.chat_templates import QWEN25_DEFAULT_SYSTEM
from sft.models import (
    ModelLoadError,
    ensure_pad_token,
    load_model,
    load_tokenizer,
    resolve_model_path,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_qwen25_tokenizer_ids(qwen_tokenizer):
    tok = qwen_tokenizer
    assert tok("Hello").input_ids == [9707]
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>"]) == [
        151643, 151644, 151645, 151657]
    assert tok.convert_tokens_to_ids(["<|object_ref_start|>", "</tool_call>", "<|file_sep|>"]) == [
        151646, 151658, 151664]
    assert len(tok) == 151665
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151645)
    # Qwen's pre-tokenizer splits digits one by one and keeps Chinese and "\n\n" as in the real model.
    assert tok("12345").input_ids == [16, 17, 18, 19, 20]
    assert tok("你好，世界\n\n").input_ids == [108386, 3837, 99489, 271]


def test_qwen25_chat_template_default_system(qwen_tokenizer):
    text = qwen_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == (f"<|im_start|>system\n{QWEN25_DEFAULT_SYSTEM}<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_tiny_qwen2_uses_real_qwen_ids():
    model = load_model("tiny-qwen2")
    tok = load_tokenizer("tiny-qwen2")
    assert model.config.model_type == "qwen2"
    assert model.config.vocab_size == 151936
    assert model.config.num_hidden_layers <= 4
    assert tok("Hello").input_ids == [9707]
    assert tok.pad_token_id == 151643 and tok.eos_token_id == 151645


def test_builtin_cache_is_reused(monkeypatch):
    path = resolve_model_path("tiny-qwen2")
    marker = os.path.join(path, ".complete")
    before = os.stat(marker).st_mtime_ns

    def must_not_rebuild(folder):
        raise AssertionError("built-in was converted again instead of reusing the cache")

    monkeypatch.setitem(models.BUILTIN_MODELS, "tiny-qwen2", must_not_rebuild)
    assert resolve_model_path("tiny-qwen2") == path
    assert os.stat(marker).st_mtime_ns == before


def test_materialize_is_atomic_when_the_writer_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_CACHE_DIR", str(tmp_path))

    def broken_writer(folder):
        (folder / "config.json").write_text("{half")
        raise RuntimeError("disk full")

    monkeypatch.setitem(models.BUILTIN_MODELS, "tiny-broken", broken_writer)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model_path("tiny-broken")
    assert list(tmp_path.iterdir()) == []  # no half-written folder left under any name


def test_pad_token_is_never_the_turn_end(qwen_tokenizer):
    import copy

    tok = copy.deepcopy(qwen_tokenizer)
    tok.pad_token = "<|im_end|>"  # what a naive setup does: pad = eos = turn end
    ensure_pad_token(tok)
    assert tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.convert_tokens_to_ids("<|im_end|>")


def test_smollm2_tokenizer_pad_differs_from_eos():
    tok = load_tokenizer("smollm2-135m-instruct")
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0
    assert "<|im_start|>" in tok.chat_template


def test_offline_hub_id_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"Qwen/Qwen2.5-0.5B.*HF_HUB_OFFLINE.*built-in name"):
        load_tokenizer("Qwen/Qwen2.5-0.5B")


def test_missing_local_path_gives_a_clear_error():
    with pytest.raises(ModelLoadError, match="looks like a local path but does not exist"):
        load_model("./no/such/model-folder")


def test_default_model_answers_offline():
    """The built-in default loads with HF_HUB_OFFLINE=1 in a fresh process and answers sensibly."""
    code = textwrap.dedent("""
        import torch
        from sft.models import load_model, load_tokenizer, DEFAULT_MODEL
        tok = load_tokenizer(DEFAULT_MODEL)
        model = load_model(DEFAULT_MODEL)
        batch = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=16, do_sample=False)
        print("ANSWER:" + tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    answer = result.stdout.split("ANSWER:", 1)[1]
    assert "Paris" in answer
