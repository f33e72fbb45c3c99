"""The flags of `hf_sft_eval.py` (evaluator) and its `chat` and `batch` subcommands, as argument groups.

    evaluator:  EvalArguments + GenerationOptions
    chat:       ModelChoice + GenerationOptions
    batch:      ModelChoice + BatchFiles + GenerationOptions

Parsed by sft.config.parse_args like training's flags (`--config x.yaml` defaults, unknown flags named,
every problem in one ConfigError). The generation flags are declared once, here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sft.chat_templates import TEMPLATES


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class GenerationOptions:
    """How answers are generated; shared by the evaluator, chat and batch."""

    # 256: room for a chat answer of a few paragraphs, while an evaluation pass over a base model that
    # never stops (every prompt runs to the limit) stays minutes, not an hour, on a CPU.
    max_new_tokens: int = field(default=256, metadata=_help("Longest answer, in new tokens."))
    do_sample: bool = field(default=False, metadata=_help(
        "Sample instead of greedy decoding (greedy keeps evaluations repeatable)."))
    temperature: float = field(default=0.7, metadata=_help("Sampling temperature (with --do_sample)."))
    top_p: float = field(default=0.9, metadata=_help("Nucleus sampling mass (with --do_sample)."))
    batch_size: int = field(default=8, metadata=_help(
        "Prompts generated together by the evaluator and batch (chat answers one at a time)."))
    seed: int = field(default=0, metadata=_help("Random seed for sampling."))

    def problems(self) -> list[str]:
        out = [f"--{name} {getattr(self, name)}: must be at least 1" for name in ("max_new_tokens", "batch_size")
               if getattr(self, name) < 1]
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            out.append(f"--do_sample with --temperature {self.temperature} --top_p {self.top_p}: the temperature "
                       "must be > 0 and top_p in (0, 1]")
        return out


def _template_problems(template: str | None) -> list[str]:
    if template is not None and template not in TEMPLATES:
        return [f"--template {template!r}: expected one of {', '.join(TEMPLATES)}"]
    return []


def _threads_problems(threads: int | None) -> list[str]:
    return [f"--threads {threads}: must be at least 1"] if threads is not None and threads < 1 else []


@dataclass
class EvalArguments:
    """The evaluator's own flags; everything else comes from the run's resolved config (RUN/sft_config.yaml)."""

    run: str = field(metadata=_help("hf_sft.py output folder (has sft_config.yaml and checkpoint-N/)."))
    watch: bool = field(default=False, metadata=_help(
        "Keep polling for new checkpoints until the run writes run_end.json and nothing is pending."))
    poll_seconds: float = field(default=10.0, metadata=_help("Polling interval with --watch."))
    max_idle_minutes: float | None = field(default=None, metadata=_help(
        "With --watch: give up when no checkpoint appeared for this long (a crashed run)."))
    threads: int | None = field(default=None, metadata=_help(
        "CPU threads for the evaluator (default: half the cores while the run is training, all once it ended)."))
    nice: int = field(default=10, metadata=_help("Scheduling niceness increment (0 disables)."))
    val_data: str | None = field(default=None, metadata=_help(
        "Validation file (default: the run's --val_data / --val_size)."))
    num_val: int | None = field(default=None, metadata=_help("Use only the first N validation records."))
    prompts: str | None = field(default=None, metadata=_help(
        "Prompts file to generate on (default: the run's --eval_prompts, else the validation records with their "
        "last answer as reference)."))
    num_prompts: int | None = field(default=None, metadata=_help("Use only the first N prompts."))
    general: str | None = field(default=None, metadata=_help(
        "General-ability prompts for the forgetting check (default: the run's --general_eval)."))
    base_model: str | None = field(default=None, metadata=_help("Base model (default: the run's --model)."))
    no_base: bool = field(default=False, metadata=_help("Do not evaluate the base model as step 0."))
    template: str | None = field(default=None, metadata=_help("Override the run's chat template (default: the run's)."))
    system_prompt: str | None = field(default=None, metadata=_help(
        "Override the run's system prompt (default: the run's)."))
    eval_batch_size: int | None = field(default=None, metadata=_help(
        "Validation-loss batch size (default: the run's --per_device_eval_batch_size)."))
    merge: bool = field(default=False, metadata=_help(
        "Export the run's final LoRA-family adapter as plain merged weights into RUN/merged (or --merge_output), "
        "then exit."))
    merge_from: str | None = field(default=None, metadata=_help(
        "With --merge: the adapter folder to merge (default: RUN or its latest checkpoint)."))
    merge_output: str | None = field(default=None, metadata=_help(
        "With --merge: where to write the merged model (default: RUN/merged). An existing folder is replaced "
        "only if an earlier --merge wrote it, or with --overwrite; never the run or a folder holding it."))
    overwrite: bool = field(default=False, metadata=_help(
        "With --merge: replace an existing --merge_output folder that an earlier --merge did not write."))

    def problems(self) -> list[str]:
        out = _template_problems(self.template) + _threads_problems(self.threads)
        out += [f"--{name} {getattr(self, name)}: must be at least 1" for name in ("num_val", "num_prompts",
                                                                                  "eval_batch_size")
                if getattr(self, name) is not None and getattr(self, name) < 1]
        if self.poll_seconds <= 0:
            out.append(f"--poll_seconds {self.poll_seconds}: must be > 0")
        if (self.merge_from or self.merge_output or self.overwrite) and not self.merge:
            out.append("--merge_from/--merge_output/--overwrite only apply with --merge; add --merge or drop them")
        return out


@dataclass
class ModelChoice:
    """Which model chat and batch talk to, and how prompts are rendered for it."""

    model: str = field(metadata=_help("Model folder, built-in name, hub id or adapter folder."))
    base_model: str | None = field(default=None, metadata=_help(
        "Base model of an adapter (default: the one it records; give it when that moved)."))
    template: str = field(default="auto", metadata=_help(f"Chat template, as in training: {'|'.join(TEMPLATES)}."))
    system_prompt: str | None = field(default=None, metadata=_help(
        "System prompt text or a preset name (qwen, firefly) (default: the template's)."))
    threads: int | None = field(default=None, metadata=_help("CPU threads for torch (default: torch's choice)."))

    def problems(self) -> list[str]:
        return _template_problems(self.template) + _threads_problems(self.threads)


@dataclass
class BatchFiles:
    """batch: where the prompts come from and the answers go."""

    input: str = field(metadata=_help("JSONL: {\"prompt\": ...} lines or training-format records."))
    output: str = field(metadata=_help("JSONL answers; an existing file is resumed."))

    def problems(self) -> list[str]:
        import os

        if os.path.abspath(self.input) == os.path.abspath(self.output):
            return [f"--output {self.output} is the --input file; pass another --output path"]
        return []
