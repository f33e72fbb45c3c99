"""sft.train.loss: equal to the plain HF loss, normalized over the accumulation window, memory-light, in the forward."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import TrainerCallback

from sft.models import load_model
from sft.train.loss import IGNORE_INDEX, attach_chunked_loss

# Four samples: (input ids, number of leading prompt tokens with label -100). Supervised lengths differ
# (3, 7, 1 and 10 tokens) so a per-micro-batch mean would weight them differently.
SAMPLES = [
    ([101, 102, 103, 104, 105, 106], 3),
    ([201, 202, 203, 204, 205, 206, 207, 208, 209], 2),
    ([301, 302, 303, 304], 3),
    ([401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411], 1),
]
PAD_ID = 151643


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The ops here are tiny: on a shared 2-core machine one thread is 2-5x faster than two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_qwen2():
    torch.manual_seed(0)
    return load_model("tiny-qwen2")


def _labels(ids: list[int], prompt_len: int) -> list[int]:
    return [IGNORE_INDEX] * prompt_len + ids[prompt_len:]


def pad_batch(features: list[dict]) -> dict:
    """Right-padded batch, as a padding collator makes it (test-local, independent of sft.tokens.collate)."""
    width = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": [], "labels": [], "attention_mask": []}
    for f in features:
        gap = width - len(f["input_ids"])
        batch["input_ids"].append(f["input_ids"] + [PAD_ID] * gap)
        batch["labels"].append(f["labels"] + [IGNORE_INDEX] * gap)
        batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * gap)
    return {k: torch.tensor(v) for k, v in batch.items()}


def pack_batch(features: list[dict]) -> dict:
    """One packed row: position ids restart per sample, each sample's first label masked, no attention mask."""
    ids, labels, positions = [], [], []
    for f in features:
        ids += f["input_ids"]
        labels += [IGNORE_INDEX] + f["labels"][1:]
        positions += list(range(len(f["input_ids"])))
    return {
        "input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([positions])
    }


def features() -> list[dict]:
    return [{"input_ids": ids, "labels": _labels(ids, p)} for ids, p in SAMPLES]


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def plain_and_chunked(model, batch, chunk_size, num_items=None):
    """(loss, grads) from the model's own HF loss and from the attached chunked loss, on the same batch."""
    model.zero_grad()
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    plain = model(**batch, **extra).loss
    plain.backward()
    plain_grads = grads(model)
    model.zero_grad()
    with attach_chunked_loss(model, chunk_size=chunk_size) as chunked:
        ours = model(**batch, **extra).loss
        ours.backward()
    assert chunked.chunks_run, "the chunked loss did not run"
    return plain, plain_grads, ours, grads(model)


def assert_grads_close(a: dict, b: dict, atol: float = 1e-5):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=1e-4), name


@pytest.mark.parametrize("make_batch", [pad_batch, pack_batch], ids=["padded", "packed"])
def test_equals_plain_hf_loss_and_gradients(tiny_qwen2, make_batch):
    batch = make_batch(features())
    # chunk_size 4 over 21 supervised positions: several chunks and a ragged last one.
    plain, plain_grads, ours, our_grads = plain_and_chunked(tiny_qwen2, batch, chunk_size=4)
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == 21
    assert abs(ours.item() - plain.item()) < 1e-5
    assert_grads_close(our_grads, plain_grads)


def test_divides_by_num_items_in_batch(tiny_qwen2):
    batch = pad_batch(features()[:2])  # 10 supervised tokens (3 + 7) of a 40-token window
    plain, plain_grads, ours, our_grads = plain_and_chunked(tiny_qwen2, batch, 1024, torch.tensor(40))
    assert abs(ours.item() - plain.item()) < 1e-5
    assert_grads_close(our_grads, plain_grads)
    _, _, per_batch, _ = plain_and_chunked(tiny_qwen2, batch, 1024)
    assert abs(ours.item() * 40 / 10 - per_batch.item()) < 1e-4


@pytest.mark.parametrize("num_items", [None, 0, torch.tensor(0)])
def test_zero_supervised_tokens_give_zero_loss_and_zero_grad(tiny_qwen2, num_items):
    ids = [11, 12, 13, 14, 15]
    batch = pad_batch([{"input_ids": ids, "labels": [IGNORE_INDEX] * 5}])
    tiny_qwen2.zero_grad()
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    with attach_chunked_loss(tiny_qwen2):
        loss = tiny_qwen2(**batch, **extra).loss
        loss.backward()
    assert loss.item() == 0.0
    our_grads = grads(tiny_qwen2)
    assert our_grads, "backward reached no parameter"
    assert all(g.abs().max().item() == 0.0 for g in our_grads.values())


