"""Fine-tuning methods: which parameters train, and how the result is saved.

    full            every parameter trains
    freeze          only the last N decoder layers (optionally the embeddings too)
    lora / dora     PEFT low-rank adapters on the chosen linear layers (DoRA adds a magnitude vector);
                    options: --lora_init (gaussian, PiSSA, OLoRA), --loraplus_lr_ratio (LoRA+),
                    --lora_modules_to_save (modules trained in full beside the adapter)
    qlora           LoRA on a 4-bit (NF4, bitsandbytes) base model: CUDA only
    ia3             PEFT IA3: learned rescaling vectors on attention keys/values and the MLP input of down_proj
    prompt_tuning   PEFT soft prompt of N virtual tokens; the model itself is frozen
    prefix_tuning   PEFT prefix: N learned key/value positions before every layer's own
    p_tuning        PEFT P-tuning: N virtual tokens produced by a small MLP prompt encoder
    full_then_lora  full fine-tuning for the first `full_ratio` of steps, then LoRA (see sft/hybrid.py)

The Trainer wiring calls, in order:

    model = load_model_for_method(model_args, method_args, training_args)
    model = prepare_model(model, method_args, training_args)
    ... train (or sft.train.hybrid.run_full_then_lora for full_then_lora) ...
    save_final(model, tokenizer, output_dir, method_args, trainer)   # on every process
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sft.config import BASE_CHANGING_INITS, VIRTUAL_TOKEN_METHODS, dtype_problems, training_arg
from sft.models import load_model
from sft.train.export import merge_adapter

logger = logging.getLogger(__name__)

PEFT_METHODS = ("lora", "dora", "qlora", "ia3", *VIRTUAL_TOKEN_METHODS)
MERGED_DIR = "merged"
LORA_INIT_DIR = "lora_init"  # pissa/olora: the adapter as initialised, to convert the final one to a plain LoRA


# ------------------------------------------------------------------------------------ loading


FULL_METHODS = ("full", "full_then_lora")  # every weight trains: fp32 master weights unless --torch_dtype says


def load_dtype(finetuning_type: str, training_args, torch_dtype: str = "auto") -> str:
    """The dtype the base model loads in: the dtype its frozen weights keep for the whole run.

    auto: full fine-tuning keeps fp32 master weights (autocast computes in bf16/fp16); every other
    method loads its frozen base in the training precision, so a 7B LoRA base is 15 GB, not 30 GB,
    and autocast does not re-cast it on every forward. Trainable parameters are upcast to fp32 by
    prepare_model either way. An explicit --torch_dtype wins (for full: pure bf16 training).
    """
    if torch_dtype != "auto":
        return torch_dtype
    if finetuning_type in FULL_METHODS:
        return "float32"
    return _compute_dtype_name(training_args)


def load_model_for_method(model_args, method_args, training_args):
    """Load the base model in its load_dtype; QLoRA loads it in 4-bit NF4 and needs a CUDA GPU."""
    kwargs: dict[str, Any] = {}
    dtype = load_dtype(method_args.finetuning_type, training_args, getattr(model_args, "torch_dtype", "auto"))
    _check_dtype_combination(method_args.finetuning_type, dtype, training_args)
    if method_args.finetuning_type == "qlora":
        kwargs["quantization_config"] = _qlora_quantization_config(method_args, training_args)
        # 4-bit weights are placed at load time: each process on its own GPU.
        kwargs["device_map"] = {"": int(getattr(training_args, "local_process_index", 0) or 0)}
    # transformers 5 always loads on the meta device and fills each tensor from the memory-mapped
    # checkpoint cast to `dtype`: private host memory stays near one copy of the weights in that dtype
    # (no fp32 copy first; bench/load_memory.py measures it).
    return load_model(
        model_args.model,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=model_args.trust_remote_code,
        **kwargs,
    )


def _check_dtype_combination(kind: str, dtype: str, training_args) -> None:
    # parse_config reported these already when it could; API callers (and precision auto) get them here.
    precision = {"bfloat16": "bf16", "float16": "fp16"}.get(_compute_dtype_name(training_args), "fp32")
    problems = dtype_problems(kind, dtype, precision)
    if problems:
        raise ValueError(problems[0])


def _compute_dtype_name(training_args) -> str:
    if getattr(training_args, "bf16", False):
        return "bfloat16"
    if getattr(training_args, "fp16", False):
        return "float16"
    return "float32"


def _qlora_quantization_config(method_args, training_args):
    problems = method_args.machine_problems()  # parse_config checked this already; API callers get it here
    if problems:
        raise ValueError("; ".join(problems))
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, _compute_dtype_name(training_args)),
    )


# ---------------------------------------------------------------------------------- preparing


def prepare_model(model, method_args, training_args):
    """Apply the method: set requires_grad (full/freeze) or wrap with PEFT; print the trainable count.

    full_then_lora starts as full fine-tuning; sft.train.hybrid switches it to LoRA mid-run.
    """
    kind = method_args.finetuning_type
    merge_problems = [p for p in method_args.problems() if p.startswith("--save_merged")]
    if merge_problems:  # parse_config refused this already; API callers get the same message here
        raise ValueError(merge_problems[0])
    if kind in ("full", "full_then_lora"):
        model.requires_grad_(True)
    elif kind == "freeze":
        _freeze_all_but_last_layers(model, method_args.freeze_trainable_layers, method_args.freeze_train_embeddings)
    elif kind in ("lora", "dora", "qlora"):
        if kind == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=bool(training_arg(training_args, "activation_checkpointing"))
            )
        model = apply_lora(model, method_args, training_args)
    elif kind == "ia3":
        model = _apply_ia3(model)
    elif kind in VIRTUAL_TOKEN_METHODS:
        model = _apply_virtual_tokens(model, method_args)
    else:
        raise ValueError(f"--finetuning_type {kind!r}: expected one of full, freeze, {', '.join(PEFT_METHODS)}, "
                         "full_then_lora")
    if kind not in FULL_METHODS:
        upcast_trainable_parameters(model)
    return model  # the start banner states the trainable parameters (once)


def upcast_trainable_parameters(model: nn.Module) -> int:
    """Trainable parameters in fp32 beside a half-precision frozen base; returns how many were cast.

    fp16 trainable weights break the GradScaler ("Attempting to unscale FP16 gradients") and bf16 ones
    lose small optimizer updates. PEFT already upcasts its adapters (autocast_adapter_dtype); this covers
    freeze's trainable layers and anything a PEFT version leaves behind. Frozen weights are untouched.
    """
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


def parameter_dtypes(model: nn.Module) -> dict[str, list[str]]:
    """{"frozen": [...], "trainable": [...]}: the dtype names present in each group (for the banner)."""
    groups: dict[str, set[str]] = {"frozen": set(), "trainable": set()}
    for param in model.parameters():
        groups["trainable" if param.requires_grad else "frozen"].add(str(param.dtype).replace("torch.", ""))
    return {name: sorted(dtypes) for name, dtypes in groups.items()}


def apply_lora(model, method_args, training_args):
    """Wrap `model` in a PEFT LoRA (or DoRA) adapter; base weights are frozen by PEFT."""
    from peft import LoraConfig, get_peft_model

    init = getattr(method_args, "lora_init", "default")
    modules_to_save = _modules_to_save(getattr(method_args, "lora_modules_to_save", None), model)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=method_args.lora_rank,
        lora_alpha=method_args.lora_alpha if method_args.lora_alpha is not None else 2 * method_args.lora_rank,
        lora_dropout=method_args.lora_dropout,
        target_modules=parse_lora_target(method_args.lora_target, model),
        use_rslora=method_args.use_rslora,
        use_dora=method_args.finetuning_type == "dora",
        bias="none",
        # "pissa": exact SVD (deterministic, so PEFT re-derives the same residual base when it loads a checkpoint)
        init_lora_weights=True if init == "default" else init,
        modules_to_save=modules_to_save,
        # embed_tokens + lm_head of a tied model: one trained copy, still tied (else the saved copies drift apart)
        ensure_weight_tying=bool(modules_to_save) and bool(getattr(model.config, "tie_word_embeddings", False)),
    )
    model = get_peft_model(model, config)
    if training_arg(training_args, "activation_checkpointing"):
        # With the base frozen, the first layer's input carries no grad and a checkpointed
        # (re-entrant) layer would then drop the adapter gradients entirely.
        model.enable_input_require_grads()
    return model


def _modules_to_save(names: str | None, model: nn.Module) -> list[str] | None:
    """--lora_modules_to_save as a list; every name must be a module of the model (a typo is not a silent no-op)."""
    wanted = [n.strip() for n in (names or "").split(",") if n.strip()]
    if not wanted:
        return None
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [n for n in wanted if n not in present]
    if missing:
        top = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                      if isinstance(m, (nn.Linear, nn.Embedding)) and name.count(".") <= 1})
        raise ValueError(f"--lora_modules_to_save {names!r}: no module named {', '.join(missing)} in this model; "
                         f"its embedding and top-level linear modules are: {', '.join(top)}")
    return wanted


def loraplus_optimizer(method_args, training_args) -> tuple | None:
    """The Trainer's optimizer_cls_and_kwargs for LoRA+ (--loraplus_lr_ratio), else None (the Trainer's own).

    A transformers optimizer factory: the Trainer calls it in create_optimizer, after an engine has wrapped the
    model and before it loads a checkpoint's optimizer state on resume, so the groups (A at lr, B at lr x ratio,
    PEFT's create_loraplus_optimizer) are built the same way every time and the saved state fits them.
    """
    ratio = getattr(method_args, "loraplus_lr_ratio", None)
    if ratio is None:
        return None
    return functools.partial(_LoraPlusFactory, training_args, float(ratio)), {}


class _LoraPlusFactory:
    def __init__(self, training_args, ratio: float):
        self.training_args, self.ratio = training_args, ratio

    def __call__(self, model, **_):
        from peft.optimizers import create_loraplus_optimizer
        from transformers import Trainer

        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.training_args, model)
        kwargs = dict(kwargs)
        lr = kwargs.pop("lr", self.training_args.learning_rate)
        return create_loraplus_optimizer(model, optimizer_cls, lr=lr, loraplus_lr_ratio=self.ratio,
                                         loraplus_weight_decay=self.training_args.weight_decay, **kwargs)


def parse_lora_target(lora_target: str, model: nn.Module | None = None) -> str | list[str]:
    """'all-linear' stays as is (PEFT: every linear layer except the output head); else a name list.

    With a model, every listed name must match a module, so a typo fails here, not as a silent no-op.
    """
    text = (lora_target or "").strip()
    if text in ("all-linear", "all"):
        return "all-linear"
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("--lora_target is empty: give 'all-linear' or module names like q_proj,v_proj")
    if model is not None:
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [n for n in names if n not in present]
        if missing:
            linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(
                f"--lora_target {lora_target!r}: no module named {', '.join(missing)} in this model. "
                f"Its linear layers are: {', '.join(linear)} (or use all-linear)."
            )
    return names


def _apply_virtual_tokens(model, method_args):
    """prompt_tuning, prefix_tuning or p_tuning: N learned virtual tokens, the model frozen.

    PEFT prepends the virtual tokens' attention mask (all three) and -100 labels (prompt/P-tuning, whose
    virtual tokens are positions of the input) in its forward; sft.train.loss skips those positions.
    """
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, PromptTuningInit, get_peft_model

    kind, tokens = method_args.finetuning_type, method_args.num_virtual_tokens
    if tokens < 1:
        raise ValueError(f"--num_virtual_tokens {tokens}: must be >= 1 for {kind}")
    if kind == "prompt_tuning":
        # Starting from real token embeddings converges faster than a random soft prompt.
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens,
                                    prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
    elif kind == "prefix_tuning":
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens)
    else:  # p_tuning: PEFT's default MLP encoder, hidden size = the model's
        config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens)
    return get_peft_model(model, config)


# Llama-style attention/MLP names (Llama, Qwen2, Mistral, SmolLM2): IA3 scales keys, values and the input of
# down_proj (the feed-forward module, scaled on its input), as in the IA3 paper and PEFT's llama default.
IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]
IA3_FEEDFORWARD = ["down_proj"]


def _apply_ia3(model):
    """PEFT IA3 with PEFT's own target list for the model type, or Llama-style names for models it does not list."""
    from peft import IA3Config, get_peft_model
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    )

    model_type = getattr(model.config, "model_type", "")
    targets = TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type, IA3_TARGETS)
    feedforward = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, IA3_FEEDFORWARD)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if not set(targets) <= present:
        raise ValueError(f"--finetuning_type ia3: model type {model_type!r} has no modules named "
                         f"{', '.join(sorted(set(targets) - present))} (IA3 targets keys, values and the MLP's "
                         "down projection by these names); use --finetuning_type lora with --lora_target")
    return get_peft_model(model, IA3Config(task_type="CAUSAL_LM", target_modules=list(targets),
                                           feedforward_modules=list(feedforward)))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers (the ModuleList as long as config.num_hidden_layers)."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and name.endswith(("layers", "h", "blocks")):
            return module
    raise ValueError(
        f"--finetuning_type freeze: could not find the decoder layer list of {type(model).__name__} "
        f"(a ModuleList of num_hidden_layers={count} modules). Use --finetuning_type lora or full for this model."
    )


