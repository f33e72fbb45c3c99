"""Random-kill soak (not CI): SIGKILL a small training run at random moments, resume it each time with
--resume_from_checkpoint auto, and check that it ends with the losses (and samples) of an uninterrupted run.

    python bench/soak_kill.py --kills 5                 # tiny-qwen2, 12 steps, a checkpoint every 2 steps
    python bench/soak_kill.py --kills 20 --seed 3 --steps 20

A kill lands anywhere: start-up, mid-step, during a checkpoint write. A kill during the very first save
leaves no complete checkpoint; `auto` then refuses to guess (issue 16 item 4) and the script removes that
folder, as the error tells a user to. A chain (one output folder) is killed until it finishes, then compared
with the uninterrupted run; chains repeat until --kills kills landed. Prints each kill, each chain's
comparison and a summary: kills, resumes, the largest loss difference, and PASS/FAIL.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.toy_data import write_toy_conversations  # noqa: E402 - the training tests' synthetic data

WORDS = ["alpha", "beta", "gamma", "delta", "one", "two", "three", "four"]


def command(data: Path, out: Path, steps: int, save_steps: int) -> list[str]:
    return [sys.executable, "hf_sft.py", "--model", "tiny-qwen2", "--report_to", "none", "--data", str(data),
            "--max_length", "96", "--learning_rate", "1e-3", "--warmup_steps", "0", "--precision", "fp32",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--shuffle_buffer", "10",
            "--max_steps", str(steps), "--save_steps", str(save_steps), "--save_total_limit", "2",
            "--logging_steps", "1", "--log_sample_ids", "true", "--output_dir", str(out)]


def per_step(out: Path) -> tuple[dict[int, float], dict[int, list]]:
    losses, ids = {}, {}
    for line in (out / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            if rec["step"] in losses:
                raise AssertionError(f"step {rec['step']} logged twice in {out}/train_log.jsonl")
            losses[rec["step"]] = rec["loss"]
    for line in (out / "sample_ids-rank0.jsonl").read_text().splitlines():
        rec = json.loads(line)
        ids[rec["step"]] = rec["ids"]
    return losses, ids


def compare(straight: tuple[dict, dict], resumed: tuple[dict, dict], steps: int) -> tuple[bool, float]:
    """(every step present with the same samples and a loss within 1e-4 relative, the largest loss difference)."""
    (losses_a, ids_a), (losses_b, ids_b) = straight, resumed
    if not sorted(losses_a) == sorted(losses_b) == list(range(1, steps + 1)):
        return False, float("inf")
    worst = max(abs(losses_a[s] - losses_b[s]) for s in losses_a)
    return ids_a == ids_b and worst <= 1e-4 * max(1.0, max(abs(v) for v in losses_a.values())), worst


def has_complete_checkpoint(out: Path) -> bool:
    return any((p / "COMPLETE").is_file() for p in out.glob("checkpoint-*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs to land before the run may finish")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save_steps", type=int, default=2)
    parser.add_argument("--records", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="soak_kill-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "train.jsonl"
    write_toy_conversations(data, args.records, WORDS)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    started = time.time()
    straight = subprocess.run(command(data, work / "straight", args.steps, args.save_steps), cwd=REPO, env=env,
                              capture_output=True, text=True)
    straight_seconds = time.time() - started
    if straight.returncode != 0:
        print(straight.stderr[-3000:])
        return 1
    print(f"uninterrupted run: {straight_seconds:.1f} s")

    # A chain: one output folder, killed until the planned kills ran out or it finishes, then compared with the
    # uninterrupted run. Chains repeat until `--kills` kills landed inside compared chains.
    straight_steps = per_step(work / "straight")
    chains, kills, resumes, attempt, worst, ok = 0, [], 0, 0, 0.0, True
    while len(kills) < args.kills:
        chains += 1
        out = work / f"chain-{chains}"
        while True:
            attempt += 1
            flags = ["--resume_from_checkpoint", "auto"] if out.exists() else []
            resumes += bool(flags)
            proc = subprocess.Popen(command(data, out, args.steps, args.save_steps) + flags, cwd=REPO, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            delay = rng.uniform(0.1, 0.8) * straight_seconds if len(kills) < args.kills else None
            try:
                _, stderr = proc.communicate(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
                kills.append(round(delay, 1))
                done = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "COMPLETE").is_file())
                print(f"chain {chains}: SIGKILL after {delay:.1f} s (complete checkpoints now: {done})")
                if out.exists() and any(out.glob("checkpoint-*")) and not has_complete_checkpoint(out):
                    print("  killed during the first save: no complete checkpoint, `auto` refuses; the folder goes")
                    shutil.rmtree(out)
                continue
            if proc.returncode != 0:
                print(f"chain {chains}: exit {proc.returncode}\n{stderr[-3000:]}")
                return 1
            break
        same, difference = compare(straight_steps, per_step(out), args.steps)
        worst, ok = max(worst, difference), ok and same
        print(f"chain {chains}: finished; same steps and samples: {same}; max |loss difference| {difference:.2e}")
    print(f"kills: {len(kills)} at {kills} s, in {chains} chain(s); resumes: {resumes}; steps compared per chain: "
          f"{args.steps}; max |loss difference|: {worst:.2e}; result: {'PASS' if ok else 'FAIL'} ({work})")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
