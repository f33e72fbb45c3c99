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
        stream=SimpleNamespace(counters={"read": 6}, encode_stats=SimpleNamespace(summary=lambda: "")),
        train_data=SimpleNamespace(stop=lambda: None))


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

    config = SimpleNamespace(training=SimpleNamespace(use_cpu=True, seed=0, output_dir=str(tmp_path), process_index=0,
                                                      resume_from_checkpoint=None),
                             data=SimpleNamespace(preview=0, overwrite_output_dir=False),
                             model=SimpleNamespace(tokenizer=None, model="tiny-qwen2", trust_remote_code=False),
                             method=SimpleNamespace(finetuning_type="full"))
    stub = stub_run(tmp_path, Outcome.FINISHED)
    stub.model, stub.max_steps, stub.args.world_size, stub.precision = None, 3, 1, "fp32"
    monkeypatch.setattr(run_module, "load_tokenizer", lambda *a: None)
    monkeypatch.setattr(run_module, "setup", lambda *a: stub)
    monkeypatch.setattr(run_module, "count_parameters", lambda model: (1, 1))
    monkeypatch.setattr(run_module, "parameter_dtypes", lambda model: {"frozen": [], "trainable": ["float32"]})
    monkeypatch.setattr(run_module, "start_banner", lambda *a, **k: "banner")
    monkeypatch.setattr(run_module, "fit", lambda run: object())
    monkeypatch.setattr(run_module, "save_final", full_disk)
    with pytest.raises(OSError, match="No space"):
        run_module.run_training(config)
    end = read_run_end(tmp_path)
    assert (end["status"], end["outcome"], end["final_model"]) == ("failed", "failed", None)
    assert end["message"] == "OSError: No space left on device"


# ------------------------------------------------------------------- several GPUs, no launcher


@pytest.fixture
def four_gpus_one_process(monkeypatch):
    """What `python hf_sft.py` sees on a 4-GPU machine: CUDA, 4 devices, no launcher's environment."""
    import torch
    from accelerate.state import AcceleratorState

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)  # no fake CUDA state left for later tests


def test_several_gpus_without_a_launcher_train_on_one_and_name_the_command(four_gpus_one_process, tmp_path,
                                                                           monkeypatch, caplog):
    from transformers.training_args import ParallelMode

    from sft.config import parse_config

    argv = ["hf_sft.py", "--config", "configs/qwen2.5-7b_lora.yaml", "--output_dir", str(tmp_path)]
    monkeypatch.setattr("sys.argv", argv)
    config = parse_config(["--model", "tiny-qwen2", "--output_dir", str(tmp_path), "--report_to", "none"])
    assert config.training.n_gpu == 4  # what the Trainer would wrap in DataParallel, batch size x 4
    with caplog.at_level("WARNING", logger="sft.train.run"):
        args = run_module._trainer_args(config, max_steps=3, precision="fp32", has_eval=False)
    assert (args.n_gpu, args.parallel_mode, args.world_size) == (1, ParallelMode.NOT_PARALLEL, 1)
    assert str(args.device) == "cuda:0"
    # The Trainer's DataLoader batch size (Trainer._train_batch_size = args.train_batch_size): one stream batch.
    assert args.train_batch_size == args.eval_batch_size == 1
    assert ("4 GPUs are visible but hf_sft.py was started as one process, without a launcher: training on GPU 0 "
            "only" in caplog.text)
    assert (f"accelerate launch --num_processes 4 hf_sft.py --config configs/qwen2.5-7b_lora.yaml --output_dir "
            f"{tmp_path}" in caplog.text)


def test_one_gpu_cpu_or_a_launched_process_is_left_alone():
    for n_gpu in (0, 1):  # CPU; one GPU, or one process of `accelerate launch` (always 1 there)
        args = SimpleNamespace(n_gpu=n_gpu, _n_gpu=n_gpu)
        assert run_module.use_one_gpu_without_launcher(args) is False and args._n_gpu == n_gpu


def test_launch_command_outside_the_entry_script():
    assert run_module.launch_command(2, ["pytest", "-q"]) == "accelerate launch --num_processes 2 hf_sft.py ..."
    assert (run_module.launch_command(8, ["/opt/sft/hf_sft.py", "--data", "my file.jsonl"])
            == "accelerate launch --num_processes 8 /opt/sft/hf_sft.py --data 'my file.jsonl'")


def test_the_end_of_a_run_names_the_next_command():
    from sft.train.run import next_command

    assert next_command("outputs/demo").endswith("python hf_sft_eval.py --run outputs/demo")
    assert "--resume_from_checkpoint auto" in next_command("outputs/demo", resume=True)


def test_prefetch_depth_defaults_to_four_on_a_gpu_and_none_on_a_cpu(monkeypatch):
    import torch

    cpu, gpu = SimpleNamespace(use_cpu=True), SimpleNamespace(use_cpu=False)
    assert run_module.prefetch_depth(None, cpu) == 0  # a reader thread would take a core from training
    assert run_module.prefetch_depth(2, cpu) == 2  # --prefetch_batches wins
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert run_module.prefetch_depth(None, gpu) == 4
    assert run_module.prefetch_depth(0, gpu) == 0
