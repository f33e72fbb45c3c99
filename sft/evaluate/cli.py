"""`hf_sft_eval.py --run RUN [--watch]`: flags -> EvalSetup -> evaluate_run -> report and plots; `--merge`."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from sft.evaluate.inference import GenerationOptions

logger = logging.getLogger(__name__)


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hf_sft_eval.py",
        description="Evaluate the base model and every finished checkpoint of an hf_sft.py run on the CPU. "
                    "Subcommands: chat, batch (see `hf_sft_eval.py chat --help`).")
    p.add_argument("--run", required=True, help="hf_sft.py output folder (has sft_config.yaml and checkpoint-N/).")
    p.add_argument("--watch", action="store_true",
                   help="Keep polling for new checkpoints until the run writes run_end.json and nothing is pending.")
    p.add_argument("--poll_seconds", type=float, default=10.0, help="Polling interval with --watch.")
    p.add_argument("--max_idle_minutes", type=float, default=None,
                   help="With --watch: give up when no checkpoint appeared for this long (a crashed run).")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the evaluator (default: half the cores while the run is training, "
                        "all of them once it has ended).")
    p.add_argument("--nice", type=int, default=10, help="Scheduling niceness increment (0 disables).")
    p.add_argument("--val_data", help="Validation file (default: the run's --val_data / --val_size).")
    p.add_argument("--num_val", type=int, default=None, help="Use only the first N validation records.")
    p.add_argument("--prompts", help="Prompts file to generate on (default: the run's --eval_prompts, else the "
                                     "validation records with their last answer as reference).")
    p.add_argument("--num_prompts", type=int, default=None, help="Use only the first N prompts.")
    p.add_argument("--general", help="General-ability prompts for the forgetting check (default: --general_eval).")
    p.add_argument("--base_model", help="Base model (default: the run's --model).")
    p.add_argument("--no_base", action="store_true", help="Do not evaluate the base model as step 0.")
    p.add_argument("--template", help="Override the run's chat template.")
    p.add_argument("--system_prompt", help="Override the run's system prompt.")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8, help="Prompts generated together.")
    p.add_argument("--eval_batch_size", type=int, default=None,
                   help="Validation-loss batch size (default: the run's --per_device_eval_batch_size).")
    p.add_argument("--do_sample", action="store_true", help="Sample instead of greedy decoding.")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge", action="store_true",
                   help="Export the run's final LoRA-family adapter as plain merged weights into RUN/merged "
                        "(or --merge_output), then exit.")
    p.add_argument("--merge_from", help="With --merge: the adapter folder to merge (default: RUN or its latest checkpoint).")
    p.add_argument("--merge_output", help="With --merge: where to write the merged model (default RUN/merged).")
    return p


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


def configure_cpu(threads: int | None, nice: int, training_running: bool = True) -> int:
    """Be a good neighbour to a training run: half the cores and a lower priority while it runs."""
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    cores = os.cpu_count() or 2
    threads = threads or (max(1, cores // 2) if training_running else cores)
    torch.set_num_threads(threads)
    return threads


def eval_main(argv: list[str]) -> int:
    args = eval_parser().parse_args(argv)
    run = Path(args.run)
    if args.watch:
        wait_for_run_start(run, args.poll_seconds, args.max_idle_minutes)
    if not run.is_dir():
        raise FileNotFoundError(f"--run {run}: no such folder (give an hf_sft.py --output_dir)")
    from sft.train.checkpoints import RUN_END_NAME

    training_running = args.watch or not (run / RUN_END_NAME).is_file()
    threads = configure_cpu(args.threads, args.nice, training_running)
    if args.merge:
        return merge_run(run, args.merge_from, args.merge_output, args.base_model)

    from sft.evaluate.evaluator import EvalSetup, evaluate_run
    from sft.evaluate.report import plot_eval, write_report

    generation = GenerationOptions(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                   temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                                   seed=args.seed)
    overrides = dict(val_data=args.val_data, num_val=args.num_val, eval_prompts=args.prompts,
                     num_prompts=args.num_prompts, general_eval=args.general, base_model=args.base_model,
                     include_base=not args.no_base, template=args.template, system_prompt=args.system_prompt,
                     generation=generation, eval_batch_size=args.eval_batch_size, poll_seconds=args.poll_seconds)
    setup = EvalSetup.from_run(str(run), overrides)
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


def merge_run(run: Path, merge_from: str | None, output: str | None, base_model: str | None) -> int:
    """Fold the run's adapter into its base and save a plain model (+ tokenizer) loadable by AutoModelForCausalLM."""
    from sft.evaluate.inference import load_inference_tokenizer
    from sft.train.checkpoints import latest_complete_checkpoint
    from sft.train.export import is_adapter_dir, merge_adapter

    source = merge_from or (str(run) if is_adapter_dir(run) else latest_complete_checkpoint(run))
    if source is None or not is_adapter_dir(source):
        raise ValueError(f"--merge: {source or run} holds no LoRA adapter (adapter_config.json); only LoRA-family "
                         "runs (lora, dora, qlora, full_then_lora) can be merged. Full runs are already plain weights.")
    target = Path(output or run / "merged")
    merge_adapter(source, target, load_inference_tokenizer(source, base_model), base_model=base_model)
    print(f"merged model written to {target}")
    return 0
