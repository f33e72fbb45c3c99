"""Each method trains a few steps on tiny-qwen2 and changes exactly the parameters it should."""
from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

os.environ.setdefault("SFT_CACHE_DIR", "/tmp/sftcache")

import pytest
import torch
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from sft.config import MethodArguments, ModelArguments
from sft.models import load_model, load_tokenizer
from sft.train.banner import dtype_line
from sft.train.hybrid import FULL_PHASE_DIR, run_full_then_lora, switch_step
from sft.train.methods import (
    FULL_METHODS,
    count_parameters,
    load_dtype,
    load_model_for_method,
    parameter_dtypes,
    parse_lora_target,
    prepare_model,
    save_final,
)

MODEL = "tiny-qwen2"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL)  # a few seconds each time: load once


def _dataset(n: int = 8, length: int = 12) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 1000, (length,), generator=generator)
        rows.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    return rows


def _args(output_dir, max_steps: int = 3, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-2,
        lr_scheduler_type="linear", weight_decay=0.0, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, remove_unused_columns=False, seed=0, disable_tqdm=True,
    )
    values.update(overrides)
    return TrainingArguments(**values)


class _MarkSaved(TrainerCallback):
    """Stands in for the project's on_save callbacks (data position, COMPLETE marker)."""

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        with open(os.path.join(folder, "SAVED"), "w") as f:
            f.write(str(state.global_step))


def make_trainer(model, training_args) -> Trainer:
    return Trainer(model=model, args=training_args, train_dataset=_dataset(), callbacks=[_MarkSaved()])


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _changed(before: dict[str, torch.Tensor], model) -> set[str]:
    after = dict(model.named_parameters())
    return {name for name, value in before.items() if not torch.equal(value, after[name].detach())}


def _train(kind: str, tmp_path, **method_overrides):
    method = MethodArguments(finetuning_type=kind, lora_rank=4, **method_overrides)
    args = _args(tmp_path / "run", max_steps=2)  # LoRA A only moves once B is non-zero: step 2
    model = prepare_model(load_model_for_method(ModelArguments(model=MODEL), method, args), method, args)
    before = _snapshot(model)
    make_trainer(model, args).train()
    return model, method, before


def _logits(model, ids=((1, 2, 3, 4, 5, 6),)) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits


def test_full_trains_every_parameter_and_saves_full_weights(tmp_path, tokenizer):
    model, method, before = _train("full", tmp_path)
    assert len(before) == 26  # embed (tied head) + 2 layers x 12 (q,k,v with bias) + final norm
    assert _changed(before, model) == set(before)
    out = save_final(model, tokenizer, tmp_path / "final", method)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(str(out))), _logits(model))


def test_freeze_trains_only_the_last_layers(tmp_path):
    model, _, before = _train("freeze", tmp_path, freeze_trainable_layers=1)
    changed = _changed(before, model)
    assert changed == {n for n in before if n.startswith("model.layers.1.")}
    assert len(changed) == 12
    trainable, _ = count_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.1."))


def test_freeze_with_embeddings(tmp_path):
    model, _, before = _train("freeze", tmp_path, freeze_trainable_layers=1, freeze_train_embeddings=True)
    changed = _changed(before, model)
    assert changed == {n for n in before if n.startswith("model.layers.1.")} | {"model.embed_tokens.weight"}


def test_freeze_rejects_more_layers_than_the_model_has(tmp_path):
    method = MethodArguments(finetuning_type="freeze", freeze_trainable_layers=3)
    with pytest.raises(ValueError, match=r"--freeze_trainable_layers 3: this model has 2 layers"):
        prepare_model(load_model(MODEL), method, _args(tmp_path))


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_lora_and_dora_train_only_adapter_weights_and_save(kind, tmp_path, tokenizer):
    model, method, before = _train(kind, tmp_path, save_merged=True)
    changed = _changed(before, model)
    lora = {n for n in before if "lora_A" in n or "lora_B" in n}
    magnitude = {n for n in before if "lora_magnitude_vector" in n}
    # all-linear: q,k,v,o,gate,up,down in 2 layers, A and B each; never the tied lm_head.
    assert len(lora) == 2 * 7 * 2
    assert len(magnitude) == (2 * 7 if kind == "dora" else 0)
    assert changed == lora | magnitude
    assert not any("lm_head" in n for n in lora)

    out = save_final(model, tokenizer, tmp_path / "final", method)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= set(os.listdir(out))
    expected = _logits(model)
    reloaded = PeftModel.from_pretrained(load_model(MODEL), str(out))
    assert torch.equal(_logits(reloaded), expected)

    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), expected, atol=1e-4, rtol=0)
    assert (out / "merged" / "chat_template.jinja").read_text() == tokenizer.chat_template


