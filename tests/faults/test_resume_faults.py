"""Faults of issue 16 around stopping and resuming training (items 7, 11, 12 and the clear errors): each test
reproduces the failure first. Kills are real (a subprocess SIGKILLed or signalled at a chosen point); a full
disk is a write that raises ENOSPC."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sft.train.checkpoints import COMPLETE_MARKER, read_run_end, resolve_resume
from tests.toy_data import write_toy_conversations

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "tests" / "e2e" / "fault_launcher.py"


def _write_data(path: Path, n: int) -> Path:
    return write_toy_conversations(path, n, ["alpha", "beta", "gamma", "delta", "one", "two", "three"],
                                   question=(3, 3, 5), answer=(5, 2, 7))


COMMON = ["--model", "tiny-qwen2", "--report_to", "none", "--max_length", "64", "--learning_rate", "1e-3",
          "--warmup_steps", "0", "--precision", "fp32", "--per_device_train_batch_size", "2",
          "--shuffle_buffer", "100", "--logging_steps", "1", "--log_sample_ids", "true"]


def _cmd(script, *flags):
    return [sys.executable, *script, *COMMON, *flags]


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _run(*flags, script=("hf_sft.py",)):
    """hf_sft.py (or `script`, whose own arguments come first) with COMMON and `flags`."""
    return subprocess.run(_cmd(script, *flags), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


def _config(*flags):
    from sft.config import parse_config

    return parse_config([*COMMON, *flags])


def _log_steps(out: Path, name="train_log.jsonl", key="loss") -> list[int]:
    return [rec["step"] for rec in map(json.loads, (out / name).read_text().splitlines()) if key in rec]


# --------------------------------------------- item 7 + clear errors: a kill during a save, then a resume


def test_kill_during_a_save_then_resume_leaves_no_temp_file_no_double_log_no_double_count(tmp_path):
    data = _write_data(tmp_path / "train.jsonl", 40)  # one shuffle cycle (buffer 100) holds the whole file
    out = tmp_path / "run"
    flags = ["--data", str(data), "--max_steps", "4", "--save_steps", "2", "--output_dir", str(out)]
    killed = _run(*flags, script=(str(LAUNCHER), "--kill_during_save", "4"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert list((out / "checkpoint-4").glob(".tmp*")) and not (out / "checkpoint-4" / COMPLETE_MARKER).exists()
    assert _log_steps(out) == [1, 2, 3]  # step 4 is logged after its save

    resumed = _run(*flags, "--resume_from_checkpoint", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for step in (2, 4):
        folder = out / f"checkpoint-{step}"
        assert (folder / COMPLETE_MARKER).is_file()
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], step  # no temp file inside
    assert not list(out.glob(".*"))  # nor beside (run_end's reserve, atomic temp names)
    assert _log_steps(out) == [1, 2, 3, 4]  # step 3 was trained twice, logged once
    assert _log_steps(out, "sample_ids-rank0.jsonl", "ids") == [1, 2, 3, 4]
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["records"] == 40, summary  # read once by each of the two runs: counted once
    assert read_run_end(out)["status"] == "finished"


# ------------------------------------------------------------------ stop signals: exit 143 / 130, not 0


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_while_training_exits_128_plus_signal_and_says_how_to_resume(tmp_path, signum, code):
    data = _write_data(tmp_path / "train.jsonl", 40)
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(("hf_sft.py",), "--data", str(data), "--max_steps", "100000", "--save_steps",
                                 "100000", "--output_dir", str(out)),
                            cwd=REPO, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        log = out / "train_log.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not (log.is_file() and log.read_text().strip()):
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr[-3000:]
    name = signal.Signals(signum).name
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"hf_sft.py: stopped by {name} at step "), last
    step = int(last.split(" at step ")[1].split(",")[0])
    assert last.endswith(f"checkpoint-{step} saved; resume with --resume_from_checkpoint auto"), last
    assert "Traceback" not in stderr and "Finished" not in stderr
    assert (out / f"checkpoint-{step}" / COMPLETE_MARKER).is_file()
    end = read_run_end(out)
    assert (end["status"], end["global_step"], end["last_checkpoint"]) == ("stopped", step, f"checkpoint-{step}")


# ------------------------------------------------------------------------- item 7: failure at the final save


def test_full_disk_at_the_final_save_still_writes_run_end_and_leaves_no_temp_file(tmp_path, monkeypatch, capsys):
    import sft.train.run as run_module
    from sft.cli import run_entry

    data = _write_data(tmp_path / "train.jsonl", 20)
    out = tmp_path / "run"
    disk = {"full": False}
    real_write_text = Path.write_text

    def write_text(self, *args, **kwargs):  # every new file on this output_dir fails once the disk is full
        if disk["full"] and str(self).startswith(str(out)):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, *args, **kwargs)

    def save_final_on_a_full_disk(model, tokenizer, output_dir, *args, **kwargs):
        disk["full"] = True
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir) / "model.safetensors"))

    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(run_module, "save_final", save_final_on_a_full_disk)
    config = _config("--data", str(data), "--max_steps", "2", "--save_steps", "1", "--output_dir", str(out))
    code = run_entry(lambda argv: run_module.run_training(config), [], "hf_sft.py")
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"hf_sft.py: stopped: no space left on the device writing {out / 'model.safetensors'} (No space left on "
        "device). Free space there (or point --output_dir at a larger disk), then resume with "
        f"--resume_from_checkpoint auto; the last complete checkpoint is {out / 'checkpoint-2'}.")
    end = read_run_end(out)
    assert end is not None, "no run_end.json: a watching evaluator would wait forever"
    assert (end["status"], end["last_checkpoint"], end["global_step"]) == ("failed", "checkpoint-2", 2)
    assert "No space left on device" in end["message"]
    assert not list(out.glob(".*")), list(out.glob(".*"))  # neither the reserve nor a temp file stays


def test_run_end_reserve_is_used_only_when_the_plain_write_fails(tmp_path, monkeypatch):
    import sft.train.checkpoints as checkpoints

    checkpoints.reserve_run_end(tmp_path)
    assert (tmp_path / ".run_end.reserve").stat().st_size == checkpoints.RUN_END_RESERVE_BYTES
    checkpoints.write_run_end(tmp_path, checkpoints.Outcome.FINISHED, "done", global_step=3)
    assert read_run_end(tmp_path)["message"] == "done" and not (tmp_path / ".run_end.reserve").exists()

    checkpoints.reserve_run_end(tmp_path)

    def full(path, value, indent=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoints, "write_json_atomic", full)
    checkpoints.write_run_end(tmp_path, checkpoints.Outcome.FAILED, "x" * 50_000, global_step=4)
    end = read_run_end(tmp_path)
    assert (end["status"], end["global_step"]) == ("failed", 4) and 0 < len(end["message"]) < checkpoints.RUN_END_RESERVE_BYTES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_end.json"]
    with pytest.raises(OSError, match="No space"):  # no reserve: the error is not hidden
        checkpoints.write_run_end(tmp_path, checkpoints.Outcome.FAILED, "again")


# ------------------------------------------------- one small finished run, copied by the tests that damage it


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step tiny-qwen2 run (in-process) with complete checkpoint-1 and checkpoint-2."""
    from sft.train.run import run_training

    root = tmp_path_factory.mktemp("finished")
    data = _write_data(root / "train.jsonl", 40)
    out = root / "run"
    assert run_training(_config("--data", str(data), "--max_steps", "2", "--save_steps", "1",
                                "--output_dir", str(out))) == 0
    return data, out


