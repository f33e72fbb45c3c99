"""The start-of-run banner: what will be trained, how, on what."""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

def dtype_line(dtypes: dict[str, list[str]], precision: str, full: bool) -> str:
    """The banner's dtypes line: frozen and trainable weights, and what the matmuls run in.

    dtypes: {"frozen": [...], "trainable": [...]} (sft.train.methods.parameter_dtypes); precision bf16|fp16|fp32.
    """
    frozen = "/".join(dtypes.get("frozen") or []) or "none"
    trainable = "/".join(dtypes.get("trainable") or []) or "none"
    if precision in ("bf16", "fp16"):
        compute = f"{precision} autocast" + (" with loss scaling" if precision == "fp16" else "")
    else:
        compute = "the weights' dtype (no autocast)"
    line = f"  dtypes     frozen {frozen}, trainable {trainable}, compute {compute}"
    if full and trainable == "float32":
        line += " (fp32 master weights)"
    return line


def start_banner(config, trainable_params: int, total_params: int, world_size: int | None = None,
                 max_steps: int | None = None, data_summary: dict[str, int] | None = None,
                 dtypes: str | None = None) -> str:
    """A few lines printed at start: what is trained, on what, and how big each step is.

    `config` is an SFTConfig; `data_summary` optional counts such as {"samples": …, "tokens": …,
    "supervised tokens": …}; `max_steps` overrides config.training.max_steps (e.g. when it is
    derived from epochs); `dtypes` is the prepared model's dtype_line.
    """
    training = config.training
    world = world_size if world_size is not None else training.world_size
    per_device, accumulation = training.per_device_train_batch_size, training.gradient_accumulation_steps
    effective = per_device * accumulation * world
    steps = max_steps if max_steps is not None else training.max_steps
    max_length = config.data.max_length
    data = config.data
    varies = data.group_by_length and not data.packing and (data.balance_batches or data.batch_tokens)
    rows = "samples per step" + (" on average" if varies else "")
    lines = [
        f"SFT run -> {training.output_dir}",
        f"  model      {config.model.model} ({config.method.finetuning_type})",
        f"  parameters {trainable_params:,} trainable of {total_params:,}"
        f" ({100.0 * trainable_params / max(total_params, 1):.2f}%)",
        *([dtypes] if dtypes else []),
        f"  batch      {per_device} per device x {accumulation} accumulation x {world} process"
        f"{'es' if world != 1 else ''} = {effective} {rows}",
        f"  tokens     at most {effective * max_length:,} per step (max_length {max_length})",
    ]
    if steps and steps > 0:
        lines.append(f"  steps      {steps:,} (at most {steps * effective * max_length:,} tokens in all)")
    else:
        lines.append(f"  epochs     {training.num_train_epochs:g}")
    lines.append(f"  data       {', '.join(config.data.data)}")
    if config.data.val_data or config.data.val_size:
        lines.append(f"  validation {config.data.val_data or f'{config.data.val_size} held-out records'}")
    if data_summary:
        lines.append("  counts     " + ", ".join(f"{k} {v:,}" for k, v in data_summary.items()))
    return "\n".join(lines)
