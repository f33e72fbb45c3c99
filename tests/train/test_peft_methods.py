"""PEFT methods beyond LoRA (ia3, prefix_tuning, p_tuning) and the LoRA options (--lora_init, --loraplus_lr_ratio,
--lora_modules_to_save): each trains only its own parameters, saves an adapter the evaluator scores as one,
and merges or refuses to with the reason. CI-sized: tiny-qwen2, 2 steps."""
from __future__ import annotations

import os

os.environ.setdefault("SFT_CACHE_DIR", "/tmp/sftcache")

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from sft.config import ConfigError, MethodArguments, ModelArguments, parse_config
from sft.evaluate.evaluator import ModelCache, masked_loss_sum
from sft.models import load_model
from sft.train.export import is_adapter_dir, merge_adapter
from sft.train.loss import attach_chunked_loss
from sft.train.methods import (
    LORA_INIT_DIR,
    count_parameters,
    load_model_for_method,
    loraplus_optimizer,
    prepare_model,
    save_final,
    save_lora_init,
)

MODEL = "tiny-qwen2"
IGNORE = -100


def _dataset(n: int = 8, length: int = 12) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 1000, (length,), generator=generator)
        labels = ids.clone()
        labels[:4] = IGNORE  # a prompt part: the label masking must survive the virtual tokens
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    return rows


def _args(output_dir, max_steps: int = 2, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-2,
                  lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1, save_strategy="no",
                  report_to="none", use_cpu=True, remove_unused_columns=False, seed=0, disable_tqdm=True)
    values.update(overrides)
    return TrainingArguments(**values)


def _trainer(model, method, args) -> Trainer:
    attach_chunked_loss(model)  # as sft.train.run does: the model returns the project's masked loss
    return Trainer(model=model, args=args, train_dataset=_dataset(),
                   optimizer_cls_and_kwargs=loraplus_optimizer(method, args))


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _changed(before, model) -> set[str]:
    after = dict(model.named_parameters())
    return {name for name, value in before.items() if not torch.equal(value, after[name].detach())}


def _batch() -> dict[str, torch.Tensor]:
    rows = _dataset(2)
    return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6]])).logits.float()


def _scored_loss(model) -> float:
    total, count = masked_loss_sum(model, [_batch()])
    return total / count


# kind/options -> which trained parameter names may (and must) change
CASES = {
    "ia3": (dict(finetuning_type="ia3"), lambda n: "ia3_l" in n),
    "prefix_tuning": (dict(finetuning_type="prefix_tuning", num_virtual_tokens=3), lambda n: "prompt_encoder" in n),
    "p_tuning": (dict(finetuning_type="p_tuning", num_virtual_tokens=3), lambda n: "prompt_encoder" in n),
    "lora_gaussian": (dict(finetuning_type="lora", lora_init="gaussian"), lambda n: "lora_" in n),
    "lora_pissa": (dict(finetuning_type="lora", lora_init="pissa"), lambda n: "lora_" in n),
    "lora_olora": (dict(finetuning_type="lora", lora_init="olora"), lambda n: "lora_" in n),
    "loraplus": (dict(finetuning_type="lora", loraplus_lr_ratio=16.0), lambda n: "lora_" in n),
    "lora_modules_to_save": (dict(finetuning_type="lora", lora_target="q_proj,v_proj",
                                  lora_modules_to_save="embed_tokens,lm_head"),
                             lambda n: "lora_" in n or "modules_to_save" in n),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """name -> (model, method, before, output folder): each case trained 2 steps and saved once."""
    cache = {}

    def get(name):
        if name not in cache:
            options, _ = CASES[name]
            root = tmp_path_factory.mktemp(name)
            method = MethodArguments(lora_rank=4, **options)
            args = _args(root)
            model = prepare_model(load_model_for_method(ModelArguments(model=MODEL), method, args), method, args)
            save_lora_init(model, method, root)
            before = _snapshot(model)
            trainer = _trainer(model, method, args)
            trainer.train()
            out = save_final(model, None, root, method)
            cache[name] = (model, method, before, out, trainer)
        return cache[name]
    return get


@pytest.mark.parametrize("name", list(CASES))
def test_only_the_method_parameters_change(name, trained):
    model, _, before, _, _ = trained(name)
    _, is_own = CASES[name]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    changed = _changed(before, model)
    assert trainable and all(is_own(n) for n in trainable), sorted(trainable - {n for n in trainable if is_own(n)})
    # everything else (the base weights) is bit-identical; LoRA's A may stay put while B is still zero
    assert changed <= trainable and changed
    if not name.startswith(("lora", "loraplus")):
        assert changed == trainable


@pytest.mark.parametrize("name", list(CASES))
def test_the_saved_adapter_is_scored_by_the_evaluator_as_an_adapter(name, trained):
    model, _, _, out, _ = trained(name)
    assert is_adapter_dir(out)
    expected = _scored_loss(model)
    loaded, _, kind = ModelCache().load(str(out), MODEL)
    assert kind == "adapter"
    assert _scored_loss(loaded) == pytest.approx(expected, abs=1e-4)
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["ia3", "lora_pissa", "lora_olora", "lora_modules_to_save"])
def test_merge_folds_the_adapter_into_plain_weights(name, trained, tmp_path):
    model, _, _, out, _ = trained(name)
    merged = AutoModelForCausalLM.from_pretrained(str(merge_adapter(out, tmp_path / "merged")))
    assert not any("lora" in n or "ia3" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), _logits(model), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["prefix_tuning", "p_tuning"])
