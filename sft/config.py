"""The one configuration source: dataclass argument groups, parsed the same way by all three scripts.

    groups = parse_args((BuildOptions,), argv, prog="sft_data_builder.py", positional="inputs")
    config = parse_config(argv)                       # training: model, data, method + TrainingArguments
    config = load_run_config("outputs/demo")          # the evaluator: a run's resolved config, same parser

Precedence: dataclass defaults < project defaults < `--config file.yaml` < command-line flags. A YAML
file is a flat mapping of flag names (as in LLaMA-Factory); an unknown key or flag is an error naming
it and the closest valid names. Each group checks itself in `problems()` (and what this machine cannot
do in `machine_problems()`); every problem found is reported in one ConfigError, before any model
loads. Every training run writes its resolved config to `<output_dir>/sft_config.yaml`.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from sft.chat_templates import TEMPLATES
from sft.files import write_text_atomic
from sft.models import DEFAULT_MODEL

FINETUNING_TYPES = ("full", "freeze", "lora", "dora", "qlora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning",
                    "full_then_lora")
LORA_FAMILY = ("lora", "dora", "qlora", "full_then_lora")  # methods whose result is a LoRA adapter
MERGEABLE = (*LORA_FAMILY, "ia3")  # adapters whose weights fold into the base (--save_merged, --merge)
# PEFT prompt learning: the model is frozen and learned virtual tokens are prepended (prompt_tuning, p_tuning)
# or learned keys/values are put before every layer's own (prefix_tuning). Nothing to merge.
VIRTUAL_TOKEN_METHODS = ("prompt_tuning", "prefix_tuning", "p_tuning")
LORA_OPTION_METHODS = ("lora", "dora", "qlora")  # where --lora_init/--loraplus_lr_ratio/--lora_modules_to_save apply
LORA_INITS = ("default", "gaussian", "pissa", "olora")
BASE_CHANGING_INITS = ("pissa", "olora")  # PEFT rewrites the base weights to the residual of the adapter's init
DEFAULT_DATA = ["data/demo_train.jsonl"]
RUN_CONFIG_NAME = "sft_config.yaml"
TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16")


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
    attn_implementation: str = field(default="sdpa", metadata={
        "help": "sdpa|eager|flash_attention_2|flex_attention. With --packing, flash and flex attention take each "
                "micro-batch as one row (flex: torch's own kernel with a per-sample block mask, when flash-attn is "
                "not installed)."})
    fused_loss: str = field(default="auto", metadata={
        "help": "auto|liger|chunked: the output head + cross-entropy kernel. auto: Liger Kernel's fused linear "
                "cross-entropy on a CUDA GPU when liger-kernel is installed, else the built-in chunked loss."})
    precision: str = field(
        default="auto", metadata={"help": "auto|bf16|fp16|fp32 (auto: bf16 where the CPU/GPU supports it)."}
    )
    torch_dtype: str = field(default="auto", metadata={
        "help": "Load dtype of the model weights: auto|float32|bfloat16|float16. auto: frozen weights (lora, dora, "
                "qlora, freeze, prompt_tuning) in the training precision, full fine-tuning in fp32 (master weights "
                "+ autocast). Trainable parameters stay fp32 except for full with an explicit dtype."})

    def problems(self) -> list[str]:
        out = []
        if self.template not in TEMPLATES:
            out.append(f"--template {self.template!r}: expected one of {', '.join(TEMPLATES)}")
        if self.attn_implementation not in ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"):
            out.append(f"--attn_implementation {self.attn_implementation!r}: expected sdpa, eager, flash_attention_2 "
                       "or flex_attention")
        if self.fused_loss not in ("auto", "liger", "chunked"):
            out.append(f"--fused_loss {self.fused_loss!r}: expected auto, liger or chunked")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            out.append(f"--precision {self.precision!r}: expected auto, bf16, fp16 or fp32")
        if self.torch_dtype not in TORCH_DTYPES:
            out.append(f"--torch_dtype {self.torch_dtype!r}: expected auto, float32, bfloat16 or float16")
        return out

    def machine_problems(self) -> list[str]:
        """What this machine cannot run (checked for training, not when a CPU evaluator reads the run)."""
        import importlib.util

        import torch

        out = []
        if self.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            out.append("--attn_implementation flash_attention_2 needs the flash-attn package (pip install flash-attn "
                       "--no-build-isolation); without it use --attn_implementation flex_attention (torch's own "
                       "kernel, the same per-sample isolation with --packing) or sdpa")
        return out + self._liger_problems(torch)

    def _liger_problems(self, torch) -> list[str]:
        import importlib.util

        if self.fused_loss != "liger":
            return []
        if not torch.cuda.is_available():
            return ["--fused_loss liger needs a CUDA GPU (Liger's kernels are Triton) and none is visible here: "
                    "use --fused_loss auto (the chunked loss on CPU)"]
        if importlib.util.find_spec("liger_kernel") is None:
            return ["--fused_loss liger needs the liger-kernel package: pip install liger-kernel "
                    "(or --fused_loss auto, which falls back to the chunked loss)"]
        return []


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
    prefetch_batches: int | None = field(default=None, metadata={
        "help": "Micro-batches read and tokenized ahead on a background thread (0: in the training loop). "
                "Default: 4 on a GPU, 0 on a CPU (where the thread would take cores from training)."})
    eval_prompts: str | None = field(
        default=None, metadata={"help": "hf_sft_eval.py: prompts file to generate on (default: validation records)."}
    )
    general_eval: str | None = field(
        default=None, metadata={"help": "hf_sft_eval.py: general-ability prompts scored for forgetting."}
    )
    # transformers 5 dropped TrainingArguments.overwrite_output_dir; the flag is ours (see sft/train/output_dir.py)
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start fresh in an output_dir used by another run: first delete that run's checkpoints and logs."})

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
        if self.prefetch_batches is not None and self.prefetch_batches < 0:
            out.append(f"--prefetch_batches {self.prefetch_batches}: must be >= 0 (0: read in the training loop)")
        if self.early_stopping_patience < 0:
            out.append(f"--early_stopping_patience {self.early_stopping_patience}: must be >= 0 (0: off)")
        elif self.early_stopping_patience and not (self.val_data or self.val_size):
            out.append(f"--early_stopping_patience {self.early_stopping_patience} needs validation data to watch: "
                       "give --val_data FILE or --val_size N, or drop --early_stopping_patience")
        return out


@dataclass
class MethodArguments:
    finetuning_type: str = field(default="full", metadata={"help": f"{'|'.join(FINETUNING_TYPES)}."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default 2 * rank)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target: str = field(default="all-linear", metadata={"help": "Comma-separated module names or all-linear."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilized LoRA scaling (alpha / sqrt(r))."})
    lora_init: str = field(default="default", metadata={
        "help": "LoRA initialisation (PEFT init_lora_weights): default (A random, B zero) | gaussian (A gaussian "
                "1/r) | pissa (A, B from the top-r singular vectors; the base keeps the residual) | olora "
                "(QR-based). pissa/olora: lora only; the final adapter is saved converted to a plain LoRA (rank "
                "2r) on the untouched base, checkpoints are re-initialised by PEFT on load."})
    loraplus_lr_ratio: float | None = field(default=None, metadata={
        "help": "LoRA+: the B matrices train at learning_rate x this ratio (16 in the paper; A at learning_rate). "
                "lora, dora, qlora."})
    lora_modules_to_save: str | None = field(default=None, metadata={
        "help": "Comma-separated modules trained in full beside the adapter and saved with it, e.g. "
                "embed_tokens,lm_head when new tokens were added (tied embeddings stay tied). lora, dora, qlora."})
    freeze_trainable_layers: int = field(default=2, metadata={"help": "freeze: train only the last N layers."})
    freeze_train_embeddings: bool = field(default=False, metadata={"help": "freeze: also train the embeddings."})
    full_ratio: float = field(default=0.2, metadata={"help": "full_then_lora: share of steps done as full FT."})
    num_virtual_tokens: int = field(default=20, metadata={
        "help": "prompt_tuning, p_tuning: virtual tokens prepended to every input; prefix_tuning: learned "
                "key/value positions before every layer's own."})
    save_merged: bool = field(default=False, metadata={
        "help": "LoRA-family and ia3 runs: also save merged full weights in output_dir/merged."})

    def problems(self) -> list[str]:
        out = []
        if self.finetuning_type not in FINETUNING_TYPES:
            out.append(f"--finetuning_type {self.finetuning_type!r}: expected one of {', '.join(FINETUNING_TYPES)}")
        if self.lora_rank < 1:
            out.append(f"--lora_rank {self.lora_rank}: must be >= 1")
        if not 0.0 < self.full_ratio < 1.0:
            out.append(f"--full_ratio {self.full_ratio}: must be between 0 and 1 (exclusive)")
        if self.save_merged and self.finetuning_type in FINETUNING_TYPES and self.finetuning_type not in MERGEABLE:
            why = ("its virtual tokens are inputs, not weights of the model, so they cannot be merged into them"
                   if self.finetuning_type in VIRTUAL_TOKEN_METHODS
                   else "full and freeze runs already save full weights")
            out.append(f"--save_merged only applies to LoRA-family methods and ia3 ({', '.join(MERGEABLE)}), not "
                       f"--finetuning_type {self.finetuning_type}: {why}. Drop --save_merged")
        if self.num_virtual_tokens < 1 and self.finetuning_type in VIRTUAL_TOKEN_METHODS:
            out.append(f"--num_virtual_tokens {self.num_virtual_tokens}: must be >= 1 for {self.finetuning_type}")
        out += self._lora_option_problems()
        return out

    def _lora_option_problems(self) -> list[str]:
        out = []
        kind = self.finetuning_type
        if self.lora_init not in LORA_INITS:
            out.append(f"--lora_init {self.lora_init!r}: expected one of {', '.join(LORA_INITS)}")
        given = [flag for flag, used in (("--lora_init", self.lora_init != "default"),
                                         ("--loraplus_lr_ratio", self.loraplus_lr_ratio is not None),
                                         ("--lora_modules_to_save", bool(self.lora_modules_to_save))) if used]
        if given and kind in FINETUNING_TYPES and kind not in LORA_OPTION_METHODS:
            why = ("its LoRA phase starts mid-run on the full-phase weights, which these options are not wired for"
                   if kind == "full_then_lora" else "it has no LoRA adapter")
            out.append(f"{', '.join(given)} only apply to --finetuning_type {', '.join(LORA_OPTION_METHODS)}, not "
                       f"{kind}: {why}. Drop {' and '.join(given)} or use --finetuning_type lora")
        elif self.lora_init in BASE_CHANGING_INITS and kind in ("dora", "qlora"):
            why = "a 4-bit base cannot hold the residual" if kind == "qlora" else "DoRA's magnitudes are not converted"
            out.append(f"--lora_init {self.lora_init} with --finetuning_type {kind}: {self.lora_init} rewrites the "
                       "base weights, and the final adapter is saved converted to a plain LoRA on the untouched base, "
                       f"which this project does for plain LoRA only ({why}). Use --finetuning_type lora, or "
                       "--lora_init default|gaussian")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            out.append(f"--loraplus_lr_ratio {self.loraplus_lr_ratio}: must be > 0 (LoRA+ uses ratios like 16)")
        return out

    def machine_problems(self) -> list[str]:
        """What this machine cannot run (checked for training, not when a CPU evaluator reads the run)."""
        import importlib.util

        import torch

        if self.finetuning_type != "qlora":
            return []
        if not torch.cuda.is_available():
            return ["--finetuning_type qlora needs a CUDA GPU: bitsandbytes 4-bit (NF4) weights only run on CUDA, "
                    "and no GPU is visible here. On CPU use --finetuning_type lora (same adapter, full-precision base)"]
        if importlib.util.find_spec("bitsandbytes") is None:
            return ["--finetuning_type qlora needs the bitsandbytes package on a CUDA GPU: pip install bitsandbytes "
                    "(or use --finetuning_type lora)"]
        return []


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

# What a CPU evaluator changes when it reads a run's resolved config: the run's precision and device
# settings describe the trainer's machine (TrainingArguments refuses bf16 on a CPU without use_cpu).
CPU_READER_OVERRIDES: dict[str, Any] = {"use_cpu": True, "bf16": False, "fp16": False, "deepspeed": None}


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


def _field_names(groups: Sequence[type]) -> set[str]:
    return {f.name for group in groups for f in dataclasses.fields(group) if f.init}


def _training_groups() -> tuple[type, ...]:
    from transformers import TrainingArguments

    return (*GROUPS, TrainingArguments)


def valid_keys() -> set[str]:
    """Every training flag / YAML key (the new names of renamed TrainingArguments fields included)."""
    return _field_names(_training_groups()) | set(_training_renames())


# transformers renamed TrainingArguments.gradient_checkpointing(_kwargs) to activation_checkpointing(_kwargs):
# 5.24 has both (the old names as deprecated aliases), 5.17 - the GPU image's, the lowest requirements.txt
# allows - only the old ones. Our configs and docs use the new names; where the installed transformers lacks
# them, a YAML key or flag with the new name is read as the old one.
RENAMED_TRAINING_FIELDS = {"activation_checkpointing": "gradient_checkpointing",
                           "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs"}


def _training_renames() -> dict[str, str]:
    """{new name: old name} for the renamed fields this transformers only knows by their old name."""
    names = _training_field_names()
    return {new: old for new, old in RENAMED_TRAINING_FIELDS.items() if new not in names and old in names}


def _compat_training_values(values: dict[str, Any]) -> dict[str, Any]:
    """A YAML mapping with the new names read as the old ones; where both are given (a run's sft_config.yaml
    written under a newer transformers holds both, equal), the new name's value wins, as it does there."""
    renames = _training_renames()
    out = {k: v for k, v in values.items() if k not in renames}
    for new, old in renames.items():
        if values.get(new) is not None:
            out[old] = values[new]
    return out


