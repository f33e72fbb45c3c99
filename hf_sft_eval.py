#!/usr/bin/env python
"""Evaluate a fine-tune on the CPU while it trains, and chat with or batch-run a trained model.

    python hf_sft_eval.py --run outputs/demo                 # evaluate the base model + every checkpoint, exit
    python hf_sft_eval.py --run outputs/demo --watch         # keep evaluating new checkpoints until the run ends
    python hf_sft_eval.py --run outputs/lora_run --merge     # export the run's adapter as plain merged weights
    python hf_sft_eval.py chat --model outputs/demo          # interactive chat, streamed
    python hf_sft_eval.py batch --model outputs/demo --input prompts.jsonl --output answers.jsonl
    python hf_sft_eval.py serve --model outputs/demo          # OpenAI-compatible API on http://127.0.0.1:8000/v1
    python hf_sft_eval.py compare smollm2-135m-instruct outputs/demo --prompts data/demo_eval_prompts.jsonl

Reports land in RUN/eval/: metrics.jsonl, predictions-STEP.jsonl, report.md and PNG plots.
See docs/evaluation.md.
"""
from __future__ import annotations

import os
import sys

from sft.cli import run_entry  # noqa: E402

SUBCOMMANDS = ("chat", "batch", "serve", "compare")


def _subcommand(name: str):
    # Imported on demand: `serve` needs fastapi/uvicorn, the others must not pay for (or need) them.
    if name == "chat":
        from sft.evaluate.chat import chat_main as command
    elif name == "batch":
        from sft.evaluate.batch import batch_main as command
    elif name == "serve":
        from sft.evaluate.serve import serve_main as command
    else:
        from sft.evaluate.compare import compare_main as command
    return command


def _main(argv: list[str]) -> int:
    if argv and argv[0] in SUBCOMMANDS:
        return _subcommand(argv[0])(argv[1:])
    from sft.evaluate.cli import eval_main

    return eval_main(argv)


def hide_gpus() -> None:
    """The evaluator is a CPU job beside training: never take a GPU the trainer needs, whatever
    CUDA_VISIBLE_DEVICES says (a shell that set it for training, a job script). Set before torch initialises
    CUDA, which reads the variable then. `serve --device cuda` is the one command that asks for a GPU: it gets
    the user's value back from SFT_EVAL_CUDA_VISIBLE_DEVICES (absent: the variable was unset)."""
    if os.environ.get("SFT_EVAL_GPUS_HIDDEN") and os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return  # already hidden (main called again, or a child of an evaluator): the saved value is the user's
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        os.environ["SFT_EVAL_CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
    else:
        os.environ.pop("SFT_EVAL_CUDA_VISIBLE_DEVICES", None)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["SFT_EVAL_GPUS_HIDDEN"] = "1"


def main(argv: list[str] | None = None) -> int:
    hide_gpus()
    return run_entry(_main, argv, "hf_sft_eval.py")


if __name__ == "__main__":
    sys.exit(main())
