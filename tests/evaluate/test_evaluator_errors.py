"""The evaluator's bad inputs fail at start with one clear error: check keys, pickled weights."""
import json
import os
import pickle

import pytest
import torch

from sft.evaluate.evaluator import read_prompt_items
from sft.evaluate.inference import load_for_inference
from sft.models import ModelLoadError


def _prompts(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("check, message", [
    ({"contain": ["Paris"]}, "unknown check key 'contain'"),
    ({"contains": "Paris"}, "check 'contains' must be a list of strings, got 'Paris'"),
    ({"json_values": {"a": 1}}, "check 'json_values' must map each key to a list of allowed values"),
])
def test_bad_check_keys_fail_when_the_prompts_are_read_naming_file_line_and_valid_keys(tmp_path, check, message):
    # Before: read without complaint, then every scoring raised, every checkpoint was skipped, exit 0.
    path = _prompts(tmp_path / "p.jsonl", [{"prompt": "a", "check": {"contains": ["x"]}},
                                           {"prompt": "b", "check": check}])
    with pytest.raises(ValueError, match=f"^{path}:2: {message}") as err:
        read_prompt_items(path)
    if "unknown" in message:
        assert "known keys: contains, json_keys, json_values" in str(err.value)


def test_bad_check_key_stops_the_evaluator_before_any_model_loads(tmp_path, capsys):
    import hf_sft_eval
    from sft.config import parse_config, write_resolved_config

    run = tmp_path / "run"
    prompts = _prompts(tmp_path / "p.jsonl", [{"prompt": "a", "check": {"contains": ["x"], "regex": "y"}}])
    write_resolved_config(parse_config(["--model", "no-such-model", "--output_dir", str(run),
                                        "--eval_prompts", prompts]), run)
    assert hf_sft_eval.main(["--run", str(run), "--threads", "1", "--nice", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{prompts}:1: unknown check key 'regex'" in err and "Traceback" not in err
    assert not (run / "eval" / "metrics.jsonl").exists()


class _Payload:
    """What a malicious pickle carries: a call that runs on unpickling (here: create a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("content", ["malicious", "truncated"])
def test_a_malicious_or_corrupt_pickle_in_a_checkpoint_is_a_clear_error_naming_the_file(tmp_path, content):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sft.models import load_tokenizer

    folder = tmp_path / "checkpoint-2"
    config = Qwen2Config(vocab_size=151665, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    load_tokenizer("qwen2.5").save_pretrained(folder)
    os.remove(folder / "model.safetensors")
    weights, marker = folder / "pytorch_model.bin", tmp_path / "PWNED"
    if content == "malicious":
        weights.write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload(str(marker))}))
    else:
        torch.save({"w": torch.zeros(4)}, weights)
        weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ModelLoadError, match=f"^{weights}: torch refused to load it .*It was not executed"):
        load_for_inference(str(folder))
    assert not marker.exists()
