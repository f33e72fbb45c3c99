"""hf_sft.py with a fault injected, for the end-to-end tests (production code reads no fault switches).

    python tests/e2e/fault_launcher.py --kill_after_save N <hf_sft.py flags>

SIGKILLs the training process right after checkpoint-N is complete, as a machine failure would.
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from transformers import TrainerCallback  # noqa: E402

from sft.config import parse_config  # noqa: E402
from sft.train.run import run_training  # noqa: E402


class KillAfterSave(TrainerCallback):
    """SIGKILL this process right after checkpoint-`step` is complete (it runs after the COMPLETE marker)."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--kill_after_save":
        raise SystemExit("usage: fault_launcher.py --kill_after_save N <hf_sft.py flags>")
    return run_training(parse_config(argv[2:]), extra_callbacks=[KillAfterSave(int(argv[1]))])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