def _copy_run(finished_run, tmp_path, link=True):
    """The finished run, hard-linked (fast) unless the test trains into it: a test that damages a file of a
    linked copy must replace it, never write into it."""
    import shutil

    data, out = finished_run
    shutil.copy(data, tmp_path / "train.jsonl")
    shutil.copytree(out, tmp_path / "run", copy_function=os.link if link else shutil.copy2)
    return tmp_path / "train.jsonl", tmp_path / "run"


def _own_copy(path: Path) -> Path:
    content = path.read_bytes()
    path.unlink()
    path.write_bytes(content)
    return path


def _setup(tokenizer, *flags):
    import sft.train.run as run_module

    return run_module.setup(_config(*flags), tokenizer)


# ------------------------------------------------------------- item 11: what the data position depends on


def test_item11_resume_with_another_batch_layout_is_refused_naming_the_flag(finished_run, tmp_path, qwen_tokenizer):
    data, out = _copy_run(finished_run, tmp_path)
    for flag, now, saved in [("--per_device_train_batch_size", "4", "2"), ("--gradient_accumulation_steps", "1", "2"),
                             ("--shuffle_buffer", "50", "100"), ("--packing", "true", "false"),
                             ("--max_length", "48", "64"), ("--seed", "7", "42")]:
        with pytest.raises(ValueError, match=rf"checkpoint-2: .*{flag} {saved} \(now {now}\).*"
                                             rf"start a new run with --model .*checkpoint-2") as err:
            _setup(qwen_tokenizer, "--data", str(data), "--max_steps", "4", "--output_dir", str(out),
                   "--resume_from_checkpoint", "auto", flag, now)
        assert f"esume with {flag} {saved}" in str(err.value)


