"""Checkpoint contract (what a side-process evaluator may rely on):
  * `<output_dir>/checkpoint-N/` is finished when `checkpoint-N/COMPLETE` exists. COMPLETE is
    written last (after the weights or adapter, tokenizer with chat template, trainer state,
    optimizer/RNG state and `data_state.json`), atomically (temp file + os.replace), and holds
    `{"step": N, "time": <unix seconds>}`. Never load a checkpoint without it: it may be half-written
    or left over from a crash. `complete_checkpoints(output_dir)` applies this rule (the one listing;
    `latest_complete_checkpoint` and the evaluator use it).
  * Rotation (`save_total_limit`) belongs to this contract, not to the Trainer: it runs only after the
    new checkpoint's COMPLETE is written (`rotate_checkpoints_after_complete`), so a kill at any moment
    leaves a complete checkpoint to resume. It may delete ANY older checkpoint at any time, also one that the
    evaluator is reading. The evaluator must tolerate this: treat FileNotFoundError/OSError while
    loading as "checkpoint gone, skip it" (files it has already opened stay readable on POSIX).
  * When training writes a checkpoint-N folder that already exists (a restarted run reaching the
    same step), COMPLETE is removed before the Trainer starts overwriting it.
  * Data position: `checkpoint-N/data_state.json` (one process) or `data_state-rank{r}.json` (several);
    written with `write_data_state`, read back with `read_data_state`. Each holds the run's `topology`
    (`run_topology`: processes, machines, per-device batch, accumulation); `check_resume_topology`
    refuses a resume whose data position would not fit, and says what to do instead. Beside it the
    `data_layout` (`data_layout`: the flags that decide which samples form which batch, and each data
    file's fingerprint); `check_resume_data` refuses a changed flag or file, naming it and the fix.
  * A COMPLETE checkpoint can still be damaged (a copy cut short, a file truncated by a full disk):
    `checkpoint_damage` (sft.train.checkpoint_files) looks at every weights/optimizer file cheaply; `auto` skips such a checkpoint with a warning naming
    the file, an explicit path to one is an error.
  * Writers that use a temporary name in the checkpoint folder (safetensors writes `.tmpXXXXXX` and
    renames it) leave it behind when killed: `finish_checkpoint` removes such stale names before
    COMPLETE, and a resume removes the incomplete checkpoint folders (`remove_incomplete_checkpoints`).
  * Several processes or machines: `output_dir` is ONE folder that every process sees (a shared file
    system across machines; `check_output_dir_shared` refuses to start otherwise). The global main
    process writes the weights, trainer state, COMPLETE and run_end.json; each process writes only
    files named by its global rank (data state, RNG state, sample ids, rejects).
  * When the run is over, `<output_dir>/run_end.json` is written last (`write_run_end`): `status`
    finished / stopped / failed, `outcome` (an `Outcome` value), `message`, `last_checkpoint`,
    `final_model` (set when output_dir holds the final model) and `global_step`. A watching evaluator
    exits once it exists and nothing is pending. It is written on every way a run ends, failures
    included; on a full disk it goes into the few bytes `reserve_run_end` set aside at start-up.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainerCallback

from sft.files import write_json_atomic
from sft.train.checkpoint_files import checkpoint_damage, file_fingerprint, remove_stale_temp_files

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
DATA_STATE_NAME = "data_state.json"
RUN_END_NAME = "run_end.json"
RUN_END_RESERVE = ".run_end.reserve"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class Outcome(Enum):
    """How a training run ended; the callbacks set it, the run's finish step reads it."""

    FINISHED = "finished"  # reached max_steps
    EARLY_STOPPED = "early_stopped"  # validation loss stopped improving; the model is final
    SIGNALLED = "signalled"  # SIGTERM/SIGINT: a checkpoint was saved, resume from it
    NONFINITE = "nonfinite"  # NaN/inf gradients: stopped before applying them, nothing saved after
    FAILED = "failed"  # an exception

    @property
    def saves_final_model(self) -> bool:
        return self in (Outcome.FINISHED, Outcome.EARLY_STOPPED)

    @property
    def status(self) -> str:
        """run_end.json's coarse `status`, which watchers read: finished, stopped or failed."""
        if self.saves_final_model:
            return "finished"
        return "stopped" if self is Outcome.SIGNALLED else "failed"