def test_lora_model_matches_plain_loss(tiny_qwen2):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(tiny_qwen2), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    batch = pad_batch(features())
    plain, plain_grads, ours, our_grads = plain_and_chunked(peft_model, batch, chunk_size=5)
    assert abs(ours.item() - plain.item()) < 1e-5
    assert any("lora_A" in name for name in our_grads)
    assert_grads_close(our_grads, plain_grads)


def test_prompt_tuning_model_matches_plain_loss(tiny_qwen2):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(tiny_qwen2), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3)
    )
    batch = pad_batch(features())
    plain, plain_grads, ours, our_grads = plain_and_chunked(peft_model, batch, chunk_size=5)
    assert abs(ours.item() - plain.item()) < 1e-5
    assert list(our_grads) == ["prompt_encoder.default.embedding.weight"]
    assert_grads_close(our_grads, plain_grads)


def test_untied_head_with_bias_matches_plain_loss_and_gradients():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(2)
    config = Qwen2Config(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config)
    model.lm_head.bias = torch.nn.Parameter(torch.randn(512) * 0.1)  # the fused path's bias gradient too
    batch = pad_batch(features())
    batch["input_ids"] = batch["input_ids"] % 512
    batch["labels"] = torch.where(batch["labels"] == IGNORE_INDEX, IGNORE_INDEX, batch["labels"] % 512)
    plain, plain_grads, ours, our_grads = plain_and_chunked(model, batch, chunk_size=4)
    assert abs(ours.item() - plain.item()) < 1e-5
    assert {"lm_head.weight", "lm_head.bias", "model.embed_tokens.weight"} <= set(our_grads)
    assert_grads_close(our_grads, plain_grads)


def test_untied_head_with_bf16_autocast():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    config = Qwen2Config(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config)
    batch = pad_batch(features())
    batch["input_ids"] = batch["input_ids"] % 512
    batch["labels"] = torch.where(batch["labels"] == IGNORE_INDEX, IGNORE_INDEX, batch["labels"] % 512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(**batch).loss
        with attach_chunked_loss(model, chunk_size=4):
            ours = model(**batch).loss
    assert ours.dtype == torch.float32
    assert abs(ours.item() - plain.item()) < 1e-2
    ours.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0

    # Nothing supervised: the untied head still gets a (zero) gradient, as DDP requires.
    model.zero_grad(set_to_none=True)
    with attach_chunked_loss(model):
        nothing = model(**{**batch, "labels": torch.full_like(batch["labels"], -100)}).loss
        nothing.backward()
    assert nothing.item() == 0.0
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().max().item() == 0.0


class GradientRecorder(TrainerCallback):
    """Keeps the gradients the optimizer is about to apply."""

    grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = grads(model)


def trainer_gradients(model, tmp_path, batch_size: int, accumulation: int) -> dict:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / f"bs{batch_size}_ga{accumulation}"), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=1, max_grad_norm=0.0, learning_rate=1e-3, optim="sgd",
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )
    recorder = GradientRecorder()
    chunked = attach_chunked_loss(model, chunk_size=4)
    window_counts = []
    model.register_forward_pre_hook(  # registered after the loss's hook: sees what the head will see
        lambda module, args, kwargs: window_counts.append(kwargs.get("logits_to_keep")), with_kwargs=True)
    num_items = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: num_items.append(int(kwargs["num_items_in_batch"])), with_kwargs=True,
        prepend=True)
    trainer = Trainer(model=model, args=args, train_dataset=features(), data_collator=pad_batch, callbacks=[recorder])
    trainer.train()
    # Every micro-batch ran the chunked loss in its forward, normalized by the window's 21 tokens.
    assert len(chunked.chunks_run) == accumulation and num_items == [21] * accumulation
    assert window_counts == [0] * accumulation  # the head saw every position (it projects the supervised ones)
    return recorder.grads


def test_batch4_equals_batch1_times_accumulation4(tiny_qwen2, tmp_path):
    one_batch = trainer_gradients(copy.deepcopy(tiny_qwen2), tmp_path, batch_size=4, accumulation=1)
    accumulated = trainer_gradients(copy.deepcopy(tiny_qwen2), tmp_path, batch_size=1, accumulation=4)
    assert_grads_close(one_batch, accumulated)

    # Both equal the gradient of the mean over all 21 supervised tokens, computed by plain HF.
    reference = copy.deepcopy(tiny_qwen2)
    for feature in features():
        reference(**pad_batch([feature]), num_items_in_batch=torch.tensor(21)).loss.backward()
    assert_grads_close(one_batch, grads(reference))


