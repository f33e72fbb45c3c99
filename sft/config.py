"""The one configuration source: dataclass groups + the HF TrainingArguments.

Precedence: dataclass defaults < project defaults for TrainingArguments < `--config file.yaml`
< command-line flags. A YAML file is a flat mapping of flag names (as in LLaMA-Factory); an unknown
key is an error naming the key and the closest valid names. Every run writes the resolved config
to `<output_dir>/sft_config.yaml`.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sft.files import write_text_atomic
from sft.models import DEFAULT_MODEL

TEMPLATES = ("auto", "qwen2.5", "chatml", "tokenizer")
FINETUNING_TYPES = ("full", "freeze", "lora", "dora", "qlora", "prompt_tuning", "full_then_lora")
DEFAULT_DATA = ["data/demo_train.jsonl"]


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message lists every problem found."""


@dataclass
class ModelArguments:
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Built-in name, local HF folder or hub id."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer to use (default: the model's)."})
    template: str = field(default="auto", metadata={"help": f"Chat template: {'|'.join(TEMPLATES)}."})
    system_prompt: str | None = field(
        default=None, metadata={"help": "Default system prompt for records without one (template default if unset)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa|eager|flash_attention_2."})
    precision: str = field(
        default="auto", metadata={"help": "auto|bf16|fp16|fp32 (auto: bf16 where the CPU/GPU supports it)."}
    )

    def problems(self) -> list[str]:
        out = []
        if self.template not in TEMPLATES:
            out.append(f"--template {self.template!r}: expected one of {', '.join(TEMPLATES)}")
        if self.attn_implementation not in ("sdpa", "eager", "flash_attention_2", "flash_attention_3"):
            out.append(f"--attn_implementation {self.attn_implementation!r}: expected sdpa, eager or flash_attention_2")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            out.append(f"--precision {self.precision!r}: expected auto, bf16, fp16 or fp32")
        return out


@dataclass
class DataArguments:
    data: list[str] = field(
        default_factory=lambda: list(DEFAULT_DATA),
        metadata={"help": "Training files or hub ids; PATH:WEIGHT sets mixing probabilities."},
    )
    format: str = field(default="auto", metadata={"help": "Input format (auto-detected per file by default)."})
    val_data: str | None = field(default=None, metadata={"help": "Validation file."})
    val_size: int = field(default=0, metadata={"help": "Hold out this many training records for validation."})
    max_length: int = field(default=1024, metadata={"help": "Maximum tokens per sample (longer ones are truncated)."})
    train_on_prompt: bool = field(default=False, metadata={"help": "Also train on system/user/tool tokens."})
    last_turn_only: bool = field(default=False, metadata={"help": "Train only the last assistant turn."})
    packing: bool = field(default=False, metadata={
        "help": "Pack each micro-batch's samples into rows instead of padding them: one row with flash attention, "
                "rows as long as the batch's longest sample with sdpa/eager. Batches are then shuffled samples "
                "(as with --group_by_length false), so packing changes the speed, not what is learned."})
    group_by_length: bool = field(default=True, metadata={"help": "Group similar lengths into batches (less padding)."})
    shuffle_buffer: int = field(default=1000, metadata={"help": "Samples in the streaming shuffle buffer."})
    balance_batches: bool = field(
        default=True, metadata={"help": "With --group_by_length: cut each shuffle buffer into as many batches as "
                                        "--per_device_train_batch_size gives, with about equal padded tokens each "
                                        "(that many samples on average; equal weight per token, flat memory)."}
    )
    batch_tokens: int | None = field(
        default=None, metadata={"help": "With --group_by_length: fill each micro-batch up to this many padded tokens "
                                        "instead of a sample count (overrides --balance_batches); "
                                        "--per_device_train_batch_size then only sizes the --num_train_epochs "
                                        "step estimate."}
    )
    pad_to_multiple_of: int | None = field(default=None, metadata={"help": "Pad batch length to a multiple of this."})
    preview: int = field(default=0, metadata={"help": "Print N encoded samples with trained tokens marked, then exit."})
    early_stopping_patience: int = field(
        default=0, metadata={"help": "Stop after N evaluations without a better validation loss (0: off)."}
    )
    log_sample_ids: bool = field(default=False, metadata={"help": "Write the sample ids of every step (debugging)."})
    eval_prompts: str | None = field(
        default=None, metadata={"help": "hf_sft_eval.py: prompts file to generate on (default: validation records)."}
    )
    general_eval: str | None = field(
        default=None, metadata={"help": "hf_sft_eval.py: general-ability prompts scored for forgetting."}
    )

    def problems(self) -> list[str]:
        out = []
        if not self.data:
            out.append("--data: give at least one training file")
        if self.max_length < 16:
            out.append(f"--max_length {self.max_length}: must be at least 16")
        if self.val_size < 0:
            out.append(f"--val_size {self.val_size}: must be >= 0")
        if self.batch_tokens is not None and (self.batch_tokens < self.max_length or self.packing
                                              or not self.group_by_length):
            out.append(f"--batch_tokens {self.batch_tokens}: needs --group_by_length true, no --packing, and at "
                       f"least --max_length ({self.max_length}) tokens")
        if self.train_on_prompt and self.last_turn_only:
            out.append("--train_on_prompt and --last_turn_only cannot be combined")
        return out


