"""Checkpoint markers, fault handling, logs and the banner, on a real HF Trainer with tiny-qwen2 on CPU."""
import json
import os
import re
import signal
from types import SimpleNamespace

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from sft.train.banner import start_banner
from sft.train.callbacks import GracefulStopCallback, RunOutcome, attach_callbacks
from sft.train.checkpoints import (
    COMPLETE_MARKER,
    Outcome,
    checkpoint_args_overrides,
    complete_checkpoints,
    is_complete_checkpoint,
    latest_complete_checkpoint,
    read_data_state,
)
from sft.train.collator import BatchStats
from sft.train.plots import loss_series, plot_losses, read_train_log

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEQ, PADDED_TO, PROMPT = 8, 10, 3  # every row: 8 real tokens (3 prompt + 5 trained) + 2 pads


def fresh_model():
    from sft.models import load_model

    torch.manual_seed(0)
    return load_model("tiny-qwen2")


def random_rows(n, seed=0, length=SEQ):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(10, 1000, (length,), generator=g).tolist()} for _ in range(n)]


def pad_collate(features):
    """Pad to a fixed width so per-step token counts do not depend on the shuffle order."""
    ids, mask, labels = [], [], []
    for f in features:
        row = f["input_ids"]
        pad = PADDED_TO - len(row)
        ids.append(row + [0] * pad)
        mask.append([1] * len(row) + [0] * pad)
        labels.append([-100] * PROMPT + row[PROMPT:] + [-100] * pad)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def recording_pad_collate(stats):
    """pad_collate that counts training batches in `stats`, as the training collator does."""

    def collate(features):
        batch = pad_collate(features)
        stats.record(batch)
        return batch

    return collate


def make_trainer(out, model, max_steps, stats, data_state_fn=None, eval_rows=None, extra=(), patience=0,
                 tokenizer=None, **overrides):
    settings = dict(output_dir=str(out), use_cpu=True, report_to="none", max_steps=max_steps,
                    per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, save_steps=2,
                    save_only_model=True, disable_tqdm=True, remove_unused_columns=False, seed=0)
    settings.update(overrides)
    trainer = Trainer(model=model, args=TrainingArguments(**settings), train_dataset=random_rows(24),
                      eval_dataset=eval_rows, data_collator=recording_pad_collate(stats),
                      processing_class=tokenizer, callbacks=list(extra))
    outcome = RunOutcome()
    attach_callbacks(trainer, stats, outcome, data_state_fn, early_stopping_patience=patience)
    return trainer, outcome


class AtStep(TrainerCallback):
    """Runs `action(state)` at on_step_begin/on_step_end of a given step (test instrumentation)."""

    def __init__(self, event, global_step, action):
        self.event, self.global_step, self.action = event, global_step, action

    def on_step_begin(self, args, state, control, **kwargs):
        if self.event == "begin" and state.global_step == self.global_step:
            self.action(state)

    def on_step_end(self, args, state, control, **kwargs):
        if self.event == "end" and state.global_step == self.global_step:
            self.action(state)


# ------------------------------------------------------------------------------ unit pieces


def test_batch_stats_is_a_fifo_of_token_counts():
    stats = BatchStats()
    stats.record(pad_collate([{"input_ids": [1, 2, 3, 4, 5, 6, 7, 8]}, {"input_ids": [1, 2, 3, 4]}]))
    stats.record({"input_ids": torch.ones(1, 12, dtype=torch.long),  # packed row: no mask, no pads
                  "labels": torch.tensor([[-100] * 4 + [1] * 8])})
    stats.record(pad_collate([{"input_ids": [1, 2, 3, 4, 5]}]))
    assert stats.pop(2) == {"real_tokens": 24, "supervised_tokens": 14, "padded_tokens": 8, "samples": 0}
    assert stats.pop(1) == {"real_tokens": 5, "supervised_tokens": 2, "padded_tokens": 5, "samples": 0}
    assert stats.pop(1) is None
    stats.paused = True
    stats.record(pad_collate([{"input_ids": [1, 2, 3, 4, 5]}]))
    assert len(stats) == 0


