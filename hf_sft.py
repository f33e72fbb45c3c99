#!/usr/bin/env python
"""Fine-tune a causal LM on chat data (full, LoRA family, ...). `python hf_sft.py --help` lists every flag.

    python hf_sft.py                                   # the CPU demo: SmolLM2-135M on data/
    python hf_sft.py --config configs/qwen2.5-0.5b_full.yaml --max_steps 1000
    python hf_sft.py --preview 3                       # show trained tokens, then exit
"""
import logging
import os
import sys

from sft.cli import run_entry

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo_cpu.yaml")


def _main(argv: list[str]) -> int:
    from sft.config import parse_config
    from sft.train.run import run_training

    if not argv:  # no arguments: the CPU demo preset
        argv = ["--config", DEMO_CONFIG]
    return run_training(parse_config(argv))


def main(argv: list[str] | None = None) -> int:
    return run_entry(_main, argv, "hf_sft.py")


def leave(code: int) -> None:
    """Exit with `code`. A launched rank (WORLD_SIZE > 1) leaves without interpreter finalization: gloo's worker
    threads can still hold work objects that reference Python tensors (the wrapped model keeps the process group
    alive after destroy_process_group), and freeing them while the interpreter shuts down aborts the process
    (SIGABRT, "terminate called without an active exception") after a run that finished and saved, which fails
    the whole launch (seen in CI; pytorch/pytorch#179291 describes the mechanism)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    leave(main())