def _freeze_all_but_last_layers(model: nn.Module, trainable_layers: int, train_embeddings: bool) -> None:
    layers = decoder_layers(model)
    if not 1 <= trainable_layers <= len(layers):
        raise ValueError(
            f"--freeze_trainable_layers {trainable_layers}: this model has {len(layers)} layers; "
            f"choose 1..{len(layers)} (or --finetuning_type full to train everything)."
        )
    model.requires_grad_(False)
    for layer in layers[len(layers) - trainable_layers:]:
        layer.requires_grad_(True)
    if train_embeddings:
        model.get_input_embeddings().requires_grad_(True)
        output = model.get_output_embeddings()
        if output is not None:  # the same tensor when embeddings are tied
            output.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = param.numel()
        if hasattr(param, "quant_storage") or type(param).__name__ == "Params4bit":
            n *= 2  # bitsandbytes packs two 4-bit values per stored element
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def log_trainable_parameters(model: nn.Module, kind: str) -> str:
    trainable, total = count_parameters(model)
    line = (f"[{kind}] trainable parameters: {trainable:,} of {total:,} "
            f"({100.0 * trainable / max(total, 1):.4f}%)")
    logger.info(line)
    return line


# ------------------------------------------------------------------------------------- saving


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def save_final(model, tokenizer, output_dir: str | os.PathLike, method_args, trainer=None) -> Path:
    """Save the run's result in output_dir, loadable alone. Call on EVERY process when several run.

    With the run's Trainer, `trainer.save_model` writes it: every rank joins the gather of a sharded
    model (FSDP FULL_STATE_DICT, ZeRO-3 16-bit) and rank 0 writes plain safetensors; without one (a
    single process, tests) the model saves itself. PEFT methods: the adapter (adapter_config.json +
    adapter_model.safetensors) + tokenizer; with --save_merged also full merged weights + tokenizer in
    output_dir/merged. full/freeze: full weights + tokenizer. The tokenizer carries its chat template,
    so the folder is ready for inference.
    """
    out = Path(output_dir)
    if method_args.save_merged and (not is_peft_model(_unwrapped(model, trainer))
                                    or method_args.finetuning_type in VIRTUAL_TOKEN_METHODS):
        raise ValueError(
            f"--save_merged needs a LoRA-family run; this model ({type(model).__name__}, --finetuning_type "
            f"{method_args.finetuning_type}) has no LoRA adapter to merge. Drop --save_merged."
        )
    main = trainer is None or trainer.args.should_save
    if main:
        out.mkdir(parents=True, exist_ok=True)
    if _converts_lora_init(method_args) and not _sharded(trainer):
        # PiSSA/OLoRA trained against a rewritten (residual) base: save the change since the initial adapter
        # as a plain LoRA (rank 2r) on the untouched base, PEFT's documented conversion. (Under FSDP/ZeRO-3 the
        # raw adapter is saved, as in every checkpoint: PEFT re-derives the residual base when it loads it.)
        if main:
            _unwrapped(model, trainer).save_pretrained(
                out, path_initial_model_for_weight_conversion=str(out / LORA_INIT_DIR))
        _barrier()
    elif trainer is not None:
        trainer.save_model(str(out))  # collective under FSDP/ZeRO-3; writes on rank 0 only
        _barrier()  # every rank is done gathering before rank 0 goes on (merge, run_end.json)
    else:
        model.save_pretrained(out)
    if not main:
        return out
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if method_args.save_merged:
        base_config = _unwrapped(model, trainer).get_base_model().config
        dtype = str(getattr(base_config, "dtype", None) or "float32").replace("torch.", "")
        merge_adapter(out, out / MERGED_DIR, tokenizer, dtype=dtype)
    return out