@dataclass
class MethodArguments:
    finetuning_type: str = field(default="full", metadata={"help": f"{'|'.join(FINETUNING_TYPES)}."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default 2 * rank)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target: str = field(default="all-linear", metadata={"help": "Comma-separated module names or all-linear."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilized LoRA scaling (alpha / sqrt(r))."})
    freeze_trainable_layers: int = field(default=2, metadata={"help": "freeze: train only the last N layers."})
    freeze_train_embeddings: bool = field(default=False, metadata={"help": "freeze: also train the embeddings."})
    full_ratio: float = field(default=0.2, metadata={"help": "full_then_lora: share of steps done as full FT."})
    num_virtual_tokens: int = field(default=20, metadata={"help": "prompt_tuning: number of virtual tokens."})
    save_merged: bool = field(default=False, metadata={"help": "LoRA runs: also save merged full weights."})

    def problems(self) -> list[str]:
        out = []
        if self.finetuning_type not in FINETUNING_TYPES:
            out.append(f"--finetuning_type {self.finetuning_type!r}: expected one of {', '.join(FINETUNING_TYPES)}")
        if self.lora_rank < 1:
            out.append(f"--lora_rank {self.lora_rank}: must be >= 1")
        if not 0.0 < self.full_ratio < 1.0:
            out.append(f"--full_ratio {self.full_ratio}: must be between 0 and 1 (exclusive)")
        return out


GROUPS = (ModelArguments, DataArguments, MethodArguments)

# TrainingArguments defaults that suit this project better than the library's.
PROJECT_TRAINING_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/run",
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "learning_rate": 1e-4,
    "max_steps": 60,
    "logging_steps": 1,
    "save_steps": 20,
    "save_total_limit": 3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "report_to": "tensorboard",
    "remove_unused_columns": False,
    "seed": 42,
}


@dataclass
class SFTConfig:
    """All resolved arguments of a run."""

    model: ModelArguments
    data: DataArguments
    method: MethodArguments
    training: Any  # transformers.TrainingArguments
    config_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for group in (self.model, self.data, self.method):
            flat.update(dataclasses.asdict(group))
        training = self.training.to_dict()
        training.pop("_n_gpu", None)
        for key in sorted(_training_field_names()):
            if key in training:
                flat[key] = training[key]
        return flat


def _training_field_names() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def valid_keys() -> set[str]:
    keys = _training_field_names()
    for group in GROUPS:
        keys |= {f.name for f in dataclasses.fields(group)}
    return keys


def load_yaml_config(path: str) -> dict[str, Any]:
    """Read a flat YAML mapping of flag names; unknown keys are an error naming each one."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values, got {type(values).__name__}")
    known = valid_keys()
    unknown = [k for k in values if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), sorted(known), n=3)
            hints.append(f"'{key}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ConfigError(f"--config {path}: unknown key{'s' if len(unknown) > 1 else ''} {'; '.join(hints)}")
    return values


def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    rest, config = [], None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a YAML file path")
            config, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return config, rest


def parse_config(argv: list[str] | None = None) -> SFTConfig:
    """Parse `--config x.yaml` + flags into an SFTConfig; raises ConfigError listing every problem."""
    from transformers import HfArgumentParser, TrainingArguments

    argv = list(argv) if argv is not None else []
    config_file, argv = _split_config_flag(argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, MethodArguments, TrainingArguments))
    defaults = dict(PROJECT_TRAINING_DEFAULTS)
    if config_file:
        defaults.update(load_yaml_config(config_file))
    parser.set_defaults(**defaults)
    model, data, method, training, unknown = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    if unknown:
        flags = [arg for arg in unknown if arg.startswith("-")] or unknown
        raise ConfigError("unknown argument" + ("s " if len(flags) > 1 else " ") + "; ".join(
            _flag_hint(arg) for arg in flags))
    problems = model.problems() + data.problems() + method.problems()
    if data.packing and method.finetuning_type == "prompt_tuning":
        problems.append("--packing with --finetuning_type prompt_tuning: the virtual tokens are prepended to every "
                        "row, so packed samples would share them and see each other; use --packing false")
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return SFTConfig(model=model, data=data, method=method, training=training, config_file=config_file)


def _flag_hint(arg: str) -> str:
    if not arg.startswith("--"):
        return repr(arg)
    close = difflib.get_close_matches(arg[2:].split("=")[0].replace("-", "_"), sorted(valid_keys()), n=2)
    return repr(arg) + (f" (did you mean {', '.join('--' + c for c in close)}?)" if close else "")


def write_resolved_config(config: SFTConfig, output_dir: str | os.PathLike) -> Path:
    """Write every resolved value to <output_dir>/sft_config.yaml (re-usable with --config)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "sft_config.yaml"
    write_text_atomic(target, yaml.safe_dump(_plain(config.to_dict()), allow_unicode=True, sort_keys=False))
    return target


def _plain(value: Any) -> Any:
    """Make enums and other objects YAML-safe."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "value") and not isinstance(value, (int, float, str, bool)):
        return value.value
    if value is None or isinstance(value, (int, float, str, bool)):
        return value
    return str(value)
