"""Every fine-tuning method on the CPU demo: trainable parameters, peak memory, step time, what each learned and forgot.

    python bench/compare_methods.py                       # every method, 50 steps: ~1 h on a free 2-core CPU
    python bench/compare_methods.py --steps 50 --methods full lora
    python bench/compare_methods.py --steps 10 --methods lora ia3 prefix_tuning p_tuning   # a quick subset

Each method trains with configs/demo_cpu.yaml (same data, steps, batch, schedule, seed) at its own
usual learning rate, then hf_sft_eval.py scores the final model on data/demo_eval_prompts.jsonl
(identity, JSON format) and data/general_eval.jsonl (forgetting). Peak memory is the training
process's maximum resident set size (os.wait4), step time the median seconds per optimizer step
between logged steps (evaluation excluded), trainable parameters the start banner's count. Prints a
Markdown table, writes it with the raw numbers to OUT/results.json, and draws the training-loss
curves (validation loss as points) into a PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from sft.train.plots import loss_series, read_train_log  # noqa: E402

RUNS = {  # name -> extra hf_sft.py flags (each method at its usual learning rate)
    "full": ["--finetuning_type", "full", "--learning_rate", "5e-5"],
    "freeze": ["--finetuning_type", "freeze", "--learning_rate", "1e-4"],
    "lora": ["--finetuning_type", "lora", "--learning_rate", "2e-4"],
    "lora_gaussian": ["--finetuning_type", "lora", "--lora_init", "gaussian", "--learning_rate", "2e-4"],
    "lora_pissa": ["--finetuning_type", "lora", "--lora_init", "pissa", "--learning_rate", "2e-4"],
    "lora_olora": ["--finetuning_type", "lora", "--lora_init", "olora", "--learning_rate", "2e-4"],
    # LoRA+ paper: B at 16x, the base rate somewhat below plain LoRA's
    "loraplus": ["--finetuning_type", "lora", "--loraplus_lr_ratio", "16", "--learning_rate", "1e-4"],
    "dora": ["--finetuning_type", "dora", "--learning_rate", "2e-4"],
    "ia3": ["--finetuning_type", "ia3", "--learning_rate", "3e-3"],
    "prompt_tuning": ["--finetuning_type", "prompt_tuning", "--learning_rate", "3e-2"],
    "prefix_tuning": ["--finetuning_type", "prefix_tuning", "--learning_rate", "1e-2"],
    "p_tuning": ["--finetuning_type", "p_tuning", "--learning_rate", "1e-3"],
    "full_then_lora": ["--finetuning_type", "full_then_lora", "--learning_rate", "5e-5", "--full_ratio", "0.2"],
    "full_then_lora_1e-4": ["--finetuning_type", "full_then_lora", "--learning_rate", "1e-4", "--full_ratio", "0.2"],
}
DEFAULT_METHODS = [name for name in RUNS if name != "full_then_lora_1e-4"]


def run(cmd: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak resident memory of the process in MiB)."""
    started = time.time()
    with open(log, "w") as f:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {process.returncode}); see {log}")
    return time.time() - started, usage.ru_maxrss / 1024  # Linux: KiB


def trainable_parameters(log: Path) -> int | None:
    """The start banner's count: `  parameters 4,884,480 trainable of 139,399,488 (3.50%)`."""
    match = re.search(r"parameters ([\d,]+) trainable of", log.read_text(errors="replace"))
    return int(match.group(1).replace(",", "")) if match else None


def seconds_per_step(out: Path) -> float | None:
    """Median seconds per optimizer step between consecutive logged training steps with no evaluation between."""
    records = read_train_log(out / "train_log.jsonl")
    rates, previous = [], None
    for record in records:
        if "eval_loss" in record:
            previous = None  # the interval holding an evaluation is not a training step time
        elif "loss" in record and record.get("time") is not None:
            if previous is not None and record["step"] > previous["step"]:
                rates.append((record["time"] - previous["time"]) / (record["step"] - previous["step"]))
            previous = record
    return statistics.median(rates) if rates else None