def test_merge_refuses_virtual_tokens_with_the_reason(name, trained, tmp_path):
    _, _, _, out, _ = trained(name)
    with pytest.raises(ValueError, match=r"is (prefix_tuning|p_tuning): its virtual tokens are not weights of the "
                                         r"model, so there is nothing to merge"):
        merge_adapter(out, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_virtual_tokens_keep_the_label_masking(trained):
    """prompt/P-tuning prepend N positions (PEFT pads labels with -100), prefix tuning adds keys/values only:
    the project's loss counts exactly the batch's supervised tokens and equals a cross-entropy computed by hand
    on the real positions' logits."""
    batch = _batch()
    supervised = batch["labels"][:, 1:] != IGNORE
    for name in ("prefix_tuning", "p_tuning"):
        model, *_ = trained(name)
        total, count = masked_loss_sum(model, [batch])
        assert count == int(supervised.sum()) == 2 * 8
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        length = batch["input_ids"].shape[1]
        assert logits.shape[1] == length + (3 if name == "p_tuning" else 0)
        by_hand = torch.nn.functional.cross_entropy(logits[:, -length:-1].float().reshape(-1, logits.shape[-1]),
                                                    batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE,
                                                    reduction="sum")
        assert total == pytest.approx(by_hand.item(), rel=1e-5)


def test_pissa_converts_the_final_adapter_to_a_plain_lora(trained):
    import json

    model, method, _, out, _ = trained("lora_pissa")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (8, True)  # 2r, on the untouched base
    assert (out / LORA_INIT_DIR / "adapter_model.safetensors").is_file()
    # a plain PEFT load on a fresh base (no re-initialisation) gives the trained model
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(load_model(MODEL), str(out))
    torch.testing.assert_close(_logits(reloaded), _logits(model), atol=1e-4, rtol=0)


def test_pissa_checkpoint_scores_right_and_does_not_poison_the_cached_base(trained, tmp_path):
    """A checkpoint holds the raw PiSSA adapter (resumable): PEFT re-derives the residual base on load. The
    evaluator's base cache must not hand that rewritten base to the next checkpoint."""
    model, _, _, _, trainer = trained("lora_pissa")
    checkpoint = tmp_path / "checkpoint-2"
    trainer.model.save_pretrained(checkpoint)  # what the Trainer writes at a save step
    cache = ModelCache()
    loaded, _, kind = cache.load(str(checkpoint), MODEL)
    assert kind == "adapter"
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-4, rtol=0)
    cache.release(loaded)
    base, _, _ = cache.load(MODEL, MODEL)
    torch.testing.assert_close(_logits(base), _logits(load_model(MODEL)), atol=0, rtol=0)