def _sharded(trainer) -> bool:
    return trainer is not None and bool(getattr(trainer, "is_fsdp_enabled", False)
                                        or getattr(trainer, "is_deepspeed_enabled", False))


def _converts_lora_init(method_args) -> bool:
    return getattr(method_args, "lora_init", "default") in BASE_CHANGING_INITS


def save_lora_init(model, method_args, output_dir: str | os.PathLike) -> Path | None:
    """pissa/olora: save the adapter as initialised (before any step) in output_dir/lora_init; else nothing.

    save_final converts the trained adapter against it. Call on the main process after prepare_model, also
    on resume (the initialisation is deterministic: the same SVD/QR of the same base weights).
    """
    if not _converts_lora_init(method_args):
        return None
    target = Path(output_dir) / LORA_INIT_DIR
    model.save_pretrained(target)
    return target


def gathered_state_dict(trainer) -> dict:
    """The full (unsharded) state dict of the Trainer's model. Collective: call on every process.

    Under FSDP (FULL_STATE_DICT) and ZeRO-3 (16-bit gather) the tensors land on rank 0 (others get an
    empty dict or placeholders); without sharding it is the unwrapped model's own state dict.
    """
    engine_model = trainer.model_wrapped if getattr(trainer, "is_deepspeed_enabled", False) else trainer.model
    return trainer.accelerator.get_state_dict(engine_model)


def _unwrapped(model, trainer):
    return trainer.accelerator.unwrap_model(trainer.model) if trainer is not None else model


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