def test_latest_complete_checkpoint_ignores_unfinished_ones(tmp_path):
    for step, complete in ((10, True), (20, True), (30, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / COMPLETE_MARKER).write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / COMPLETE_MARKER).write_text("{}")
    assert complete_checkpoints(tmp_path) == [(5, tmp_path / "checkpoint-5"), (10, tmp_path / "checkpoint-10"),
                                              (20, tmp_path / "checkpoint-20")]  # by step, not by name
    assert latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-20")
    assert not is_complete_checkpoint(tmp_path / "checkpoint-30")
    assert latest_complete_checkpoint(tmp_path / "missing") is None


def test_second_sigint_interrupts_at_once():
    graceful = GracefulStopCallback(RunOutcome())
    before = signal.getsignal(signal.SIGINT)
    graceful.on_train_begin(None, None, None)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert graceful.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        graceful.on_train_end(None, None, None)
    assert signal.getsignal(signal.SIGINT) is before


def test_signal_during_a_save_stops_after_that_checkpoint():
    from transformers import TrainerControl

    outcome = RunOutcome()
    graceful = GracefulStopCallback(outcome)
    graceful.on_train_begin(None, None, None)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        control = TrainerControl()
        graceful.on_save(None, SimpleNamespace(global_step=7), control)
    finally:
        graceful.on_train_end(None, None, None)
    assert (control.should_training_stop, control.should_save, graceful.stopped_step) == (True, False, 7)
    assert outcome.outcome is Outcome.SIGNALLED


def test_plot_losses_standalone(tmp_path):
    log = tmp_path / "train_log.jsonl"
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.7},
             {"step": 2, "loss": 2.4}, {"step": 3, "loss": None}]
    log.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 4, "lo')  # live half line
    records = read_train_log(log)
    assert loss_series(records, "loss") == ([1, 2], [3.0, 2.4])
    assert loss_series(records, "eval_loss") == ([2], [2.7])
    png = plot_losses(log, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == PNG_SIGNATURE


def test_checkpoint_args_overrides_keep_best_without_loading_it(tmp_path):
    assert checkpoint_args_overrides(False) == {"save_strategy": "steps", "metric_for_best_model": None,
                                                "load_best_model_at_end": False}
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, eval_steps=5, save_steps=10,
                             **checkpoint_args_overrides(True))
    assert (args.metric_for_best_model, args.greater_is_better, args.load_best_model_at_end) == ("eval_loss", False, False)


def test_start_banner_lines(tmp_path):
    from sft.config import DataArguments, MethodArguments, ModelArguments, SFTConfig

    training = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4,
                                 gradient_accumulation_steps=2, max_steps=60)
    config = SFTConfig(model=ModelArguments(model="tiny-qwen2"), method=MethodArguments(), training=training,
                       data=DataArguments(data=["a.jsonl", "b.jsonl"], max_length=512))
    text = start_banner(config, trainable_params=1_000, total_params=4_000, world_size=2,
                        data_summary={"samples": 1200, "supervised tokens": 34567})
    assert text.splitlines()[1:] == [
        "  model      tiny-qwen2 (full)",
        "  parameters 1,000 trainable of 4,000 (25.00%)",
        "  batch      4 per device x 2 accumulation x 2 processes = 16 samples per step on average",
        "  tokens     at most 8,192 per step (max_length 512)",
        "  steps      60 (at most 491,520 tokens in all)",
        "  data       a.jsonl, b.jsonl",
        "  counts     samples 1,200, supervised tokens 34,567",
    ]


# ------------------------------------------------------------------------ real Trainer runs


def test_checkpoints_complete_loadable_and_logged(tmp_path, qwen_tokenizer):
    from transformers import AutoModelForCausalLM

    stats = BatchStats()
    trainer, run = make_trainer(tmp_path, fresh_model(), max_steps=2, stats=stats, tokenizer=qwen_tokenizer, save_steps=1,
                                data_state_fn=lambda step: {"samples_consumed": step * 4},
                                gradient_accumulation_steps=2)
    trainer.train()
    for step in (1, 2):
        folder = tmp_path / f"checkpoint-{step}"
        assert json.loads((folder / COMPLETE_MARKER).read_text())["step"] == step
        assert read_data_state(folder) == {"samples_consumed": step * 4}
    (tmp_path / "checkpoint-3").mkdir()  # as a crash mid-save would leave it
    assert latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")

    last = tmp_path / "checkpoint-2"  # loadable on its own: weights, tokenizer + template, state
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == 2
    reloaded = AutoModelForCausalLM.from_pretrained(last)
    assert torch.equal(reloaded.model.norm.weight, trainer.model.model.norm.weight)
    assert (last / "tokenizer.json").is_file()
    assert "<|im_start|>" in (last / "chat_template.jinja").read_text()

    records = read_train_log(tmp_path / "train_log.jsonl")
    train_logs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_logs] == [1, 2]
    for r in train_logs:  # 2 accumulation x 2 rows x (5 trained of 8 real, 2 pads of 10)
        assert {"loss", "learning_rate", "grad_norm", "epoch", "time"} <= set(r)
        assert (r["supervised_tokens"], r["padding_fraction"]) == (20, 0.2)
        assert r["tokens_per_second"] > 0
    assert "train_runtime" in records[-1]
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == PNG_SIGNATURE
    assert list(tmp_path.glob("runs/*/events.out.tfevents.*")), "TensorBoard event file missing"
    assert (run.outcome, run.message) == (Outcome.FINISHED, "")