def test_item11_a_changed_data_file_is_reported(finished_run, tmp_path, qwen_tokenizer):
    data, out = _copy_run(finished_run, tmp_path)
    original = data.read_text()
    resume = ["--data", str(data), "--max_steps", "4", "--output_dir", str(out), "--resume_from_checkpoint", "auto"]
    prepended = _write_data(tmp_path / "extra.jsonl", 3).read_text()
    data.write_text(prepended + original)  # lines prepended: every saved byte offset now points elsewhere
    size = len(original.encode())
    with pytest.raises(ValueError, match=rf"data file {data} changed since the checkpoint was written: its size went "
                                         rf"from {size} to {size + len(prepended.encode())} bytes.*Put the file back"):
        _setup(qwen_tokenizer, *resume)
    data.write_text(original.replace("alpha", "ALPHA", 1))  # same size, edited in place
    with pytest.raises(ValueError, match=r"its content changed \(same size"):
        _setup(qwen_tokenizer, *resume)
    data.write_text(original)
    with pytest.raises(ValueError, match=rf"trained on --data \S+train.jsonl, this run has --data {data} {data}"):
        _setup(qwen_tokenizer, *resume[:2], str(data), *resume[2:])


def test_item11_the_same_data_under_another_path_resumes(finished_run, tmp_path):
    from sft.data.sources import parse_sources
    from sft.train.checkpoints import check_resume_data, data_layout
    from sft.train.run import data_layout_flags

    data, out = _copy_run(finished_run, tmp_path)
    moved = data.rename(tmp_path / "moved.jsonl")
    config = _config("--data", str(moved), "--output_dir", str(out))
    check_resume_data(out / "checkpoint-2", data_layout(data_layout_flags(config), parse_sources([str(moved)])))
    saved = json.loads((out / "checkpoint-2" / "data_state.json").read_text())["data_layout"]
    assert saved["flags"]["--shuffle_buffer"] == 100 and saved["sources"][0]["fingerprint"]["size"] > 0


# -------------------------------------------------------- item 12: COMPLETE, but a file is cut short


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt"])
def test_item12_a_truncated_file_in_a_complete_checkpoint(finished_run, tmp_path, caplog, name):
    data, out = _copy_run(finished_run, tmp_path)
    bad = _own_copy(out / "checkpoint-2" / name)
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size // 2)
    assert (out / "checkpoint-2" / COMPLETE_MARKER).is_file()
    with caplog.at_level("WARNING"):
        assert resolve_resume("auto", out) == str(out / "checkpoint-1")
    assert f"checkpoint-2 is marked COMPLETE but {bad}: truncated" in caplog.text
    assert "resuming from the previous complete checkpoint" in caplog.text
    with pytest.raises(ValueError, match=rf"checkpoint-2: the checkpoint is damaged: {bad}: truncated.*'auto'"):
        resolve_resume(str(out / "checkpoint-2"), out)


