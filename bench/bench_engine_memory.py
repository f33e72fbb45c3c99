"""Peak host memory per rank, DDP vs FSDP2, two CPU processes (gloo), the same model and steps.

    python bench/bench_engine_memory.py                                  # SmolLM2-135M, 3 steps, ~3 min on 2 cores
    python bench/bench_engine_memory.py --model tiny-qwen2 --steps 2     # a quick check

Each engine trains `--steps` full fine-tuning steps through `accelerate launch` and the repo's CPU
configs (configs/accelerate/cpu_2proc.yaml: DDP; fsdp_cpu_2proc.yaml: FSDP2); every rank's peak RSS
and its share of the parameters come from the run's own engine report (output_dir/engine-rank{r}.json,
written by sft.train.engine.EngineReport at train end: getrusage's ru_maxrss of that process). What
differs between the two is the model state each rank holds: DDP keeps a full copy of weights,
gradients and AdamW states on every rank; FSDP2 keeps 1/N of each (plus the layer being gathered).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINES = {"DDP": "configs/accelerate/cpu_2proc.yaml", "FSDP2": "configs/accelerate/fsdp_cpu_2proc.yaml"}


def run_engine(name: str, config: str, args, workdir: Path) -> list[dict]:
    out = workdir / name
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "hf_sft.py",
               "--model", args.model, "--data", args.data, "--finetuning_type", "full",
               "--max_steps", str(args.steps), "--per_device_train_batch_size", "2", "--max_length", "256",
               "--save_strategy", "no", "--logging_steps", "1", "--precision", "fp32", "--report_to", "none",
               "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob("engine-rank*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="data/demo_train.jsonl")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="engine_memory-") as tmp:
        for name, config in ENGINES.items():
            for rank, report in enumerate(run_engine(name, config, args, Path(tmp))):
                rows.append((name, rank, report))
    print(f"\n{args.model}, 2 CPU processes (gloo), full fine-tuning, AdamW fp32, {args.steps} steps\n")
    print("| engine | rank | distributed_type | parameters held (local / global) | peak RSS MB |")
    print("|---|---:|---|---|---:|")
    for name, rank, report in rows:
        held = f"{report['local_numel'] / 1e6:.1f}M / {report['global_numel'] / 1e6:.1f}M"
        print(f"| {name} | {rank} | {report['distributed_type']} | {held} | {report['peak_rss_mb']:,.0f} |")


if __name__ == "__main__":
    main()