def train_losses(out: Path, key: str) -> tuple[list[int], list[float]]:
    return loss_series(read_train_log(out / "train_log.jsonl"), key)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(RUNS))
    p.add_argument("--logging_steps", type=int, default=1, help="train-log interval (step time resolution)")
    p.add_argument("--no_eval", action="store_true",
                   help="only train: trainable parameters, peak memory and step time (no scores)")
    p.add_argument("--skip_base", action="store_true", help="do not score the base model (its row is omitted)")
    p.add_argument("--eval_threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 2),
                   help="hf_sft_eval.py --threads (default: OMP_NUM_THREADS, else every core)")
    p.add_argument("--out", default="outputs/compare")
    p.add_argument("--png", default="docs/img/methods_loss.png")
    args = p.parse_args()
    root = REPO / args.out
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, name in enumerate(args.methods):
        out = root / name
        train_log = root / f"{name}.train.log"
        train_s, peak_mib = run([sys.executable, "hf_sft.py", "--config", "configs/demo_cpu.yaml", "--output_dir",
                                 str(out), "--overwrite_output_dir", "true", "--max_steps", str(args.steps),
                                 "--eval_steps", str(args.steps if args.no_eval else max(args.steps // 2, 1)), "--save_steps", str(args.steps),
                                 "--logging_steps", str(args.logging_steps), *RUNS[name]], train_log)
        eval_s, metrics = 0.0, [{}]
        if not args.no_eval:
            eval_flags = [] if i == 0 and not args.skip_base else ["--no_base"]
            eval_s, _ = run([sys.executable, "hf_sft_eval.py", "--run", str(out), "--max_new_tokens", "64", "--nice",
                             "0", "--threads", str(args.eval_threads), *eval_flags], root / f"{name}.eval.log")
            metrics = [json.loads(line) for line in (out / "eval" / "metrics.jsonl").read_text().splitlines()]
            if i == 0 and not args.skip_base:
                rows.append({"run": "base model", "metrics": metrics[0]})
        rows.append({"run": name, "flags": RUNS[name], "trainable": trainable_parameters(train_log),
                     "peak_rss_mib": round(peak_mib), "s_per_step": seconds_per_step(out), "train_s": round(train_s),
                     "eval_s": round(eval_s), "metrics": metrics[-1]})
        print(f"{name}: trained in {train_s:.0f}s (peak {peak_mib:.0f} MiB), evaluated in {eval_s:.0f}s", flush=True)
        (root / "results.json").write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2))

    keys = [("eval_loss", "val loss"), ("pass_rate/identity", "identity pass"),
            ("pass_rate/format_json", "JSON format pass"), ("general/pass_rate", "general pass")]
    print(f"\n{args.steps} steps x 8 samples, configs/demo_cpu.yaml, {os.cpu_count()} CPU cores, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print("\n| method | trainable params | peak RSS MiB | s/step | train wall s | "
          + " | ".join(t for _, t in keys) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(keys))
    for row in rows:
        m = row["metrics"]
        cells = [f"{m[k]:.4g}" if isinstance(m.get(k), (int, float)) else "" for k, _ in keys]
        trainable = "" if row.get("trainable") is None else f"{row['trainable']:,}"
        step = "" if row.get("s_per_step") is None else f"{row['s_per_step']:.2f}"
        print(f"| {row['run']} | {trainable} | {row.get('peak_rss_mib', '')} | {step} | {row.get('train_s', '')} | "
              + " | ".join(cells) + " |")

    if args.no_eval:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for name in args.methods:
        steps, losses = train_losses(root / name, "loss")
        line, = ax.plot(steps, losses, "-", label=f"{name} (train)")
        steps, losses = train_losses(root / name, "eval_loss")
        ax.plot(steps, losses, "o", color=line.get_color(), label=f"{name} (validation)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"SmolLM2-135M-Instruct on the demo data, {args.steps} steps x 8 samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = REPO / args.png
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    print(f"\nloss curves: {png}")


if __name__ == "__main__":
    main()
