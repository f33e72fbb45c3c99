"""hf_sft.py with a fault injected, for the end-to-end tests (production code reads no fault switches).

    python tests/e2e/fault_launcher.py --kill_after_save N <hf_sft.py flags>
    python tests/e2e/fault_launcher.py --kill_during_save N <hf_sft.py flags>

--kill_after_save SIGKILLs the training process right after checkpoint-N is complete, as a machine failure
would. --kill_during_save SIGKILLs it while checkpoint-N's weights are being written: the folder then holds
what safetensors leaves when killed mid-write (its `.tmpXXXXXX` temp file, part-written) and no COMPLETE.
The process exits as hf_sft.py does (run_entry: exit status and one-line errors).
"""
import os
import random
import signal
import string
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from transformers import TrainerCallback  # noqa: E402

from hf_sft import leave  # noqa: E402
from sft.cli import run_entry  # noqa: E402
from sft.config import parse_config  # noqa: E402
from sft.train.run import run_training  # noqa: E402


class KillAfterSave(TrainerCallback):
    """SIGKILL this process right after checkpoint-`step` is complete (it runs after the COMPLETE marker)."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillDuringSave(TrainerCallback):
    """SIGKILL this process as it writes checkpoint-`step`'s weights (on_step_end runs right before the save)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and control.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{self.step}"
            folder.mkdir(parents=True, exist_ok=True)
            name = ".tmp" + "".join(random.choices(string.ascii_letters + string.digits, k=6))
            with open(folder / name, "wb") as f:  # what safetensors' writer holds at that moment
                f.write(os.urandom(1 << 20))
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)


FAULTS = {"--kill_after_save": KillAfterSave, "--kill_during_save": KillDuringSave}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in FAULTS:
        raise SystemExit(f"usage: fault_launcher.py {{{'|'.join(FAULTS)}}} N <hf_sft.py flags>")
    fault = FAULTS[argv[0]](int(argv[1]))
    return run_entry(lambda flags: run_training(parse_config(flags), extra_callbacks=[fault]), argv[2:], "hf_sft.py")


if __name__ == "__main__":
    leave(main(sys.argv[1:]))  # as hf_sft.py: a launched rank exits without interpreter finalization