def test_nan_loss_stops_before_the_update_and_saves_nothing_after(tmp_path):
    model = fresh_model()
    forwards = {"n": 0}

    def nan_on_third_training_forward(module, inputs, output):
        if module.training:
            forwards["n"] += 1
            if forwards["n"] == 3:
                output.loss = output.loss * float("nan")
        return output

    model.register_forward_hook(nan_on_third_training_forward)
    after_step_2 = {}
    snapshot = AtStep("end", 2, lambda state: after_step_2.update(
        {k: v.detach().clone() for k, v in model.state_dict().items()}))
    trainer, run = make_trainer(tmp_path, model, max_steps=6, stats=BatchStats(), extra=[snapshot])
    trainer.train()

    assert trainer.state.global_step == 3
    assert all(torch.equal(after_step_2[k], v) for k, v in model.state_dict().items())
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    assert run.outcome is Outcome.NONFINITE
    good = re.escape(str(tmp_path / "checkpoint-2"))
    assert re.fullmatch(rf"loss became nan at step 3; the last checkpoint with finite, sane weights is {good}; "
                        rf"resume with --resume_from_checkpoint {good} after .*", run.message)


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    terminate = AtStep("begin", 1, lambda state: os.kill(os.getpid(), signal.SIGTERM))  # during step 2
    before = signal.getsignal(signal.SIGTERM)
    trainer, run = make_trainer(tmp_path, fresh_model(), max_steps=6, stats=BatchStats(), extra=[terminate],
                                save_steps=100)
    trainer.train()
    assert trainer.state.global_step == 2
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    assert is_complete_checkpoint(tmp_path / "checkpoint-2")
    assert signal.getsignal(signal.SIGTERM) is before
    assert run.outcome is Outcome.SIGNALLED
    assert run.message == "stopped by SIGTERM at step 2, checkpoint-2 saved; resume with --resume_from_checkpoint auto"


def test_rotation_keeps_best_and_early_stopping_on_rising_eval_loss(tmp_path):
    model = fresh_model()
    clock = {"step": 0}

    def eval_loss_rises_after_step_1(module, inputs, output):
        if not module.training:  # a controlled validation curve: +10 per step after the first
            output.loss = output.loss + 10.0 * (clock["step"] - 1)
        return output

    model.register_forward_hook(eval_loss_rises_after_step_1)
    tick = AtStep("end", None, None)
    tick.on_step_end = lambda args, state, control, **kw: clock.update(step=state.global_step)
    stats = BatchStats()
    eval_rows = random_rows(2, seed=1, length=4)  # different shape: would show up if counted as training
    trainer, run = make_trainer(tmp_path, model, max_steps=8, stats=stats, eval_rows=eval_rows, extra=[tick],
                                patience=2, save_steps=1, eval_steps=1, save_total_limit=2,
                                per_device_eval_batch_size=2, **checkpoint_args_overrides(True))
    trainer.train()

    assert trainer.state.global_step == 3  # evals: 1 best, 2 and 3 worse -> patience 2 reached
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-1")
    assert run.outcome is Outcome.EARLY_STOPPED
    assert run.message.startswith("early stopping at step 3: eval_loss did not improve on ")
    records = read_train_log(tmp_path / "train_log.jsonl")
    assert [r["supervised_tokens"] for r in records if "loss" in r] == [10, 10, 10]
    assert [r["step"] for r in records if "eval_loss" in r] == [1, 2, 3]