def test_loraplus_trains_b_at_ratio_times_the_learning_rate(trained):
    _, _, _, _, trainer = trained("loraplus")
    rates = {}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            rates[names[id(p)]] = group["lr"]
    assert {lr for n, lr in rates.items() if "lora_A" in n} == {1e-2}
    assert [round(lr, 9) for lr in {lr for n, lr in rates.items() if "lora_B" in n}] == [0.16]


def test_loraplus_resume_continues_exactly(tmp_path):
    """The LoRA+ optimizer is rebuilt by the Trainer before a checkpoint's state loads into it: a run resumed
    from step 2 of 4 ends with the weights of an uninterrupted one."""
    method = MethodArguments(finetuning_type="lora", lora_rank=4, loraplus_lr_ratio=4.0)

    def run(output_dir, resume=None):
        args = _args(output_dir, max_steps=4, save_strategy="steps", save_steps=2)
        torch.manual_seed(0)
        model = prepare_model(load_model(MODEL), method, args)
        _trainer(model, method, args).train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    uninterrupted = run(tmp_path / "a")
    resumed = run(tmp_path / "a", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert uninterrupted.keys() == resumed.keys()
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-6, rtol=0)


def test_modules_to_save_keeps_tied_embeddings_tied(trained):
    model, *_ = trained("lora_modules_to_save")
    base = model.get_base_model()
    assert base.get_input_embeddings().weight.data_ptr() == base.get_output_embeddings().weight.data_ptr()
    assert count_parameters(model)[0] == 151936 * 64 + 2 * (4 * 64 * 2 + 4 * 64 + 4 * 32)  # embed + q,v LoRA


def test_ia3_targets_keys_values_and_down_proj_input(trained):
    model, *_ = trained("ia3")
    names = sorted({n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad})
    assert names == ["down_proj", "q_proj", "v_proj"]  # PEFT's qwen2 list; llama: k_proj, v_proj, down_proj
    assert model.peft_config["default"].feedforward_modules == {"down_proj"}


def test_modules_to_save_typo_is_a_clear_error(tmp_path):
    method = MethodArguments(finetuning_type="lora", lora_modules_to_save="embed_token")
    with pytest.raises(ValueError, match=r"--lora_modules_to_save 'embed_token': no module named embed_token.*"
                                         r"embed_tokens"):
        prepare_model(load_model(MODEL), method, _args(tmp_path))


@pytest.mark.parametrize("argv, message", [
    (["--finetuning_type", "prefix_tuning", "--packing", "true"],
     r"--packing with --finetuning_type prefix_tuning: the virtual tokens .*use --packing false"),
    (["--finetuning_type", "p_tuning", "--packing", "true"], r"--packing with --finetuning_type p_tuning"),
    (["--finetuning_type", "ia3", "--lora_init", "pissa"],
     r"--lora_init only apply to --finetuning_type lora, dora, qlora, not ia3: it has no LoRA adapter"),
    (["--finetuning_type", "full", "--loraplus_lr_ratio", "16"],
     r"--loraplus_lr_ratio only apply to --finetuning_type lora, dora, qlora, not full"),
    (["--finetuning_type", "full_then_lora", "--lora_modules_to_save", "lm_head"],
     r"not full_then_lora: its LoRA phase starts mid-run"),
    (["--finetuning_type", "dora", "--lora_init", "olora"], r"--lora_init olora with --finetuning_type dora: .*plain LoRA only"),
    (["--finetuning_type", "lora", "--lora_init", "svd"], r"--lora_init 'svd': expected one of default, gaussian"),
    (["--finetuning_type", "lora", "--loraplus_lr_ratio", "0"], r"--loraplus_lr_ratio 0.0: must be > 0"),
    (["--finetuning_type", "prefix_tuning", "--gradient_checkpointing", "true"],
     r"prefix_tuning with --gradient_checkpointing: PEFT refuses prefix tuning under gradient checkpointing"),
    (["--finetuning_type", "p_tuning", "--save_merged", "true"],
     r"--save_merged only applies to LoRA-family methods and ia3 .* not --finetuning_type p_tuning: its virtual tokens"),
    (["--finetuning_type", "prefix_tuning", "--num_virtual_tokens", "0"], r"--num_virtual_tokens 0: must be >= 1"),
])
def test_combinations_that_cannot_work_fail_before_the_model_loads(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv + ["--model", "no-such-model-is-loaded"])
