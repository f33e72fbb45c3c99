"""Several machines, simulated on localhost: two launches of one process each (gloo on CPU) that meet
at --main_process_ip/--main_process_port, as two real machines would. Both share one output_dir, the
layout the toolkit expects (a shared file system); the data of a step must be what one process reads
for the same global batch, and a checkpoint resumes only on the same number of processes.
"""
import json
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from test_train_runs import _train, _write_data

# 24 records, 2 processes x 2 per device: 6 steps = one epoch. --shuffle_buffer 2 (one micro-batch per
# shuffle cycle) without length grouping keeps the samples of a step the same set whatever the process
# count: rank r reads records r mod 2, so step k trains records 4k-3..4k on both layouts.
COMMON = ["--max_steps", "6", "--save_steps", "3", "--per_device_train_batch_size", "2",
          "--gradient_accumulation_steps", "1", "--shuffle_buffer", "2", "--group_by_length", "false",
          "--logging_steps", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher(kind: str, machine: int, port: int) -> list[str]:
    if kind == "accelerate":  # --num_processes is the total over all machines
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(machine),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "--nproc_per_node", "1"]


def _two_machines(kind: str, args_per_machine: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Start both machines' launches at once (each waits for the other to join) and wait for both."""
    port = _free_port()
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_train, args, _launcher(kind, machine, port))
                   for machine, args in enumerate(args_per_machine)]
        return [future.result() for future in futures]


def _losses(output_dir: Path) -> dict[int, float]:
    logs = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    return {rec["step"]: rec["loss"] for rec in logs if "loss" in rec}


def _ids(output_dir: Path, rank: int) -> dict[int, list[str]]:
    lines = (output_dir / f"sample_ids-rank{rank}.jsonl").read_text().splitlines()
    return {rec["step"]: rec["ids"] for rec in map(json.loads, lines)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One two-machine run (accelerate) and the one-process run with the same global batch."""
    root = tmp_path_factory.mktemp("multinode")
    data = root / "train.jsonl"
    _write_data(data, 24)
    args = ["--data", str(data), *COMMON, "--output_dir", str(root / "two_machines")]
    results = _two_machines("accelerate", [args, args])
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    single = _train(["--data", str(data), *COMMON, "--gradient_accumulation_steps", "2",
                     "--output_dir", str(root / "one_process")])
    assert single.returncode == 0, single.stderr[-3000:]
    return root


def test_two_machines_read_every_record_once_and_train_like_one_process(runs):
    two, one = runs / "two_machines", runs / "one_process"
    by_rank = [_ids(two, 0), _ids(two, 1)]
    seen = [i for ids in by_rank for step in ids.values() for i in step]
    assert sorted(seen) == sorted(f"train.jsonl:{i}" for i in range(1, 25))  # each record once, one epoch
    single_ids = _ids(one, 0)  # 2 micro-batches of 2 per step: the same global batch of 4
    for step in range(1, 7):
        assert sorted(by_rank[0][step] + by_rank[1][step]) == sorted(single_ids[step]), step
    losses_two, losses_one = _losses(two), _losses(one)
    assert sorted(losses_two) == sorted(losses_one) == [1, 2, 3, 4, 5, 6]
    for step in losses_one:
        assert losses_two[step] == pytest.approx(losses_one[step], rel=1e-4), step
    # One output_dir on a shared file system: the main process alone writes the weights and markers,
    # every process its own per-rank files, and the checkpoint records how it was launched.
    checkpoint = two / "checkpoint-3"
    assert (checkpoint / "COMPLETE").exists() and (two / "model.safetensors").exists()
    assert {p.name for p in checkpoint.glob("*rank*")} == {"data_state-rank0.json", "data_state-rank1.json"}
    assert {p.name for p in checkpoint.glob("rng_state_*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert json.loads((two / "run_end.json").read_text())["status"] == "finished"
    assert not list(two.glob(".shared_check-*"))
    topology = json.loads((checkpoint / "data_state-rank1.json").read_text())["topology"]
    assert topology == {"world_size": 2, "num_machines": 2, "processes_per_machine": 1,
                        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1}


def test_resume_on_another_process_count_refuses_and_the_weights_start_a_new_run(runs, tmp_path):
    checkpoint = runs / "two_machines" / "checkpoint-3"
    copy = tmp_path / "run"
    shutil.copytree(checkpoint, copy / "checkpoint-3")
    data = runs / "train.jsonl"
    refused = _train(["--data", str(data), *COMMON, "--output_dir", str(copy), "--resume_from_checkpoint", "auto"])
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    message = refused.stderr
    assert "written by 2 processes (2 machines x 1), this run has 1 process (1 machine x 1)" in message
    assert "accelerate launch --num_processes 2" in message
    assert f"start a new run with --model {copy / 'checkpoint-3'}" in message

    fresh = _train(["--data", str(data), *COMMON, "--max_steps", "2", "--model", str(copy / "checkpoint-3"),
                    "--output_dir", str(tmp_path / "fresh")])
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    # The weights carried over: the first loss is the trained model's, below the untrained model's.
    assert _losses(tmp_path / "fresh")[1] < _losses(runs / "one_process")[1] - 0.1


def test_torchrun_two_nodes_resume_the_two_machine_checkpoint_exactly(runs, tmp_path):
    """torchrun --nnodes 2 is the same launch without accelerate; resuming on the same topology
    continues with the uninterrupted run's losses."""
    shutil.copytree(runs / "two_machines" / "checkpoint-3", tmp_path / "run" / "checkpoint-3")
    args = ["--data", str(runs / "train.jsonl"), *COMMON, "--output_dir", str(tmp_path / "run"),
            "--resume_from_checkpoint", "auto"]
    for result in _two_machines("torchrun", [args, args]):
        assert result.returncode == 0, result.stderr[-3000:]
    resumed, straight = _losses(tmp_path / "run"), _losses(runs / "two_machines")
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-4), step
    assert _ids(tmp_path / "run", 1) == {k: v for k, v in _ids(runs / "two_machines", 1).items() if k > 3}


def test_machines_with_separate_output_dirs_refuse_to_start(tmp_path):
    """A disk per machine would split every checkpoint in two: refuse before training."""
    data = tmp_path / "train.jsonl"
    _write_data(data, 8)
    results = _two_machines("accelerate", [["--data", str(data), *COMMON, "--output_dir", str(tmp_path / f"disk{m}")]
                                           for m in (0, 1)])
    for result in results:
        assert result.returncode != 0
    assert "do not see the files that process 0 writes" in results[1].stderr
    assert "shared" in results[1].stderr
