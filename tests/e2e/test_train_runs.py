"""End-to-end training through hf_sft.py in subprocesses: exact resume after SIGKILL, 2-process sharding."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.toy_data import write_toy_conversations

REPO = Path(__file__).resolve().parents[2]


def _write_data(path: Path, n: int) -> Path:
    return write_toy_conversations(path, n, ["alpha", "beta", "gamma", "delta", "你好", "世界", "one", "two"])


def _train(args: list[str], launcher: list[str] | None = None, script: list[str] = ("hf_sft.py",)):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = (launcher or [sys.executable]) + [*script, "--model", "tiny-qwen2", "--report_to", "none",
                                            "--max_length", "96", "--learning_rate", "1e-3", "--warmup_steps", "0",
                                            "--log_sample_ids", "true", "--precision", "fp32"] + args
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _per_step(output_dir: Path) -> tuple[dict, dict]:
    losses = {}
    for line in (output_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]
    ids = {}
    for line in (output_dir / "sample_ids-rank0.jsonl").read_text().splitlines():
        rec = json.loads(line)
        ids[rec["step"]] = rec["ids"]
    return losses, ids


def test_resume_after_sigkill_continues_exactly(tmp_path):
    """The killed and resumed run reads 3 batches ahead on a thread (--prefetch_batches 3), the straight one in
    the loop: the checkpoint's data position and every step's samples must not depend on it."""
    data = tmp_path / "train.jsonl"
    _write_data(data, 60)
    common = ["--data", str(data), "--max_steps", "6", "--save_steps", "3", "--per_device_train_batch_size", "2",
              "--gradient_accumulation_steps", "2", "--shuffle_buffer", "10"]

    straight = _train(common + ["--output_dir", str(tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr[-3000:]

    prefetch = ["--prefetch_batches", "3"]
    killed = _train(common + prefetch + ["--output_dir", str(tmp_path / "resumed")],
                    script=[str(Path(__file__).with_name("fault_launcher.py")), "--kill_after_save", "3"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (tmp_path / "resumed" / "checkpoint-3" / "COMPLETE").exists()
    assert not (tmp_path / "resumed" / "checkpoint-6").exists()

    resumed = _train(common + prefetch + ["--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    losses_a, ids_a = _per_step(tmp_path / "straight")
    losses_b, ids_b = _per_step(tmp_path / "resumed")
    assert sorted(losses_a) == sorted(losses_b) == [1, 2, 3, 4, 5, 6]
    assert ids_b == ids_a  # the same samples in the same order, step by step
    # Default balanced batches: each shuffle cycle (10 records -> 5 micro-batches, whatever their sizes)
    # holds every record once, so steps 1-5 (10 micro-batches) are exactly the first 20 records.
    first_cycles = [i for step in range(1, 6) for i in ids_a[step]]
    assert sorted(first_cycles) == sorted(f"train.jsonl:{i}" for i in range(1, 21))
    for step in range(1, 7):
        assert losses_b[step] == pytest.approx(losses_a[step], rel=1e-4, abs=1e-4), step
    state = json.loads((tmp_path / "resumed" / "checkpoint-3" / "data_state.json").read_text())
    assert state["batches"] == 6  # 3 steps x 2 accumulation micro-batches consumed
    unprefetched = json.loads((tmp_path / "straight" / "checkpoint-3" / "data_state.json").read_text())
    position = ("cycle", "cycle_state", "cycle_start", "offset", "batches")
    assert {k: state[k] for k in position} == {k: unprefetched[k] for k in position}
    logs = [json.loads(line) for line in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()]
    shares = [rec["data_wait_share"] for rec in logs if "loss" in rec]
    assert shares and all(0.0 <= share <= 1.0 for share in shares)


def test_packing_trains_exactly_like_unsorted_padded_batches(tmp_path):
    """--packing changes how a step is computed, not what it learns: same samples, same losses."""
    data = tmp_path / "train.jsonl"
    _write_data(data, 40)
    common = ["--data", str(data), "--max_steps", "4", "--save_steps", "100", "--per_device_train_batch_size", "4",
              "--gradient_accumulation_steps", "1", "--shuffle_buffer", "20", "--logging_steps", "1"]
    runs = {}
    for name, flags in (("padded", ["--group_by_length", "false"]), ("packed", ["--packing", "true"])):
        result = _train(common + flags + ["--output_dir", str(tmp_path / name)])
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = _per_step(tmp_path / name)
        # The isolation check ran at train begin, on the training device, only for the packed run.
        assert ("Packing isolation checked on cpu" in result.stderr) == (name == "packed"), result.stderr[-3000:]
    (losses_padded, ids_padded), (losses_packed, ids_packed) = runs["padded"], runs["packed"]
    assert ids_packed == ids_padded and all(len(ids) == 4 for ids in ids_packed.values())
    assert sorted(losses_packed) == [1, 2, 3, 4]
    for step in losses_padded:
        assert losses_packed[step] == pytest.approx(losses_padded[step], rel=1e-4, abs=1e-5), step
    def padding(name):
        logs = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        return {rec["step"]: rec["padding_fraction"] for rec in logs if "padding_fraction" in rec}

    # Rows as long as the batch's longest sample, one sample per row at worst: never more padding.
    packed, padded = padding("packed"), padding("padded")
    assert sorted(packed) == [1, 2, 3, 4] and all(packed[step] <= padded[step] for step in packed)


def test_two_processes_read_every_sample_exactly_once(tmp_path):
    data = tmp_path / "train.jsonl"
    _write_data(data, 24)
    # 24 records / (2 per device x 2 processes) = 6 steps = one epoch
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", "29517"]
    result = _train(["--data", str(data), "--max_steps", "6", "--save_steps", "6", "--per_device_train_batch_size",
                     "2", "--gradient_accumulation_steps", "1", "--shuffle_buffer", "4",
                     "--output_dir", str(tmp_path / "ddp")], launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = []
    for rank in (0, 1):
        lines = (tmp_path / "ddp" / f"sample_ids-rank{rank}.jsonl").read_text().splitlines()
        rank_ids = [i for line in lines for i in json.loads(line)["ids"]]
        assert len(rank_ids) == 12
        seen += rank_ids
    assert sorted(seen) == sorted(f"train.jsonl:{i}" for i in range(1, 25))
    checkpoint = tmp_path / "ddp" / "checkpoint-6"
    assert (checkpoint / "data_state-rank0.json").exists() and (checkpoint / "data_state-rank1.json").exists()


def test_full_then_lora_killed_after_its_last_checkpoint_resumes_to_the_final_model_without_an_extra_step(tmp_path):
    """SIGKILL after checkpoint-4 of 4 (before the final model): the resume loads that LoRA checkpoint as the
    final model; the Trainer would otherwise train a step 5 past --max_steps."""
    data = tmp_path / "train.jsonl"
    _write_data(data, 40)
    args = ["--data", str(data), "--finetuning_type", "full_then_lora", "--full_ratio", "0.5", "--max_steps", "4",
            "--save_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--output_dir", str(tmp_path / "run")]
    killed = _train(args, script=[str(Path(__file__).with_name("fault_launcher.py")), "--kill_after_save", "4"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "checkpoint-4" / "COMPLETE").exists() and not (run / "adapter_model.safetensors").exists()
    resumed = _train(args + ["--resume_from_checkpoint", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "is at --max_steps 4 already: nothing left to train" in resumed.stderr
    assert not (run / "checkpoint-5").exists()
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]
    from safetensors.torch import load_file

    final = load_file(run / "adapter_model.safetensors")
    last = load_file(run / "checkpoint-4" / "adapter_model.safetensors")
    assert final.keys() == last.keys() and all((final[k] == last[k]).all() for k in final)
