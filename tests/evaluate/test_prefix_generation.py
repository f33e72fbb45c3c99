"""A prefix-tuning adapter loaded for inference generates with its prefix (evaluator, chat, batch, serve)."""
from __future__ import annotations

import os

os.environ.setdefault("SFT_CACHE_DIR", "/tmp/sftcache")

import torch
from peft import PrefixTuningConfig, get_peft_model

from sft.evaluate.inference import GenerationOptions, generate, load_for_inference
from sft.models import load_model, load_tokenizer

MODEL = "tiny-qwen2"


def _greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0, len(prompt):].tolist()


def test_generate_uses_the_prefix(tmp_path):
    torch.manual_seed(0)
    adapter = get_peft_model(load_model(MODEL), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        for param in adapter.prompt_encoder.parameters():
            param.copy_(torch.randn_like(param))  # a prefix that changes the answers
    adapter.save_pretrained(tmp_path / "prefix")
    load_tokenizer(MODEL).save_pretrained(tmp_path / "prefix")

    model, tokenizer = load_for_inference(str(tmp_path / "prefix"))
    prompts = [[5, 6, 7, 8, 9], [1, 2, 3]]
    # the evaluator's batch shape: left padding, with the attention mask
    input_ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 1, 2, 3]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    output = generate(model, tokenizer, input_ids, attention, GenerationOptions(max_new_tokens=5), stops=[])
    expected = [_greedy(model, p, 5) for p in prompts]
    base = load_model(MODEL).eval()
    assert expected != [_greedy(base, p, 5) for p in prompts]  # the prefix matters: the check is not vacuous
    assert output[:, 5:].tolist() == expected
