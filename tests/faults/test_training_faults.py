"""Faults of issue 16 in training: each test is named after the numbered item it reproduces.
Kills are simulated by an exception raised at the chosen point (the process state on disk is the same)."""
import pytest
import torch
from transformers import Trainer, TrainingArguments

import sft.train.checkpoints as checkpoints
from sft.train.callbacks import RunOutcome, attach_callbacks
from sft.train.checkpoints import COMPLETE_MARKER, latest_complete_checkpoint, resolve_resume
from sft.train.collator import BatchStats


def _rows(n, length=8):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(10, 1000, (length,), generator=g).tolist()} for _ in range(n)]


def _collate(features):
    ids = torch.tensor([f["input_ids"] for f in features])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _trainer(out, max_steps, **overrides):
    from sft.models import load_model

    torch.manual_seed(0)
    settings = dict(output_dir=str(out), use_cpu=True, report_to="none", max_steps=max_steps,
                    per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, save_steps=1,
                    save_only_model=True, disable_tqdm=True, remove_unused_columns=False, seed=0)
    settings.update(overrides)
    trainer = Trainer(model=load_model("tiny-qwen2"), args=TrainingArguments(**settings), train_dataset=_rows(16),
                      data_collator=_collate)
    attach_callbacks(trainer, BatchStats(), RunOutcome(), tensorboard=False)
    return trainer


class Killed(Exception):
    pass


def test_item4_rotation_waits_for_the_new_checkpoints_complete(tmp_path, monkeypatch):
    real_mark = checkpoints.mark_complete

    def killed_before_second_complete(folder, step):
        if step == 2:
            raise Killed(f"killed before {folder}/COMPLETE")
        real_mark(folder, step)

    monkeypatch.setattr(checkpoints, "mark_complete", killed_before_second_complete)
    with pytest.raises(Killed):
        _trainer(tmp_path, max_steps=3, save_total_limit=1).train()
    assert latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-1")
    assert resolve_resume("auto", tmp_path) == str(tmp_path / "checkpoint-1")


def test_item4_rotation_still_keeps_save_total_limit(tmp_path):
    _trainer(tmp_path, max_steps=3, save_total_limit=1).train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3"]
    assert (tmp_path / "checkpoint-3" / COMPLETE_MARKER).is_file()


def test_item4_auto_with_only_incomplete_checkpoints_is_an_error(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "model.safetensors").write_bytes(b"half")
    with pytest.raises(ValueError, match=r"checkpoint-4.*no COMPLETE marker"):
        resolve_resume("auto", tmp_path)
    assert resolve_resume("auto", tmp_path / "empty") is None  # nothing there: a fresh start


def _config(out, *flags):
    from sft.config import parse_config

    return parse_config(["--model", "tiny-qwen2", "--output_dir", str(out), "--report_to", "none", *flags])


def _old_run(out, *flags):
    from sft.config import write_resolved_config

    write_resolved_config(_config(out, *flags), out)
    (out / "checkpoint-12").mkdir()
    (out / "checkpoint-12" / COMPLETE_MARKER).write_text("{}")
    (out / "run_end.json").write_text("{}")
    (out / "train_log.jsonl").write_text("{}\n")
    (out / "train_rejects-rank0.jsonl").write_text("")
    (out / "notes.txt").write_text("mine")


def test_item5_a_fresh_run_refuses_another_runs_output_dir(tmp_path):
    from sft.train.run import claim_output_dir

    out = tmp_path / "run"
    out.mkdir()
    _old_run(out, "--learning_rate", "0.001")
    with pytest.raises(ValueError, match=r"checkpoint-12.*--resume_from_checkpoint auto.*--overwrite_output_dir"):
        claim_output_dir(_config(out, "--learning_rate", "0.001"))  # same run, not resumed: would mix two runs
    (out / "checkpoint-12" / COMPLETE_MARKER).unlink()
    import shutil
    shutil.rmtree(out / "checkpoint-12")
    with pytest.raises(ValueError, match=r"another run.*learning_rate: 0.001 -> 0.002"):
        claim_output_dir(_config(out, "--learning_rate", "0.002"))
    claim_output_dir(_config(out, "--learning_rate", "0.001", "--max_steps", "99"))  # same run, longer: fine


def test_item5_resume_of_the_same_run_stays_allowed(tmp_path):
    from sft.train.run import claim_output_dir

    out = tmp_path / "run"
    out.mkdir()
    _old_run(out)
    claim_output_dir(_config(out, "--resume_from_checkpoint", "auto"))
    assert (out / "checkpoint-12").is_dir()