# ---------------------------------------------------------------------------------- checkpoints


_INDEXED_CPU = re.compile(r"cpu:\d+$")
_indexed_cpu_registered = False


def allow_indexed_cpu_restore() -> None:
    """Let torch.load restore storages to an indexed CPU device ("cpu:0").

    transformers 5.17 (the GPU image's, the lowest requirements.txt allows) resumes a multi-process run's
    optimizer state with map_location=args.device, which is "cpu:0" in a multi-process CPU (gloo) run, and
    torch cannot restore to that ("don't know how to restore data location ... (tagged with cpu:0)"); later
    transformers pass "cpu". This registers a restore rule for "cpu:N" through torch's public extension point
    (torch.serialization.register_package): the storage stays on the CPU. Idempotent; nothing changes for
    the locations torch already knows.
    """
    global _indexed_cpu_registered
    if _indexed_cpu_registered:
        return

    def tag(_storage):  # never tags a storage when saving
        return None

    def restore(storage, location: str):
        return storage if _INDEXED_CPU.match(location) else None

    torch.serialization.register_package(99, tag, restore)
    _indexed_cpu_registered = True


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def _checkpoint_folders(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """[(N, run_dir/checkpoint-N), ...] for every checkpoint folder, complete or not, by step."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def complete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """[(N, run_dir/checkpoint-N), ...] for every checkpoint with a COMPLETE marker, by step."""
    return [(step, path) for step, path in _checkpoint_folders(run_dir) if is_complete_checkpoint(path)]


def rotate_checkpoints_after_complete(run_dir: str | os.PathLike, save_total_limit: int | None, newest: Path,
                                      best: str | os.PathLike | None = None) -> None:
    """Keep at most `save_total_limit` complete checkpoints; call after `newest`'s COMPLETE is written.

    `newest` and `best` (the Trainer's best_model_checkpoint) are never deleted, as in the Trainer's own
    rotation. Incomplete folders older than `newest` (left by a kill while saving) can never be resumed: removed.
    """
    if not save_total_limit or save_total_limit <= 0:
        return
    newest = Path(newest)
    protected = {newest.resolve()} | ({Path(best).resolve()} if best else set())
    newest_step = int(CHECKPOINT_RE.match(newest.name).group(1))
    for step, path in _checkpoint_folders(run_dir):
        if step < newest_step and not is_complete_checkpoint(path):
            shutil.rmtree(path, ignore_errors=True)
    complete = complete_checkpoints(run_dir)
    keep = max(save_total_limit, sum(1 for _, path in complete if path.resolve() in protected))
    remaining = len(complete)
    for _, path in complete:
        if remaining <= keep:
            break
        if path.resolve() not in protected:
            shutil.rmtree(path, ignore_errors=True)
            remaining -= 1


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The checkpoint-N with the highest N that has a COMPLETE marker (for --resume_from_checkpoint auto)."""
    found = complete_checkpoints(output_dir)
    return str(found[-1][1]) if found else None


def resolve_resume(value: str | None, output_dir: str | os.PathLike) -> str | None:
    """--resume_from_checkpoint -> a complete, undamaged checkpoint folder, or None to start fresh.

    "auto" takes the latest complete checkpoint in output_dir whose files look whole (a damaged one is
    skipped with a warning naming the bad file; no checkpoint at all: start fresh; checkpoints but none
    complete: an error, never a silent fresh start); a folder must exist, be complete and look whole.
    """
    if not value:
        return None
    if value == "auto":
        complete = complete_checkpoints(output_dir)
        damaged = []
        for _, path in reversed(complete):
            damage = checkpoint_damage(path)
            if damage is None:
                if damaged:
                    logger.warning("--resume_from_checkpoint auto: %s; resuming from the previous complete checkpoint "
                                   "%s instead", "; ".join(damaged), path)
                else:
                    logger.info("Resuming from %s", path)
                return str(path)
            damaged.append(f"{path.name} is marked COMPLETE but {damage}")
        if damaged:
            raise ValueError(f"--resume_from_checkpoint auto: every complete checkpoint in {output_dir} is damaged "
                             f"({'; '.join(damaged)}). Nothing can be resumed; to start over, use a new --output_dir.")
        unfinished = _checkpoint_folders(output_dir)
        if unfinished:
            names = ", ".join(path.name for _, path in unfinished)
            raise ValueError(
                f"--resume_from_checkpoint auto: {output_dir} holds checkpoints ({names}) but none is complete "
                "(no COMPLETE marker: the run was killed while saving). Nothing can be resumed; to start over, "
                "use a new --output_dir (or remove those folders).")
        logger.info("--resume_from_checkpoint auto: no checkpoint in %s, starting fresh", output_dir)
        return None
    if not os.path.isdir(value):
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    if not is_complete_checkpoint(value):
        raise ValueError(f"--resume_from_checkpoint {value}: the checkpoint is incomplete (no COMPLETE marker; "
                         "the run was killed while saving it). Use an earlier checkpoint or 'auto'.")
    damage = checkpoint_damage(value)
    if damage is not None:
        raise ValueError(f"--resume_from_checkpoint {value}: the checkpoint is damaged: {damage}. Resume from an "
                         "earlier checkpoint, or give 'auto' (it skips damaged checkpoints).")
    return str(value)


def remove_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """Delete every checkpoint folder without COMPLETE (a killed save): by the contract it is never loaded, and a
    resumed run that saves the same step again must not inherit its half-written files. Main process only."""
    removed = []
    for _, path in _checkpoint_folders(output_dir):
        if not is_complete_checkpoint(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    if removed:
        logger.info("removed incomplete checkpoint folders (killed while saving): %s", ", ".join(removed))
    return removed


def mark_complete(folder: str | os.PathLike, step: int) -> None:
    """Write COMPLETE: call last, once everything else of the checkpoint is on disk."""
    write_json_atomic(Path(folder) / COMPLETE_MARKER, {"step": step, "time": round(time.time(), 3)})


# ----------------------------------------------------------------------------------- data state


def data_state_name(rank: int, world_size: int) -> str:
    return DATA_STATE_NAME if world_size <= 1 else f"data_state-rank{rank}.json"


def write_data_state(folder: str | os.PathLike, value: Any, rank: int = 0, world_size: int = 1) -> None:
    """Store this process's data position in checkpoint `folder`."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(folder) / data_state_name(rank, world_size), value)


def read_data_state(checkpoint: str | os.PathLike, rank: int = 0, world_size: int = 1) -> Any:
    """The data position `write_data_state` stored in `checkpoint` for this process."""
    path = Path(checkpoint) / data_state_name(rank, world_size)
    if not path.is_file():
        written = sorted(p.name for p in Path(checkpoint).glob("data_state*.json"))
        raise FileNotFoundError(
            f"{path} not found (checkpoint has {written or 'no data state'}); resume with the same number "
            f"of processes ({world_size} now), or start without --resume_from_checkpoint: a checkpoint "
            "without data_state.json was not written by hf_sft.py and its stream position is unknown")
    return json.loads(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------- topology


def run_topology(world_size: int, per_device_train_batch_size: int, gradient_accumulation_steps: int) -> dict:
    """What a checkpoint's data position depends on, and how the processes sat on machines.

    Rank r reads records r mod world_size, and the position counts micro-batches of the per-device size
    (a step is `gradient_accumulation_steps` of them). The machine split is recorded for the user: data
    belongs to global ranks, not to machines. torchrun (and accelerate, which runs it) sets
    LOCAL_WORLD_SIZE, the processes on this machine.
    """
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE") or world_size)
    return {"world_size": int(world_size), "num_machines": max(1, int(world_size) // per_machine),
            "processes_per_machine": per_machine, "per_device_train_batch_size": int(per_device_train_batch_size),
            "gradient_accumulation_steps": int(gradient_accumulation_steps)}


def saved_topology(checkpoint: str | os.PathLike) -> dict | None:
    """The topology a checkpoint was written with (older checkpoints: only the world size), or None
    when it holds no data state."""
    state = _saved_data_state(checkpoint)
    if state is None:
        return None
    return state.get("topology") or {"world_size": int(state.get("world_size", 1))}


def _describe(topology: dict) -> str:
    world = topology["world_size"]
    text = f"{world} process{'es' if world != 1 else ''}"
    if "num_machines" in topology:
        machines, per = topology["num_machines"], topology["processes_per_machine"]
        text += f" ({machines} machine{'s' if machines != 1 else ''} x {per})"
    return text


def fresh_start_hint(checkpoint: str | os.PathLike, adapter: bool) -> str:
    """How to keep the weights of `checkpoint` but not its optimizer and data position."""
    ckpt = str(checkpoint)
    if adapter:
        run = os.path.dirname(os.path.abspath(ckpt))
        return (f"merge the adapter into its base (hf_sft_eval.py --run {run} --merge --merge_from {ckpt} "
                f"--merge_output {ckpt}-merged) and start a new run with --model {ckpt}-merged")
    return f"start a new run with --model {ckpt}"


def check_resume_topology(checkpoint: str | os.PathLike, current: dict, adapter: bool = False) -> None:
    """Refuse to resume `checkpoint` when its data position does not fit this run's `current` topology.

    The world size, per-device batch size and gradient accumulation must match (see run_topology); a
    different machine split of the same number of processes is fine on a shared output_dir.
    """
    saved = saved_topology(checkpoint)
    if saved is None:
        return  # read_data_state explains a checkpoint without data state
    fresh = (f"To train with this setup instead, {fresh_start_hint(checkpoint, adapter)}, a new --output_dir "
             "and no --resume_from_checkpoint (the weights carry over; the optimizer, learning-rate schedule "
             "and data position start over).")
    if saved["world_size"] != current["world_size"]:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint}: the checkpoint was written by {_describe(saved)}, this run "
            f"has {_describe(current)}. Each process's data position is its own share of the data (rank r reads "
            f"records r mod {saved['world_size']}), so it resumes only on {saved['world_size']} processes in all: "
            f"relaunch with that many (e.g. accelerate launch --num_processes {saved['world_size']}, split over "
            f"any number of machines; see docs/multi_gpu.md). {fresh}")
    changed = [f"--{key} {saved[key]} (now {current[key]})"
               for key in ("per_device_train_batch_size", "gradient_accumulation_steps")
               if key in saved and saved[key] != current[key]]
    if changed:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint}: the data position counts micro-batches of the checkpoint's "
            f"batch layout; resume with {' and '.join(changed)}. {fresh}")
    if saved.get("num_machines", current["num_machines"]) != current["num_machines"]:
        logger.info("Resuming %s (written by %s) on %s: the data position belongs to global ranks, not machines",
                    checkpoint, _describe(saved), _describe(current))


# ---------------------------------------------------------------------------------- data layout

def data_layout(flags: dict[str, Any], sources: list) -> dict:
    """What a data position depends on besides the topology: `flags` (flag name -> value, e.g.
    {"--shuffle_buffer": 1000}) and each source (sft.data.sources.Source) with its fingerprint."""
    return {"flags": dict(flags),
            "sources": [{"path": str(s.path), "weight": s.weight, "fingerprint": file_fingerprint(s.path)}
                        for s in sources]}


def _saved_data_state(checkpoint: str | os.PathLike) -> dict | None:
    for name in (DATA_STATE_NAME, data_state_name(0, 2)):
        path = Path(checkpoint) / name
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    return None


def check_resume_data(checkpoint: str | os.PathLike, current: dict, adapter: bool = False) -> None:
    """Refuse to resume `checkpoint` when a flag or data file its data position depends on changed.

    `current` is this run's data_layout(). Checkpoints written before the layout was stored are not checked.
    """
    saved = (_saved_data_state(checkpoint) or {}).get("data_layout")
    if saved is None:
        return
    fresh = (f"To train with the new setting instead, {fresh_start_hint(checkpoint, adapter)}, a new --output_dir "
             "and no --resume_from_checkpoint (the weights carry over; the data position starts over).")
    changed = [f"{flag} {json.dumps(value)} (now {json.dumps(current['flags'].get(flag))})"
               for flag, value in saved["flags"].items() if current["flags"].get(flag) != value]
    if changed:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint}: its data position was saved with {', '.join(changed)}; these "
            f"decide which samples form each batch, so the position means other samples now. Resume with "
            f"{' and '.join(c.split(' (now')[0] for c in changed)}. {fresh}")
    before, now = saved["sources"], current["sources"]
    if [s["weight"] for s in before] != [s["weight"] for s in now] or len(before) != len(now):
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint}: the checkpoint was trained on --data "
            f"{' '.join(_source_spec(s) for s in before)}, this run has --data {' '.join(_source_spec(s) for s in now)}. "
            f"Resume with the checkpoint's --data. {fresh}")
    for old, new in zip(before, now):
        if old["fingerprint"] == new["fingerprint"]:
            if old["path"] != new["path"]:
                logger.info("data file %s is %s from the checkpoint (same size and content hash)",
                            new["path"], old["path"])
            continue
        what = (f"its size went from {old['fingerprint']['size']} to {new['fingerprint']['size']} bytes"
                if old["fingerprint"] and new["fingerprint"] and old["fingerprint"]["size"] != new["fingerprint"]["size"]
                else "its content changed (same size, different bytes at the start or end)")
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint}: data file {new['path']} changed since the checkpoint was "
            f"written: {what}. The saved position is a place in the file as it was (a byte offset), so it now "
            f"points at other records. Put the file back as it was (the checkpoint was trained on {old['path']}), "
            f"or: {fresh}")


def _source_spec(source: dict) -> str:
    return source["path"] + (f":{source['weight']}" if source["weight"] is not None else "")


def check_output_dir_shared(output_dir: str | os.PathLike, rank: int, world_size: int) -> None:
    """Refuse to start unless every process sees the same output_dir (a shared file system).

    Checkpoints gather each rank's data and RNG state beside the main process's weights, and resume reads
    them back from one folder: with a disk per machine, a checkpoint would miss the other machines'
    files and "auto" would resolve differently on each machine. Call on every process (collective).
    """
    import torch.distributed as dist

    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return
    token = [uuid.uuid4().hex if rank == 0 else None]
    marker = None
    if rank == 0:
        marker = Path(output_dir) / f".shared_check-{token[0]}"  # a fresh name: no stale negative cache on NFS
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(marker, {"token": token[0]})
    dist.broadcast_object_list(token, src=0)
    path = Path(output_dir) / f".shared_check-{token[0]}"
    deadline = time.time() + 5  # a network file system may show a new file a moment late
    while not path.is_file() and time.time() < deadline:
        time.sleep(0.2)
    seen: list = [None] * world_size
    dist.all_gather_object(seen, path.is_file())
    if marker is not None:
        marker.unlink(missing_ok=True)
    blind = [r for r, ok in enumerate(seen) if not ok]
    if blind:
        raise ValueError(
            f"--output_dir {output_dir}: process(es) {blind} do not see the files that process 0 writes there. "
            "With several machines output_dir must be one folder on a file system shared by all of them (NFS, "
            "Lustre, a mounted bucket...): every checkpoint holds each process's data position beside the "
            "weights. Point --output_dir at a shared path on every machine.")


# -------------------------------------------------------------------------------------- run end


RUN_END_RESERVE_BYTES = 16 << 10


def reserve_run_end(output_dir: str | os.PathLike) -> None:
    """Set aside the disk blocks run_end.json needs, at start-up (main process): a run that dies of a full disk
    still writes its run_end.json into them, so a watching evaluator learns that the run is over."""
    path = Path(output_dir) / RUN_END_RESERVE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b" " * RUN_END_RESERVE_BYTES)
        f.flush()
        os.fsync(f.fileno())


def write_run_end(output_dir: str | os.PathLike, outcome: Outcome, message: str = "",
                  final_model: str | os.PathLike | None = None, global_step: int | None = None) -> None:
    """Mark the run as over for a watching evaluator; written last.

    final_model and global_step say which model output_dir itself holds, and at which step. When the plain
    atomic write fails (a full disk), the text goes into the reserve_run_end() file, overwritten in place
    (no new blocks) and renamed.
    """
    latest = latest_complete_checkpoint(output_dir)
    value = {"status": outcome.status, "outcome": outcome.value, "message": message, "time": round(time.time(), 3),
             "last_checkpoint": os.path.basename(latest) if latest else None,
             "final_model": str(final_model) if final_model else None, "global_step": global_step}
    target, reserve = Path(output_dir) / RUN_END_NAME, Path(output_dir) / RUN_END_RESERVE
    try:
        write_json_atomic(target, value)
    except OSError as err:
        if not reserve.is_file():
            raise
        logger.warning("writing %s failed (%s): writing it into the space reserved at start-up", target, err)
        _write_into_reserve(reserve, target, value)
    reserve.unlink(missing_ok=True)


def _write_into_reserve(reserve: Path, target: Path, value: dict) -> None:
    room = reserve.stat().st_size
    data = json.dumps(value).encode("ascii")
    if len(data) > room:  # a very long error message: keep its start, the fields a watcher reads stay whole
        value = {**value, "message": value["message"][: max(0, len(value["message"]) - (len(data) - room) - 64)]}
        data = json.dumps(value).encode("ascii")
    with open(reserve, "r+b") as f:  # JSON allows trailing whitespace: the rest of the reserve stays blanks
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(reserve, target)


def read_run_end(output_dir: str | os.PathLike) -> dict | None:
    """run_end.json's fields, or None while the run is still going (or the file is being replaced)."""
    try:
        return json.loads((Path(output_dir) / RUN_END_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def clear_run_end(output_dir: str | os.PathLike) -> None:
    (Path(output_dir) / RUN_END_NAME).unlink(missing_ok=True)


# -------------------------------------------------------------------------------------- callback


def finish_checkpoint(folder: str | os.PathLike, step: int, data_state: Any, args) -> None:
    """After the Trainer wrote checkpoint `folder`: this process's data position, then (all ranks
    done) COMPLETE. Called on every process; `args` the TrainingArguments (rank, world size, main)."""
    if data_state is not None:
        write_data_state(folder, data_state, args.process_index, args.world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank's shards and data state are on disk
    if args.should_save:
        remove_stale_temp_files(folder)  # every writer of this save has returned: a temp name left is stale
        mark_complete(folder, step)


class CompletionMarkerCallback(TrainerCallback):
    """After each save: write the data position, wait for every process, then COMPLETE last, then rotate.

    The Trainer's own rotation runs before on_save, i.e. before COMPLETE: give the Trainer
    save_total_limit=None and this callback the limit (attach_callbacks does both).
    """

    def __init__(self, data_state_fn: Callable[[int], Any] | None = None, save_total_limit: int | None = None):
        self.data_state_fn = data_state_fn
        self.save_total_limit = save_total_limit

    def _checkpoint_dir(self, args, state) -> Path:
        return Path(args.output_dir) / f"checkpoint-{state.global_step}"

    def _unmark_before_overwrite(self, args, state, control) -> None:
        if control.should_save and args.should_save:
            (self._checkpoint_dir(args, state) / COMPLETE_MARKER).unlink(missing_ok=True)

    def on_step_end(self, args, state, control, **kwargs):
        self._unmark_before_overwrite(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._unmark_before_overwrite(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        folder = self._checkpoint_dir(args, state)
        data_state = self.data_state_fn(state.global_step) if self.data_state_fn is not None else None
        finish_checkpoint(folder, state.global_step, data_state, args)
        if args.should_save:
            rotate_checkpoints_after_complete(args.output_dir, self.save_total_limit, folder,
                                              best=state.best_model_checkpoint)


def checkpoint_args_overrides(has_eval: bool) -> dict[str, Any]:
    """TrainingArguments for "keep the last K checkpoints plus the best by validation loss".

    Checked on transformers 5.23: with metric_for_best_model="eval_loss" the Trainer records
    state.best_model_checkpoint at each save whose step was also evaluated (no need for
    load_best_model_at_end), and rotate_checkpoints never deletes it nor the newest checkpoint.
    save_total_limit counts the best one, so set save_total_limit = K + 1 for K recent ones, and
    make save_steps a multiple of eval_steps (a step saved but not evaluated cannot become "best").
    """
    if not has_eval:
        return {"save_strategy": "steps", "metric_for_best_model": None, "load_best_model_at_end": False}
    return {
        "save_strategy": "steps",
        "eval_strategy": "steps",
        "metric_for_best_model": "eval_loss",
        "greater_is_better": False,
        "load_best_model_at_end": False,
    }