def test_trainer_evaluate_matches_plain_loss(tiny_qwen2, tmp_path):
    from transformers import Trainer, TrainingArguments

    def eval_loss(**loss_wiring) -> float:
        args = TrainingArguments(
            output_dir=str(tmp_path / "eval"), per_device_eval_batch_size=2, report_to=[], use_cpu=True,
            disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = Trainer(model=tiny_qwen2, args=args, eval_dataset=features(), **loss_wiring)
        return trainer.evaluate()["eval_loss"]

    plain = eval_loss(data_collator=pad_batch)
    with attach_chunked_loss(tiny_qwen2) as chunked:
        ours = eval_loss(data_collator=pad_batch)
    assert chunked.chunks_run and abs(ours - plain) < 1e-5


def test_without_labels_the_model_is_unchanged(tiny_qwen2):
    batch = pad_batch(features()[:2])
    plain = tiny_qwen2(input_ids=batch["input_ids"]).logits
    with attach_chunked_loss(tiny_qwen2) as chunked:
        ours = tiny_qwen2(input_ids=batch["input_ids"]).logits
    assert torch.equal(plain, ours) and chunked.chunks_run == []


def test_post_processed_logits_are_rejected(tiny_qwen2):
    batch = pad_batch(features()[:1])
    model = copy.deepcopy(tiny_qwen2)
    model.register_forward_hook(lambda module, args, output: output.__setitem__("logits", output.logits * 3))
    with attach_chunked_loss(model), pytest.raises(ValueError, match="post-processes its logits"):
        model(**batch)


def test_bad_arguments(tiny_qwen2):
    with pytest.raises(ValueError, match="chunk_size=0"):
        attach_chunked_loss(tiny_qwen2, chunk_size=0)
    batch = pad_batch(features()[:1])
    with attach_chunked_loss(tiny_qwen2), pytest.raises(ValueError, match=r"labels shape \(1, 5\)"):
        tiny_qwen2(input_ids=batch["input_ids"], labels=batch["labels"][:, :5])


def backward_head_matmuls(model, batch) -> tuple[int, int]:
    """(F.linear calls, vocab-sized matmul rows) during the chunked loss's backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    vocab = model.get_output_embeddings().weight.shape[0]

    class VocabMatmuls(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                a, b = args[-2], args[-1]
                if vocab in (a.shape[1], b.shape[1]):  # (n, V) @ (V, H) or (n, H) @ (H, V)
                    self.rows += a.shape[0]
            return func(*args, **(kwargs or {}))

    linear_calls = []
    original_linear = torch.nn.functional.linear
    with attach_chunked_loss(model, chunk_size=4):
        loss = model(**batch).loss
        torch.nn.functional.linear = lambda *a, **k: linear_calls.append(1) or original_linear(*a, **k)
        try:
            with VocabMatmuls() as counter:
                loss.backward()
        finally:
            torch.nn.functional.linear = original_linear
    return len(linear_calls), counter.rows


def test_backward_recomputes_nothing_through_the_head(tiny_qwen2):
    """Under ZeRO-3 the head's weight is partitioned again after the forward: backward must not use it for chunks."""
    batch = pad_batch(features())
    linear_calls, rows = backward_head_matmuls(copy.deepcopy(tiny_qwen2), batch)
    # Only the one-position `logits` output's (zero) gradient passes the head: batch rows, not 21 positions.
    assert linear_calls == 0 and rows <= len(batch["input_ids"])

    from peft import LoraConfig, get_peft_model  # a LoRA-wrapped head takes the recompute path (documented)

    lora_head = get_peft_model(copy.deepcopy(tiny_qwen2), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    linear_calls, rows = backward_head_matmuls(lora_head, batch)
    assert linear_calls > 0 and rows >= 21


# ------------------------------------------------------------------ Liger's fused linear cross-entropy (--fused_loss)


def test_fused_loss_selection_and_its_fallback(monkeypatch):
    import sft.train.loss as loss_module
    from sft.train.loss import choose_fused_loss

    monkeypatch.setattr(loss_module, "liger_available", lambda: True)
    assert [choose_fused_loss(r, "cuda") for r in ("auto", "liger", "chunked")] == ["liger", "liger", "chunked"]
    assert [choose_fused_loss(r, "cpu") for r in ("auto", "chunked")] == ["chunked", "chunked"]
    with pytest.raises(ValueError, match="--fused_loss liger needs a CUDA device .* trains on cpu: use --fused_loss auto"):
        choose_fused_loss("liger", "cpu")
    monkeypatch.setattr(loss_module, "liger_available", lambda: False)
    assert choose_fused_loss("auto", "cuda") == "chunked"
    with pytest.raises(ValueError, match="liger-kernel package is not installed: pip install liger-kernel"):
        choose_fused_loss("liger", "cuda")
    with pytest.raises(ValueError, match="--fused_loss 'fast': expected one of auto, liger, chunked"):
        choose_fused_loss("fast", "cuda")


def test_liger_availability_follows_the_import_system(monkeypatch):
    import importlib.util

    import sft.train.loss as loss_module

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "liger_kernel" else object())
    assert loss_module.liger_available() is False
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert loss_module.liger_available() is True


@pytest.fixture
def fake_liger(monkeypatch):
    """A stand-in `liger_kernel.transformers` whose LigerFusedLinearCrossEntropyLoss is the reference loss in
    torch, with Liger's call signature (weight, input, target, bias): it records what it was given."""
    import sys
    import types

    calls = []

    class LigerFusedLinearCrossEntropyLoss(torch.nn.Module):
        def __init__(self, ignore_index=-100, reduction="mean", softcap=None, accum_dtype=None):
            super().__init__()
            self.ignore_index, self.reduction, self.softcap = ignore_index, reduction, softcap
            self.accum_dtype = accum_dtype

        def forward(self, lin_weight, _input, target, bias=None):
            calls.append({"weight": lin_weight, "input": _input, "target": target, "bias": bias,
                          "ignore_index": self.ignore_index, "reduction": self.reduction,
                          "accum_dtype": self.accum_dtype})
            logits = torch.nn.functional.linear(_input, lin_weight, bias).float()
            return torch.nn.functional.cross_entropy(logits, target, ignore_index=self.ignore_index,
                                                     reduction=self.reduction)

    package = types.ModuleType("liger_kernel")
    module = types.ModuleType("liger_kernel.transformers")
    module.LigerFusedLinearCrossEntropyLoss = LigerFusedLinearCrossEntropyLoss
    package.transformers = module
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", module)
    return calls


def test_the_liger_call_site_gives_the_chunked_loss_and_gradients(tiny_qwen2, fake_liger):
    batch = pad_batch(features())
    grads, losses = {}, {}
    for kind in ("chunked", "liger"):
        model = copy.deepcopy(tiny_qwen2)
        with attach_chunked_loss(model, chunk_size=4, fused_loss=kind):
            loss = model(**batch).loss
            loss.backward()
        losses[kind] = loss.item()
        grads[kind] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert losses["liger"] == pytest.approx(losses["chunked"], rel=1e-3)
    assert grads["liger"].keys() == grads["chunked"].keys()
    for name, grad in grads["chunked"].items():
        torch.testing.assert_close(grads["liger"][name], grad, rtol=1e-3, atol=1e-5, msg=name)
    # Liger got every shifted position (no gather), the head's own weight, and -100 to skip, summed.
    (call,) = fake_liger
    width = batch["input_ids"].shape[1]
    assert call["input"].shape == (len(SAMPLES) * (width - 1), tiny_qwen2.config.hidden_size)
    assert torch.equal(call["target"], batch["labels"][:, 1:].reshape(-1))
    assert call["weight"].shape == tuple(tiny_qwen2.get_output_embeddings().weight.shape)
    assert (call["ignore_index"], call["reduction"], call["bias"]) == (IGNORE_INDEX, "sum", None)
    assert call["accum_dtype"] is torch.float32  # the head's gradient summed over chunks in fp32


def test_liger_is_not_used_for_a_head_that_is_not_a_plain_linear(tiny_qwen2, fake_liger):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(tiny_qwen2), LoraConfig(r=2, target_modules=["lm_head"]))
    with attach_chunked_loss(model, chunk_size=4, fused_loss="liger"):
        model(**pad_batch(features())).loss.backward()
    assert fake_liger == []  # the LoRA-wrapped head takes the chunked recompute path


def test_attach_refuses_an_unresolved_fused_loss(tiny_qwen2):
    with pytest.raises(ValueError, match="fused_loss='auto'; expected 'liger' or 'chunked'"):
        attach_chunked_loss(copy.deepcopy(tiny_qwen2), fused_loss="auto")