def test_lora_options_reach_peft(tmp_path):
    method = MethodArguments(finetuning_type="lora", lora_rank=4, lora_target="q_proj,v_proj", use_rslora=True)
    model = prepare_model(load_model(MODEL), method, _args(tmp_path))
    config = model.peft_config["default"]
    assert sorted(config.target_modules) == ["q_proj", "v_proj"]
    assert (config.r, config.lora_alpha, config.use_rslora) == (4, 8, True)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 8 / 2.0  # alpha/sqrt(r)


def test_lora_target_typo_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no module named q_prj in this model. Its linear layers are: .*q_proj"):
        parse_lora_target("q_prj,v_proj", load_model(MODEL))


def test_prompt_tuning_trains_only_the_prompt(tmp_path):
    model, method, before = _train("prompt_tuning", tmp_path, num_virtual_tokens=4)
    assert _changed(before, model) == {"prompt_encoder.default.embedding.weight"}
    assert count_parameters(model)[0] == 4 * 64
    out = save_final(model, None, tmp_path / "final", method)
    reloaded = PeftModel.from_pretrained(load_model(MODEL), str(out))
    assert torch.equal(_logits(reloaded), _logits(model))


def test_save_merged_rejected_for_non_lora_methods(tmp_path):
    method = MethodArguments(finetuning_type="prompt_tuning", save_merged=True)
    with pytest.raises(ValueError, match="its virtual tokens are inputs, not weights of the model"):
        prepare_model(load_model(MODEL), method, _args(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_qlora_on_cpu_says_it_needs_a_gpu(tmp_path):
    method = MethodArguments(finetuning_type="qlora")
    with pytest.raises(ValueError, match=r"qlora needs a CUDA GPU.*use --finetuning_type lora"):
        load_model_for_method(ModelArguments(model=MODEL), method, _args(tmp_path))


# ------------------------------------------------------------------------------- full_then_lora


def test_switch_step():
    assert switch_step(0.2, 60) == 12
    assert switch_step(0.4, 5) == 2
    with pytest.raises(ValueError, match="both phases need at least one"):
        switch_step(0.2, 2)


def _hybrid_run(output_dir, tokenizer, resume=None, switched: list | None = None, load_finished=None):
    method = MethodArguments(finetuning_type="full_then_lora", full_ratio=0.4, lora_rank=4)
    args = _args(output_dir, max_steps=5, save_strategy="steps", save_steps=1)
    model = prepare_model(load_model(MODEL), method, args)
    hook = switched.append if switched is not None else None
    return run_full_then_lora(make_trainer, model, tokenizer, method, args, resume, finish_checkpoint=_mark_switch,
                              before_lora_phase=hook, load_finished=load_finished)


def _mark_switch(folder, step):
    """The run's finish_checkpoint for checkpoint-X: what _MarkSaved does for every other checkpoint."""
    (folder / "SAVED").write_text(str(step))


def _state(checkpoint) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory, tokenizer):
    output_dir = tmp_path_factory.mktemp("hybrid") / "run"
    switched: list[str] = []
    model = _hybrid_run(output_dir, tokenizer, switched=switched)
    return output_dir, model, switched


def test_full_then_lora_phases(hybrid_run):
    output_dir, model, _ = hybrid_run
    initial = dict(load_model(MODEL).named_parameters())
    switched = dict(load_model(str(output_dir / FULL_PHASE_DIR)).named_parameters())
    # Phase 1 (steps 1-2) changed every weight of the model.
    assert all(not torch.equal(initial[n], switched[n]) for n in initial)
    # Phase 2 (steps 3-5) left the switch weights alone and trained only the adapter.
    final = dict(model.named_parameters())
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in final.items() if "lora_" not in n}
    assert set(base) == set(switched)
    assert all(torch.equal(switched[n], base[n]) for n in switched)
    assert all(p.requires_grad == ("lora_" in n) for n, p in final.items())
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in final.items() if "lora_B" in n)
    adapter = json.loads((output_dir / "checkpoint-5" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((output_dir / FULL_PHASE_DIR).resolve())


def test_full_then_lora_is_one_schedule(hybrid_run):
    output_dir, _, switched = hybrid_run
    names = sorted(p.name for p in output_dir.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4", "checkpoint-5"]
    assert (output_dir / "checkpoint-1" / "model.safetensors").is_file()  # phase 1: full weights
    assert all((output_dir / n / "adapter_model.safetensors").is_file() for n in names[1:])
    # The switch checkpoint was finished by the run's finish_checkpoint, the others by on_save, each once.
    assert [(output_dir / n / "SAVED").read_text() for n in names] == ["1", "2", "3", "4", "5"]
    assert switched == [str(output_dir / "checkpoint-2")]
    state = _state(output_dir / "checkpoint-5")
    assert state["global_step"] == 5 and state["max_steps"] == 5
    steps = [e for e in state["log_history"] if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5]
    # One linear decay over 5 steps from 1e-2, across the switch after step 2.
    assert [round(e["learning_rate"], 6) for e in steps] == [0.01, 0.008, 0.006, 0.004, 0.002]


def test_full_then_lora_resumes_from_a_lora_checkpoint(hybrid_run, tmp_path, tokenizer):
    import shutil

    output_dir, model, _ = hybrid_run
    copy = tmp_path / "run"
    shutil.copytree(output_dir, copy)
    for name in ("checkpoint-4", "checkpoint-5"):
        shutil.rmtree(copy / name)
    switched: list[str] = []
    resumed = _hybrid_run(copy, tokenizer, resume=str(copy / "checkpoint-3"), switched=switched)
    assert switched == []  # resumed inside phase 2: no switch happens
    state = _state(copy / "checkpoint-5")
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4, 5]
    uninterrupted = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for name, value in resumed.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(value, uninterrupted[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(resumed), _logits(model), atol=1e-5, rtol=0)


def test_full_then_lora_resumed_at_max_steps_trains_no_extra_step(hybrid_run, tmp_path, tokenizer):
    """A run killed after its last checkpoint, before the final model: resuming checkpoint-5 of 5 loads it as
    the final model (sft.train.run._load_finished) instead of training a step 6."""
    import shutil

    from sft.train.run import _load_finished

    output_dir, model, _ = hybrid_run
    copy = tmp_path / "run"
    shutil.copytree(output_dir, copy)
    before = _state(copy / "checkpoint-5")
    switched: list[str] = []
    resumed = _hybrid_run(copy, tokenizer, resume=str(copy / "checkpoint-5"), switched=switched,
                          load_finished=_load_finished)
    assert switched == [] and not (copy / "checkpoint-6").exists()
    assert _state(copy / "checkpoint-5") == before  # not trained, not saved again
    uninterrupted = {n: p for n, p in model.named_parameters() if "lora_" in n}
    lora = {n: p for n, p in resumed.named_parameters() if "lora_" in n}
    assert lora.keys() == uninterrupted.keys()
    for name, value in lora.items():
        torch.testing.assert_close(value, uninterrupted[name], atol=0, rtol=0)


def test_full_then_lora_resumes_from_a_full_phase_checkpoint(hybrid_run, tmp_path, tokenizer):
    import shutil

    output_dir, model, _ = hybrid_run
    copy = tmp_path / "run"
    shutil.copytree(output_dir / "checkpoint-1", copy / "checkpoint-1")
    switched: list[str] = []
    resumed = _hybrid_run(copy, tokenizer, resume=str(copy / "checkpoint-1"), switched=switched)
    assert switched == [str(copy / "checkpoint-2")]
    assert [e["step"] for e in _state(copy / "checkpoint-5")["log_history"] if "loss" in e] == [1, 2, 3, 4, 5]
    torch.testing.assert_close(_logits(resumed), _logits(model), atol=1e-5, rtol=0)


class _StopAt(TrainerCallback):
    """Like a SIGTERM handler: stop with a save at one step."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = control.should_save = True


def test_full_then_lora_stop_at_the_switch_step_leaves_a_lora_start(tmp_path, tokenizer):
    from peft import PeftModel as _PeftModel

    method = MethodArguments(finetuning_type="full_then_lora", full_ratio=0.4, lora_rank=4)
    args = _args(tmp_path / "run", max_steps=5, save_strategy="steps", save_steps=1)
    model = prepare_model(load_model(MODEL), method, args)

    def stopping_trainer(model_, args_):
        trainer = make_trainer(model_, args_)
        trainer.add_callback(_StopAt(2))
        return trainer

    switched: list[str] = []
    result = run_full_then_lora(stopping_trainer, model, tokenizer, method, args, finish_checkpoint=_mark_switch,
                                before_lora_phase=switched.append)
    assert isinstance(result, _PeftModel) and switched == []
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (tmp_path / "run" / "checkpoint-2" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "checkpoint-2" / "SAVED").read_text() == "2"


# ------------------------------------------------------------------------------ load dtype


METHODS = ["full", "freeze", "lora", "dora", "prompt_tuning", "full_then_lora"]


def _prepared(kind: str, training_args, torch_dtype: str = "auto"):
    method = MethodArguments(finetuning_type=kind, lora_rank=4, num_virtual_tokens=4, freeze_trainable_layers=1)
    model_args = ModelArguments(model=MODEL, torch_dtype=torch_dtype)
    return prepare_model(load_model_for_method(model_args, method, training_args), method, training_args)


def _dtypes(model) -> tuple[set, set]:
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    return frozen, trainable


@pytest.mark.parametrize("kind", METHODS)
def test_frozen_weights_load_in_the_training_precision(kind, tmp_path):
    model = _prepared(kind, _args(tmp_path, bf16=True))
    frozen, trainable = _dtypes(model)
    assert trainable == {torch.float32}  # fp32 adapters / layers / master weights
    assert frozen == (set() if kind in FULL_METHODS else {torch.bfloat16})


def test_fp16_training_keeps_trainable_parameters_fp32(tmp_path):
    # fp16 trainable weights break the GradScaler; only the frozen base may be fp16.
    fp16 = SimpleNamespace(bf16=False, fp16=True)  # TrainingArguments refuses fp16 on this CPU
    assert load_dtype("lora", fp16) == "float16" and load_dtype("full", fp16) == "float32"
    for kind in ("lora", "freeze"):
        assert _dtypes(_prepared(kind, fp16)) == ({torch.float16}, {torch.float32})


def test_torch_dtype_overrides_the_rule(tmp_path):
    args = _args(tmp_path, bf16=True)
    assert _dtypes(_prepared("lora", args, torch_dtype="float32")) == ({torch.float32}, {torch.float32})
    # full with an explicit half dtype: pure bf16 training, every weight in bf16
    assert _dtypes(_prepared("full", args, torch_dtype="bfloat16")) == (set(), {torch.bfloat16})
    # without autocast a LoRA base may still be bf16: PEFT casts the adapter input itself
    assert _dtypes(_prepared("lora", _args(tmp_path), torch_dtype="bfloat16")) == ({torch.bfloat16}, {torch.float32})


@pytest.mark.parametrize("kind, dtype, bf16, message", [
    ("full", "float16", True, r"--torch_dtype float16 with --finetuning_type full: .*GradScaler"),
    ("freeze", "bfloat16", False, r"freeze and fp32 precision: .*--precision bf16"),
])
def test_dtype_combinations_that_cannot_train(kind, dtype, bf16, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        _prepared(kind, _args(tmp_path, bf16=bf16), torch_dtype=dtype)


@pytest.mark.parametrize("kind, expected", [
    ("lora", "  dtypes     frozen bfloat16, trainable float32, compute bf16 autocast"),
    ("full", "  dtypes     frozen none, trainable float32, compute bf16 autocast (fp32 master weights)"),
])
def test_banner_states_the_dtypes(kind, expected, tmp_path):
    line = dtype_line(parameter_dtypes(_prepared(kind, _args(tmp_path, bf16=True))), "bf16", kind in FULL_METHODS)
    assert line == expected
    assert dtype_line({"frozen": ["float32"], "trainable": ["float32"]}, "fp32", False).endswith(
        "compute the weights' dtype (no autocast)")


@pytest.mark.parametrize("kind", ["lora", "dora", "freeze", "prompt_tuning"])
def test_a_few_steps_train_with_bf16_frozen_weights(kind, tmp_path):
    args = _args(tmp_path / "run", max_steps=2, bf16=True)
    model = _prepared(kind, args)
    before = _snapshot(model)
    trainer = make_trainer(model, args)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    changed = _changed(before, model)
    assert changed and changed <= trainable
    if kind not in ("lora", "dora"):  # LoRA A only moves once B is non-zero, so one A may stay put
        assert changed == trainable
    assert _dtypes(model) == ({torch.bfloat16}, {torch.float32})  # the optimizer kept them apart


def test_setup_prints_nothing_the_banner_already_says(tmp_path, capsys):
    """The trainable-parameter count is the start banner's: setting a method up prints no second copy."""
    method = MethodArguments(finetuning_type="lora", lora_rank=4)
    prepare_model(load_model(MODEL), method, _args(tmp_path))
    assert "trainable parameters" not in capsys.readouterr().out
