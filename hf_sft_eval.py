#!/usr/bin/env python
"""Evaluate a fine-tune on the CPU while it trains, and chat with or batch-run a trained model.

    python hf_sft_eval.py --run outputs/demo                 # evaluate the base model + every checkpoint, exit
    python hf_sft_eval.py --run outputs/demo --watch         # keep evaluating new checkpoints until the run ends
    python hf_sft_eval.py --run outputs/lora_run --merge     # export the run's adapter as plain merged weights
    python hf_sft_eval.py chat --model outputs/demo          # interactive chat, streamed
    python hf_sft_eval.py batch --model outputs/demo --input prompts.jsonl --output answers.jsonl

Reports land in RUN/eval/: metrics.jsonl, predictions-STEP.jsonl, report.md and PNG plots.
See docs/evaluation.md.
"""
from __future__ import annotations

import os
import sys

# The evaluator is a CPU job that runs beside training: never grab a GPU the trainer needs.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from sft.cli import run_entry  # noqa: E402

SUBCOMMANDS = ("chat", "batch")


def _main(argv: list[str]) -> int:
    if argv and argv[0] in SUBCOMMANDS:
        from sft.evaluate.batch import batch_main
        from sft.evaluate.chat import chat_main

        command = {"chat": chat_main, "batch": batch_main}[argv[0]]
        return command(argv[1:])
    from sft.evaluate.cli import eval_main

    return eval_main(argv)


def main(argv: list[str] | None = None) -> int:
    return run_entry(_main, argv, "hf_sft_eval.py")


if __name__ == "__main__":
    sys.exit(main())
