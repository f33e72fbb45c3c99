"""`hf_sft_eval.py --run RUN [--watch]`: flags -> EvalSetup -> evaluate_run -> report and plots; `--merge`.

Also the CPU setup every subcommand shares: usable CPUs, torch threads, and (chat, batch, serve) the weights dtype.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

from sft.config import parse_args
from sft.evaluate.options import EvalArguments, GenerationOptions, ModelChoice

logger = logging.getLogger(__name__)

DESCRIPTION = ("Evaluate the base model and every finished checkpoint of an hf_sft.py run on the CPU, with the run's "
               "own resolved settings (RUN/sft_config.yaml). Subcommands: chat, batch, serve, compare (see "
               "`hf_sft_eval.py chat --help`).")


def parse_eval_args(argv: list[str]) -> tuple[EvalArguments, GenerationOptions]:
    return parse_args((EvalArguments, GenerationOptions), argv, prog="hf_sft_eval.py", description=DESCRIPTION)


def wait_for_run_start(run: Path, poll_seconds: float, max_idle_minutes: float | None) -> None:
    """--watch started before (or with) the trainer: wait until it has written sft_config.yaml."""
    import time

    started, told = time.time(), False
    while not (run / "sft_config.yaml").is_file():
        if max_idle_minutes is not None and time.time() - started > max_idle_minutes * 60:
            return  # EvalSetup.from_run names what is missing
        if not told:
            logger.info("waiting for %s/sft_config.yaml (the training run has not started yet)", run)
            told = True
        time.sleep(poll_seconds)


def cgroup_cpu_quota(cgroup_root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> float | None:
    """CPUs this process may use by its cgroup's CPU quota (a container's --cpus), or None when unlimited.

    cgroup v2: `cpu.max` ("QUOTA PERIOD" or "max PERIOD"); v1: cpu.cfs_quota_us / cpu.cfs_period_us (-1:
    none). Every level from the process's own cgroup up to the root is read (a parent's limit binds too);
    inside a container the own path is often not mounted, then the mount's top folder is read.
    """
    root = Path(cgroup_root)
    paths: dict[str, str] = {}  # controller ("" for v2) -> the process's cgroup path
    try:
        for line in Path(proc_cgroup).read_text(encoding="utf-8").splitlines():
            _, controllers, path = line.split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                paths[name] = path
    except (OSError, ValueError):
        pass
    limits = []
    for folder, read in ([(root / p.lstrip("/"), _cpu_max) for p in _ancestors(paths.get("", "/"))]
                         + [(root / d / p.lstrip("/"), _cfs_quota) for d in ("cpu,cpuacct", "cpuacct,cpu", "cpu")
                            for p in _ancestors(paths.get("cpu", "/"))]):
        limit = read(folder)
        if limit is not None:
            limits.append(limit)
    return min(limits) if limits else None


def _ancestors(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    return ["/".join(parts[:k]) for k in range(len(parts), -1, -1)]


def _cpu_max(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _cfs_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus(cgroup_root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int:
    """CPUs this process can really use: its affinity mask (taskset, cpusets, Slurm), capped by the cgroup
    quota (rounded down: a 2.5-CPU quota runs 2 threads without throttling), at least 1. Not os.cpu_count(),
    which counts the machine's cores whatever the process is allowed."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, int(quota))
    return max(1, cpus)


def configure_cpu(threads: int | None, nice: int, training_running: bool = True) -> int:
    """Be a good neighbour to a training run: half the usable CPUs and a lower priority while it runs."""
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    cores = available_cpus()
    threads = threads or (max(1, cores // 2) if training_running else cores)
    torch.set_num_threads(threads)
    return threads


def configure_model_command(command: str, args: ModelChoice, device: str = "cpu") -> str:
    """chat, batch and serve: set torch's threads and resolve --eval_dtype, say both in one stderr line, and return
    the dtype to load the model in.

    Threads: --threads, else every CPU this process may use: unlike the evaluator, these commands do not run
    beside a training run by default, so they take the whole machine (the user can pass --threads to share).
    """
    from sft.evaluate.inference import resolve_device_dtype

    threads = configure_cpu(args.threads, nice=0, training_running=False)
    dtype, reason = resolve_device_dtype(args.eval_dtype, device)
    print(f"hf_sft_eval.py {command}: {args.model} in {dtype} ({reason}) on {device}, {threads} CPU thread(s)",
          file=sys.stderr, flush=True)
    return dtype


def eval_main(argv: list[str]) -> int:
    args, generation = parse_eval_args(argv)
    run = Path(args.run)
    if args.watch:
        wait_for_run_start(run, args.poll_seconds, args.max_idle_minutes)
    if not run.is_dir():
        raise FileNotFoundError(f"--run {run}: no such folder (give an hf_sft.py --output_dir)")
    from sft.train.checkpoints import RUN_END_NAME

    training_running = args.watch or not (run / RUN_END_NAME).is_file()
    threads = configure_cpu(args.threads, args.nice, training_running)
    if args.merge:
        return merge_run(run, args.merge_from, args.merge_output, args.base_model, args.overwrite)

    from sft.evaluate.evaluator import EvalSetup, evaluate_run
    from sft.evaluate.report import plot_eval, write_report

    setup = EvalSetup.from_run(str(run), args, generation)
    logger.info("evaluating %s on %d CPU thread(s): %d validation samples, %d prompts, %d general prompts%s",
                run, threads, len(setup.val), len(setup.prompts), len(setup.general), " (watching)" if args.watch else "")

    def refresh(_record: dict) -> None:
        write_report(setup)
        try:
            plot_eval(setup)
        except Exception as err:  # a plotting problem must not stop the evaluation
            logger.warning("could not draw the plots: %s", err)

    idle = args.max_idle_minutes * 60 if args.max_idle_minutes is not None else None
    new = evaluate_run(setup, watch=args.watch, on_record=refresh, max_idle_seconds=idle)
    if not (setup.eval_dir / "report.md").is_file() or not new:
        refresh({})
    logger.info("evaluated %d model(s) in this call; report: %s", len(new), setup.eval_dir / "report.md")
    return 0


def merge_run(run: Path, merge_from: str | None, output: str | None, base_model: str | None,
              overwrite: bool = False) -> int:
    """Fold the run's adapter into its base and save a plain model (+ tokenizer) loadable by AutoModelForCausalLM."""
    from sft.evaluate.inference import load_inference_tokenizer
    from sft.train.checkpoints import latest_complete_checkpoint
    from sft.train.export import check_merge_target, is_adapter_dir, merge_adapter

    source = merge_from or (str(run) if is_adapter_dir(run) else latest_complete_checkpoint(run))
    if source is None or not is_adapter_dir(source):
        raise ValueError(f"--merge: {source or run} holds no adapter (adapter_config.json); only LoRA-family runs "
                         "(lora, dora, qlora, full_then_lora) and ia3 can be merged. Full runs are already plain "
                         "weights.")
    target = Path(output or run / "merged")
    check_merge_target(target, [run, source], overwrite)  # before loading anything
    merge_adapter(source, target, load_inference_tokenizer(source, base_model), base_model=base_model)
    print(f"merged model written to {target}")
    return 0