def test_item12_auto_falls_back_and_the_run_trains_on(finished_run, tmp_path):
    from sft.train.run import run_training

    data, out = _copy_run(finished_run, tmp_path, link=False)
    weights = _own_copy(out / "checkpoint-2" / "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(1000)
    assert run_training(_config("--data", str(data), "--max_steps", "3", "--save_steps", "1", "--output_dir", str(out),
                                "--resume_from_checkpoint", "auto")) == 0
    assert _log_steps(out) == [1, 2, 3]
    assert read_run_end(out)["status"] == "finished" and (out / "checkpoint-2" / COMPLETE_MARKER).is_file()


# --------------------------------------------------------------- clear errors instead of tracebacks


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_malicious_pickle_in_a_checkpoint_is_a_clear_error_naming_the_file(finished_run, tmp_path, capsys):
    import hf_sft

    data, out = _copy_run(finished_run, tmp_path, link=False)
    marker = tmp_path / "pwned"
    (out / "checkpoint-2" / "optimizer.pt").unlink()
    torch.save({"state": _Payload(str(marker))}, out / "checkpoint-2" / "optimizer.pt")
    code = hf_sft.main([*COMMON, "--data", str(data), "--max_steps", "3", "--output_dir", str(out),
                        "--resume_from_checkpoint", str(out / "checkpoint-2")])
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and not marker.exists()  # refused, and nothing in it ran
    assert (f"hf_sft.py: error: --resume_from_checkpoint {out / 'checkpoint-2'}: {out / 'checkpoint-2' / 'optimizer.pt'}"
            " is not a plain tensor file: torch.load(weights_only=True) refused it") in err, err[-1500:]


def test_resuming_another_models_checkpoint_is_a_clear_error(finished_run, tmp_path, capsys):
    import hf_sft

    data, out = _copy_run(finished_run, tmp_path)
    checkpoint = out / "checkpoint-2"
    code = hf_sft.main([*COMMON, "--model", "tiny-llama", "--data", str(data), "--max_steps", "3",
                        "--output_dir", str(tmp_path / "llama"), "--resume_from_checkpoint", str(checkpoint)])
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    assert (f"hf_sft.py: error: --resume_from_checkpoint {checkpoint}: its weights do not fit --model tiny-llama "
            "(its run trained --model tiny-qwen2): size mismatch for") in err


class _Diverge:
    """Blow one weight up at step 2 (checkpoint-2 then holds it), make step 3's loss NaN."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Diverge(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step == 2:
                    with torch.no_grad():
                        model.model.norm.weight.mul_(1e30)

            def on_step_begin(self, args, state, control, model=None, **kwargs):
                if state.global_step == 2:
                    model.register_forward_hook(lambda module, inputs, output: setattr(
                        output, "loss", output.loss * float("nan")) if module.training else None)

        return Diverge()


def test_nan_stop_is_one_line_naming_a_sane_checkpoint_and_logs_nan(tmp_path, capsys):
    import math

    from sft.cli import run_entry
    from sft.train.run import run_training

    data = _write_data(tmp_path / "train.jsonl", 40)
    out = tmp_path / "run"
    config = _config("--data", str(data), "--max_steps", "6", "--save_steps", "1", "--output_dir", str(out),
                     "--logging_steps", "5")
    code = run_entry(lambda argv: run_training(config, extra_callbacks=[_Diverge()]), [], "hf_sft.py")
    err = capsys.readouterr().err
    assert code == 1, err[-3000:]
    assert "Traceback" not in err
    good = out / "checkpoint-1"
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"hf_sft.py: stopped: loss became nan at step 3; the last checkpoint with finite, sane "
                           f"weights is {good} (passed over: checkpoint-2: its largest weight is "), last
    assert last.endswith(f"resume with --resume_from_checkpoint {good} after lowering the learning rate / checking "
                         "the data"), last
    logged = {rec["step"]: rec["loss"] for rec in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
              if "loss" in rec}
    assert sorted(logged) == [3] and math.isnan(logged[3])  # logging_steps 5: the bad step is logged anyway, as NaN
    assert read_run_end(out)["outcome"] == "nonfinite"


def test_stop_signal_handlers_are_restored_when_training_raises(tmp_path, monkeypatch):
    import contextlib

    from transformers import TrainerCallback

    import sft.train.run as run_module

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("crash in step 1")

    monkeypatch.setattr(run_module, "_signals_stop_start_up", contextlib.nullcontext)  # only fit() restores now
    data = _write_data(tmp_path / "train.jsonl", 10)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(RuntimeError, match="crash in step 1"):
        run_module.run_training(_config("--data", str(data), "--max_steps", "2", "--output_dir", str(tmp_path / "r")),
                                extra_callbacks=[Crash()])
    assert {s: signal.getsignal(s) for s in before} == before


def test_resuming_the_checkpoint_at_max_steps_trains_no_extra_step(finished_run, tmp_path):
    """Killed after checkpoint-2 (= --max_steps) but before the final model: found by bench/soak_kill.py."""
    from safetensors.torch import load_file

    from sft.train.run import run_training

    data, out = _copy_run(finished_run, tmp_path, link=False)
    for name in ("run_end.json", "model.safetensors"):
        (out / name).unlink()
    assert run_training(_config("--data", str(data), "--max_steps", "2", "--save_steps", "1", "--output_dir", str(out),
                                "--resume_from_checkpoint", "auto")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert _log_steps(out) == [1, 2]
    final, saved = load_file(out / "model.safetensors"), load_file(out / "checkpoint-2" / "model.safetensors")
    assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in final)
    end = read_run_end(out)
    assert (end["status"], end["global_step"]) == ("finished", 2)
