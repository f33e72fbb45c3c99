"""full vs lora vs full_then_lora on the CPU demo: loss curves, wall time, what each learned and forgot.

    python bench/compare_methods.py                       # ~20 min on a 2-core CPU
    python bench/compare_methods.py --steps 50 --methods full lora

Each method trains with configs/demo_cpu.yaml (same data, steps, batch, schedule, seed) at its own
usual learning rate, then hf_sft_eval.py scores the final model on data/demo_eval_prompts.jsonl
(identity, JSON format) and data/general_eval.jsonl (forgetting). Prints a Markdown table and writes
a PNG with the training-loss curves (validation loss as points).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from sft.train.plots import loss_series, read_train_log  # noqa: E402

RUNS = {  # name -> extra hf_sft.py flags
    "full": ["--finetuning_type", "full", "--learning_rate", "5e-5"],
    "lora": ["--finetuning_type", "lora", "--learning_rate", "2e-4"],
    "full_then_lora": ["--finetuning_type", "full_then_lora", "--learning_rate", "5e-5", "--full_ratio", "0.2"],
    "full_then_lora_1e-4": ["--finetuning_type", "full_then_lora", "--learning_rate", "1e-4", "--full_ratio", "0.2"],
}


def run(cmd: list[str], log: Path) -> float:
    started = time.time()
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {code}); see {log}")
    return time.time() - started


def train_losses(out: Path, key: str) -> tuple[list[int], list[float]]:
    return loss_series(read_train_log(out / "train_log.jsonl"), key)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--methods", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--out", default="outputs/compare")
    p.add_argument("--png", default="docs/img/methods_loss.png")
    args = p.parse_args()
    root = REPO / args.out
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, name in enumerate(args.methods):
        out = root / name
        train_s = run([sys.executable, "hf_sft.py", "--config", "configs/demo_cpu.yaml", "--output_dir", str(out),
                       "--max_steps", str(args.steps), "--eval_steps", str(args.steps // 2),
                       "--save_steps", str(args.steps), *RUNS[name]], root / f"{name}.train.log")
        eval_flags = [] if i == 0 else ["--no_base"]
        eval_s = run([sys.executable, "hf_sft_eval.py", "--run", str(out), "--max_new_tokens", "64", "--nice", "0",
                      "--threads", str(os.cpu_count() or 2), *eval_flags], root / f"{name}.eval.log")
        metrics = [json.loads(line) for line in (out / "eval" / "metrics.jsonl").read_text().splitlines()]
        if i == 0:
            rows.append(("base model", None, None, metrics[0]))
        rows.append((name, train_s, eval_s, metrics[-1]))
        print(f"{name}: trained in {train_s:.0f}s, evaluated in {eval_s:.0f}s", flush=True)

    keys = [("eval_loss", "val loss"), ("pass_rate/identity", "identity pass"), ("pass_rate/format_json", "JSON format pass"),
            ("rouge-l", "ROUGE-L"), ("general/pass_rate", "general pass")]
    print("\n| run | train wall s | " + " | ".join(t for _, t in keys) + " |")
    print("|---|---:|" + "---:|" * len(keys))
    for name, train_s, _, m in rows:
        cells = [f"{m[k]:.4g}" if isinstance(m.get(k), (int, float)) else "" for k, _ in keys]
        print(f"| {name} | {'' if train_s is None else f'{train_s:.0f}'} | " + " | ".join(cells) + " |")

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
