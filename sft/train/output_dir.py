"""Who owns an output_dir: a fresh run never mixes its checkpoints and logs with another run's.

A folder holds one run. A fresh start (no --resume_from_checkpoint) is refused when output_dir has
checkpoints (they would be taken as this run's by run_end.json, `auto` and the evaluator), or a
sft_config.yaml whose resolved config differs from this run's in anything but RUN_VARYING_KEYS.
--overwrite_output_dir deletes the old run's files first: only names this toolkit writes (TOOLKIT_FILES).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml

from sft.config import RUN_CONFIG_NAME, SFTConfig, _plain
from sft.train.checkpoints import CHECKPOINT_RE, RUN_END_NAME, RUN_END_RESERVE

logger = logging.getLogger(__name__)

# Settings that may change between the launches of one run (resume, extend, log differently).
RUN_VARYING_KEYS = frozenset({
    "output_dir", "logging_dir", "run_name", "resume_from_checkpoint", "overwrite_output_dir", "max_steps",
    "num_train_epochs", "save_steps", "save_total_limit", "logging_steps", "eval_steps", "report_to",
    "disable_tqdm", "preview", "eval_prompts", "general_eval", "log_sample_ids",
})
# Files (glob patterns) a training run writes into output_dir besides checkpoint-N/.
TOOLKIT_FILES = (RUN_CONFIG_NAME, RUN_END_NAME, RUN_END_RESERVE, "train_log.jsonl", "loss_curve.png",
                 "data_summary.json", "train_rejects-rank*.jsonl", "sample_ids-rank*.jsonl", "engine*.json")


def _comparable(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in RUN_VARYING_KEYS}


def config_differences(old: dict, new: dict, limit: int = 5) -> list[str]:
    """`key: old -> new` for each setting (outside RUN_VARYING_KEYS) that differs."""
    old, new = _comparable(old), _comparable(new)
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)} -> {new.get(k)}" for k in keys if old.get(k) != new.get(k)][:limit]


def _checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)) if out.is_dir() else []


def clear_previous_run(out: Path) -> list[str]:
    """Delete the toolkit's files of an earlier run in `out` (nothing else); returns the names removed."""
    removed = []
    for folder in _checkpoints(out):
        shutil.rmtree(folder)
        removed.append(folder.name)
    for pattern in TOOLKIT_FILES:
        for path in out.glob(pattern):
            if path.is_file():
                path.unlink()
                removed.append(path.name)
    return removed


def claim_output_dir(config: SFTConfig, main_process: bool = True) -> None:
    """Refuse (ValueError) a fresh run into another run's output_dir; with --overwrite_output_dir the main
    process clears the old run's files instead. A resume (--resume_from_checkpoint) is left to resolve_resume.
    Read-only unless overwriting, so every process may call it."""
    t = config.training
    out = Path(t.output_dir)
    if t.resume_from_checkpoint:
        if config.data.overwrite_output_dir:
            raise ValueError("--overwrite_output_dir deletes the checkpoints that --resume_from_checkpoint would "
                             "resume: give one of them")
        return
    if config.data.overwrite_output_dir:
        if main_process:
            removed = clear_previous_run(out)
            if removed:
                logger.warning("--overwrite_output_dir: deleted the previous run's %s in %s", ", ".join(removed), out)
        return
    checkpoints = _checkpoints(out)
    if checkpoints:
        names = ", ".join(p.name for p in checkpoints[:5]) + (" ..." if len(checkpoints) > 5 else "")
        raise ValueError(
            f"--output_dir {out} already holds checkpoints of a run ({names}); a fresh run there would mix "
            "them with its own. Continue that run with --resume_from_checkpoint auto, use a new --output_dir, "
            "or delete the old run's checkpoints and logs with --overwrite_output_dir")
    saved = out / RUN_CONFIG_NAME
    if saved.is_file():
        try:
            old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            old = {"sft_config.yaml": "unreadable"}
        new = yaml.safe_load(yaml.safe_dump(_plain(config.to_dict()), allow_unicode=True))
        changed = config_differences(old, new)
        if changed:
            raise ValueError(
                f"--output_dir {out} belongs to another run (its {RUN_CONFIG_NAME} differs: {'; '.join(changed)}). "
                "Use a new --output_dir, or --overwrite_output_dir to delete the old run's files first")
