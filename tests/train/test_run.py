"""sft.train.run.finish: the outcome the callbacks set decides the final save and run_end.json."""
from types import SimpleNamespace

import pytest

from sft.train import run as run_module
from sft.train.callbacks import RunOutcome, TrainingStoppedError
from sft.train.checkpoints import Outcome, read_run_end


def stub_run(tmp_path, outcome: Outcome, message: str = ""):
    result = RunOutcome()
    if outcome is not Outcome.FINISHED:
        result.set(outcome, message)
    return SimpleNamespace(
        outcome=result, main_process=True, args=SimpleNamespace(output_dir=str(tmp_path)), tokenizer=None,
        config=SimpleNamespace(method=None), trainers=[SimpleNamespace(state=SimpleNamespace(global_step=3))],
        stream=SimpleNamespace(counters={"read": 6}, encode_stats=SimpleNamespace(summary=lambda: "")))


@pytest.mark.parametrize("outcome, status, saved", [
    (Outcome.FINISHED, "finished", True),
    (Outcome.EARLY_STOPPED, "finished", True),
    (Outcome.SIGNALLED, "stopped", False),
])
def test_outcome_decides_the_final_save_and_run_end(tmp_path, monkeypatch, outcome, status, saved):
    saves = []
    monkeypatch.setattr(run_module, "save_final", lambda model, tokenizer, out, method, trainer=None: saves.append(out))
    message = "" if outcome is Outcome.FINISHED else f"{outcome.value} at step 3"
    run_module.finish(stub_run(tmp_path, outcome, message), model=object())
    end = read_run_end(tmp_path)
    assert (end["status"], end["outcome"], end["message"], end["global_step"]) == (status, outcome.value, message, 3)
    assert end["final_model"] == (str(tmp_path) if saved else None)
    assert saves == ([str(tmp_path)] if saved else [])


def test_nonfinite_raises_with_the_callbacks_message_and_saves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "save_final", lambda *a, **k: pytest.fail("a NaN run must not save a final model"))
    with pytest.raises(TrainingStoppedError, match="loss became nan at step 2"):
        run_module.finish(stub_run(tmp_path, Outcome.NONFINITE, "loss became nan at step 2; ..."), model=object())


def test_a_fault_wins_over_an_earlier_stop():
    outcome = RunOutcome()
    outcome.set(Outcome.SIGNALLED, "SIGTERM")
    outcome.set(Outcome.EARLY_STOPPED, "later")
    assert outcome.outcome is Outcome.SIGNALLED
    outcome.set(Outcome.NONFINITE, "nan")
    assert (outcome.outcome, outcome.message) == (Outcome.NONFINITE, "nan")


def test_a_failing_final_save_writes_run_end_failed(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    config = SimpleNamespace(training=SimpleNamespace(use_cpu=True, seed=0), data=SimpleNamespace(preview=0),
                             model=SimpleNamespace(tokenizer=None, model="tiny-qwen2", trust_remote_code=False))
    stub = stub_run(tmp_path, Outcome.FINISHED)
    stub.model, stub.max_steps, stub.args.world_size = None, 3, 1
    monkeypatch.setattr(run_module, "load_tokenizer", lambda *a: None)
    monkeypatch.setattr(run_module, "setup", lambda *a: stub)
    monkeypatch.setattr(run_module, "count_parameters", lambda model: (1, 1))
    monkeypatch.setattr(run_module, "start_banner", lambda *a, **k: "banner")
    monkeypatch.setattr(run_module, "fit", lambda run: object())
    monkeypatch.setattr(run_module, "save_final", full_disk)
    with pytest.raises(OSError, match="No space"):
        run_module.run_training(config)
    end = read_run_end(tmp_path)
    assert (end["status"], end["outcome"], end["final_model"]) == ("failed", "failed", None)
    assert end["message"] == "OSError: No space left on device"