def _compat_training_argv(argv: list[str]) -> list[str]:
    """Flags with the new names (`--activation_checkpointing true`, `--activation_checkpointing=true`) given
    as the old ones."""
    renames = _training_renames()
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if flag.startswith("--") and flag[2:] in renames:
            arg = f"--{renames[flag[2:]]}{eq}{value}"
        out.append(arg)
    return out


def training_arg(args: Any, name: str, default: Any = None) -> Any:
    """A TrainingArguments value by its new name, on any supported transformers (see RENAMED_TRAINING_FIELDS)."""
    if hasattr(args, name):
        return getattr(args, name)
    return getattr(args, RENAMED_TRAINING_FIELDS.get(name, name), default)


# ------------------------------------------------------------------------------------- parsing


class OneDefaultHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help unless the help already says its default, or it is None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or action.default in (None, argparse.SUPPRESS, [])
                or isinstance(action, argparse._StoreFalseAction) or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def load_yaml_config(path: str, groups: Sequence[type] | None = None) -> dict[str, Any]:
    """Read a flat YAML mapping of flag names; unknown keys are an error naming each one.

    groups: the argument groups the keys must belong to (default: training's).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values, got {type(values).__name__}")
    known = _field_names(groups) if groups is not None else valid_keys()
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


def _raise_config_error(message: str):
    raise ConfigError(message)


def build_parser(groups: Sequence[type], prog: str, description: str | None = None,
                 positional: str | None = None):
    """The HfArgumentParser of `groups` (one flag per field); `--help` shows each default once.

    positional: a list field that also takes the bare (non-flag) arguments, e.g. the builder's inputs.
    """
    from transformers import HfArgumentParser

    # allow_abbrev=False: a flag is its exact name, as a YAML key is (argparse would take --max_new_token)
    parser = HfArgumentParser(tuple(groups), prog=prog, description=description, allow_abbrev=False,
                              formatter_class=OneDefaultHelpFormatter)
    parser.error = _raise_config_error  # a bad value is a ConfigError like any other, not sys.exit(2)
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML mapping of flag names to values, used as defaults: flags given here override it.")
    if positional:
        help_text = next(f.metadata.get("help", "") for g in groups for f in dataclasses.fields(g)
                         if f.name == positional)
        parser.add_argument(f"{positional}_positional", nargs="*", metavar=positional.upper().rstrip("S"),
                            help=f"{help_text} (or --{positional})")
    return parser


def parse_args(groups: Sequence[type], argv: Sequence[str], prog: str, description: str | None = None,
               defaults: dict[str, Any] | None = None, positional: str | None = None, check_machine: bool = True,
               cross_checks: Callable[..., list[str]] | None = None) -> tuple:
    """Parse `--config x.yaml` + flags into one instance per group; raises ConfigError listing every problem.

    defaults: values that beat the dataclass defaults (the YAML file and the flags beat them).
    cross_checks(*instances) -> problems: checks that span groups.
    check_machine: also run each group's machine_problems() (what this machine cannot do).
    """
    config_file, args = _split_config_flag(list(argv))
    parser = build_parser(groups, prog, description, positional)
    values = dict(defaults or {})
    if config_file:
        values.update(load_yaml_config(config_file, groups))
    parser.set_defaults(**values)
    # Required flags are checked here, after the unknown ones: a misspelled `--outptu` must be reported as
    # itself ("did you mean --output"), not as a missing --output. A value from the YAML file satisfies one.
    required = [action for action in parser._actions
                if action.required and action.option_strings and action.dest not in values]
    for action in parser._actions:
        if action.option_strings:
            action.required = False
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True,
                                                              look_for_args_file=False)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:  # a group's own __post_init__ (TrainingArguments) refusing a value
        raise ConfigError(str(err)) from err
    instances, extra = parsed[:len(groups)], (parsed[len(groups)] if len(parsed) > len(groups) else None)
    if unknown:
        flags = [arg for arg in unknown if arg.startswith("-")] or unknown
        known = _field_names(groups)
        raise ConfigError("unknown argument" + ("s " if len(flags) > 1 else " ") + "; ".join(
            _flag_hint(arg, known) for arg in flags))
    missing = [action.option_strings[0] for action in required
               if getattr(next((g for g in instances if hasattr(g, action.dest)), None), action.dest, None) is None]
    if missing:
        raise ConfigError("missing required argument" + ("s " if len(missing) > 1 else " ") + ", ".join(missing))
    if positional and getattr(extra, f"{positional}_positional", None):
        _take_positionals(instances, positional, getattr(extra, f"{positional}_positional"), args)
    problems = [p for group in instances for p in (group.problems() if hasattr(group, "problems") else [])]
    if check_machine:
        problems += [p for group in instances if hasattr(group, "machine_problems") for p in group.machine_problems()]
    if cross_checks is not None:
        problems += cross_checks(*instances)
    if len(problems) == 1:
        raise ConfigError(f"invalid configuration: {problems[0]}")
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return tuple(instances)


def _take_positionals(instances: list, name: str, values: list[str], args: list[str]) -> None:
    """Bare arguments go to the list field `name`, after any given with --name (they replace a YAML value)."""
    owner = next(group for group in instances if hasattr(group, name))
    flagged = any(a == f"--{name}" or a.startswith(f"--{name}=") for a in args)
    setattr(owner, name, (list(getattr(owner, name)) if flagged else []) + list(values))


def _flag_hint(arg: str, known: set[str]) -> str:
    if not arg.startswith("--"):
        return repr(arg)
    close = difflib.get_close_matches(arg[2:].split("=")[0].replace("-", "_"), sorted(known), n=2)
    return repr(arg) + (f" (did you mean {', '.join('--' + c for c in close)}?)" if close else "")


# ------------------------------------------------------------------------------------ training


def dtype_problems(finetuning_type: str, torch_dtype: str, precision: str) -> list[str]:
    """What a --torch_dtype cannot do with this method; precision bf16|fp16|fp32, or auto (not known yet)."""
    out = []
    if torch_dtype == "float16" and finetuning_type in ("full", "full_then_lora"):
        out.append(f"--torch_dtype float16 with --finetuning_type {finetuning_type}: every weight would train in "
                   "fp16, whose gradients the GradScaler cannot unscale. Use --torch_dtype bfloat16 for pure "
                   "half-precision training, or auto (fp32 master weights, fp16 autocast)")
    if finetuning_type == "freeze" and torch_dtype in ("bfloat16", "float16") and precision == "fp32":
        out.append(f"--torch_dtype {torch_dtype} with --finetuning_type freeze and fp32 precision: the trainable "
                   f"layers stay fp32 beside {torch_dtype} frozen ones, and without autocast their matmuls cannot "
                   f"mix the two. Use --precision {'bf16' if torch_dtype == 'bfloat16' else 'fp16'}, or "
                   "--torch_dtype auto")
    return out


def _training_cross_checks(model: ModelArguments, data: DataArguments, method: MethodArguments,
                           training: Any) -> list[str]:
    out = []
    if data.packing and method.finetuning_type in VIRTUAL_TOKEN_METHODS:
        out.append(f"--packing with --finetuning_type {method.finetuning_type}: the virtual tokens are prepended to "
                   "every row, so packed samples would share them and see each other; use --packing false")
    out += _engine_problems(method, training)
    out += dtype_problems(method.finetuning_type, model.torch_dtype, model.precision)
    return out


def _engine_problems(method: MethodArguments, training: Any) -> list[str]:
    """Method x engine combinations PEFT cannot run."""
    if method.finetuning_type != "prefix_tuning":
        return []
    fsdp = getattr(training, "fsdp_config", None)
    fsdp = fsdp if isinstance(fsdp, dict) else {}
    checkpointing = [flag for flag, on in (
        ("--gradient_checkpointing", getattr(training, "gradient_checkpointing", False)),
        ("--activation_checkpointing", getattr(training, "activation_checkpointing", False)),
        ("fsdp activation_checkpointing", fsdp.get("activation_checkpointing", False)
         or os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "").lower() == "true")) if on]
    if not checkpointing:
        return []
    return [f"--finetuning_type prefix_tuning with {checkpointing[0]}: PEFT refuses prefix tuning under gradient "
            "checkpointing (\"PREFIX_TUNING does not work with gradient checkpointing\": each layer appends its "
            "keys/values to the shared prefix cache in the forward, and a recomputed layer would append them "
            f"twice). Turn {checkpointing[0]} off, or use --finetuning_type prompt_tuning or p_tuning"]


def parse_config(argv: list[str] | None = None, check_machine: bool = True,
                 overrides: dict[str, Any] | None = None) -> SFTConfig:
    """Training's flags (`--config x.yaml` + flags) -> SFTConfig; raises ConfigError listing every problem.

    overrides: values that beat the YAML file (flags still beat them).
    """
    argv = list(argv) if argv is not None else []
    config_file, rest = _split_config_flag(argv)
    defaults = dict(PROJECT_TRAINING_DEFAULTS)
    if config_file:
        defaults.update(_compat_training_values(load_yaml_config(config_file)))
    defaults.update(overrides or {})
    model, data, method, training = parse_args(
        _training_groups(), _compat_training_argv(rest), prog="hf_sft.py",
        description="Fine-tune a causal LM on chat data.",
        defaults=defaults, check_machine=check_machine, cross_checks=_training_cross_checks)
    return SFTConfig(model=model, data=data, method=method, training=training, config_file=config_file)


def load_run_config(run_dir: str | os.PathLike) -> SFTConfig:
    """RUN/sft_config.yaml (written by training) through training's own parser: its exact settings.

    Read as a CPU job: CPU_READER_OVERRIDES replace the run's device settings, and nothing is checked
    against this machine (a QLoRA run trained on a GPU is still readable here).
    """
    path = Path(run_dir) / RUN_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --run must be an hf_sft.py output folder "
                                "(it writes sft_config.yaml at start)")
    problem = _run_config_problem(path)
    if problem:
        raise ConfigError(f"{path}: the run's resolved config is damaged: {problem}. Fix the file (hf_sft.py "
                          "writes every resolved flag there at the start of a run, one `flag: value` a line; "
                          "`hf_sft.py --help` lists the flags)")
    try:
        return parse_config(["--config", str(path)], check_machine=False, overrides=CPU_READER_OVERRIDES)
    except ConfigError as err:
        message = str(err).replace(f"--config {path}: ", "")
        raise ConfigError(f"{path}: the run's resolved config is not readable by this version of hf_sft.py: "
                          f"{message}. Fix or regenerate it (hf_sft.py writes it at start)") from None


def _run_config_problem(path: Path) -> str | None:
    """What makes a run's sft_config.yaml unusable, in one line with its line number, or None.

    Stricter than a user's --config: this file is machine-written, so an empty file, a mapping that is
    not one, or a value whose kind cannot be the field's (a mapping for max_steps) is damage, and argparse
    would take such a value as the field's default without converting or checking it.
    """
    import typing

    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}): the file is damaged"
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        return f"{where}not valid YAML ({what})"
    if values is None:
        return "the file is empty (a run writes every resolved flag there)"
    if not isinstance(values, dict):
        return f"expected a mapping of flag names to values, got a YAML {type(values).__name__}"
    hints = {}
    for group in _training_groups():
        try:
            hints.update(typing.get_type_hints(group))
        except Exception:  # a type this Python cannot evaluate: that group's values are left to argparse
            continue
    lines = {str(key): number for number, key in _top_level_keys(text)}
    for key, value in values.items():
        if key in hints and not _value_fits(value, hints[key]):
            return (f"line {lines.get(str(key), '?')}: {key}: {value!r} is not a valid value for --{key} "
                    f"(expected {_type_name(hints[key])})")
    return None


def _top_level_keys(text: str):
    """(line number, key) of each unindented `key:` line."""
    for number, line in enumerate(text.splitlines(), start=1):
        if line[:1] not in ("", " ", "\t", "#", "-") and ":" in line:
            yield number, line.split(":", 1)[0].strip()


def _value_fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value can be the value of a field typed `hint` (strings are left to argparse)."""
    import enum
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(value, str) and hint is not dict and origin is not dict:
        return True  # argparse converts (and refuses) strings itself
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_value_fits(value, arm) for arm in args)
    if value is None:
        return hint is type(None)
    if origin in (list, tuple, set, Sequence) or hint in (list, tuple):
        return isinstance(value, list)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return any(value == member.value for member in hint)
    if isinstance(hint, type) and hint is not str:
        return True  # a type this check does not know: leave it to the parser
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def write_resolved_config(config: SFTConfig, output_dir: str | os.PathLike) -> Path:
    """Write every resolved value to <output_dir>/sft_config.yaml (re-usable with --config)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / RUN_CONFIG_NAME
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