def test_item5_overwrite_output_dir_clears_only_the_toolkits_files(tmp_path):
    from sft.train.run import claim_output_dir

    out = tmp_path / "run"
    out.mkdir()
    _old_run(out, "--learning_rate", "0.001")
    claim_output_dir(_config(out, "--learning_rate", "0.002", "--overwrite_output_dir"))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ------------------------------------------------------------------------ item 6: nothing usable, stop signals

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def _long_answers(path, n):
    import json

    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"question {i} " + "word " * 30},
                                                  {"from": "gpt", "value": "answer " * 30}]}) + "\n")


def _hf_sft(out, data, *extra):
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "hf_sft.py", "--model", "tiny-qwen2", "--report_to", "none",
                             "--data", str(data), "--max_length", "16", "--max_steps", "3", "--precision", "fp32",
                             "--output_dir", str(out), *extra], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_item6_every_record_dropped_stops_with_counts_and_the_fix(tmp_path):
    data = tmp_path / "long.jsonl"
    _long_answers(data, 40)
    proc = _hf_sft(tmp_path / "run", data)
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 2, stderr[-2000:]
    assert "no usable sample" in stderr and "dropped=40" in stderr and "--max_length" in stderr, stderr[-2000:]
    rejects = (tmp_path / "run" / "train_rejects-rank0.jsonl").read_text().splitlines()
    assert len(rejects) <= 2 * 40  # at most two passes: the rejects file stays bounded


def test_item6_sigterm_while_the_stream_reads_ends_within_seconds(tmp_path):
    import json
    import signal
    import time

    data = tmp_path / "long.jsonl"
    _long_answers(data, 200_000)  # all dropped: the stream reads for a long time without a step
    out = tmp_path / "run"
    proc = _hf_sft(out, data)
    try:
        rejects = out / "train_rejects-rank0.jsonl"
        deadline = time.time() + 90
        while not rejects.is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)  # the stream is reading (after train begin: the handlers are in place)
        assert rejects.is_file(), proc.communicate(timeout=5)[1][-2000:]
        proc.send_signal(signal.SIGTERM)
        sent = time.time()
        _, stderr = proc.communicate(timeout=30)
        took = time.time() - sent
    finally:
        proc.kill()
    assert took < 10, f"SIGTERM took {took:.0f} s"
    assert proc.returncode == 143, stderr[-2000:]
    assert json.loads((out / "run_end.json").read_text())["status"] == "stopped"


# ------------------------------------------------------------------- item 7: every way training ends writes run_end


def test_item7_sigterm_during_start_up_writes_run_end_stopped(tmp_path, monkeypatch):
    import os
    import signal

    import sft.train.run as run_module
    from sft.train.callbacks import StopSignalled
    from sft.train.checkpoints import read_run_end

    def killed_while_loading(config, tokenizer, extra=()):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before this returns
        raise AssertionError("SIGTERM was not handled during start-up")

    monkeypatch.setattr(run_module, "load_tokenizer", lambda *a: None)
    monkeypatch.setattr(run_module, "setup", killed_while_loading)
    config = _config(tmp_path / "run")
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StopSignalled) as err:
        run_module.run_training(config)
    assert err.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) == previous  # restored
    end = read_run_end(tmp_path / "run")
    assert end is not None and end["status"] == "stopped", end
    assert not list((tmp_path / "run").glob(".*tmp*"))


def test_item7_a_start_up_error_writes_run_end_failed_but_never_into_another_runs_folder(tmp_path, monkeypatch):
    import sft.train.run as run_module
    from sft.train.checkpoints import read_run_end

    def broken_setup(config, tokenizer, extra=()):
        raise FileNotFoundError("model weights missing")

    monkeypatch.setattr(run_module, "load_tokenizer", lambda *a: None)
    monkeypatch.setattr(run_module, "setup", broken_setup)
    with pytest.raises(FileNotFoundError):
        run_module.run_training(_config(tmp_path / "run"))
    assert read_run_end(tmp_path / "run")["status"] == "failed"

    other = tmp_path / "other"
    other.mkdir()
    _old_run(other, "--learning_rate", "0.001")
    (other / "run_end.json").write_text('{"status": "finished"}')
    with pytest.raises(ValueError, match="checkpoint-12"):
        run_module.run_training(_config(other, "--learning_rate", "0.002"))
    assert read_run_end(other) == {"status": "finished"}  # the other run's file is untouched
