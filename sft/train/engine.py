"""Which distributed engine a run really got, and FSDP2 on CPU (gloo) where accelerate would drop it.

accelerate 1.15 decides the engine in AcceleratorState: an FSDP plugin is kept only when the process
state is MULTI_GPU (or another accelerator family). On a machine without CUDA hf_sft.py runs on CPU,
the state is MULTI_CPU, and the plugin is dropped without a word: the model is wrapped in DDP and an
FSDP config "works" without sharding anything. torch's `fully_shard` itself runs on CPU with gloo,
so `apply_requested_engine` finishes what `accelerate launch` asked for (ACCELERATE_USE_FSDP and the
FSDP_* variables it exports): it switches the state to FSDP with the plugin built from those
variables, as AcceleratorState would on GPUs, before the Trainer prepares the model. Any other case
where the engine asked for is not the engine running gets a loud warning naming cause and fix.
DeepSpeed needs no such help: accelerate keeps DEEPSPEED on CPU (DeepSpeed's CPU accelerator, gloo)
unless accelerate itself is put in CPU mode (`accelerate launch --cpu` then exports no
ACCELERATE_USE_DEEPSPEED at all, so that case is invisible here: do not pass --cpu).

`EngineReport` writes `engine-rank{r}.json` at train begin and end (wrapper type, DTensor parameter
count, ZeRO stage and ZeRO parameter count, local/global parameter sizes, peak RSS): the tests read
it, so an FSDP or ZeRO-3 test cannot silently pass under DDP.
"""
from __future__ import annotations

import json
import logging
import os
import resource
from pathlib import Path

from packaging.version import Version
from transformers import TrainerCallback

from sft.config import training_arg

logger = logging.getLogger(__name__)


def requested_engine(environ=os.environ) -> str | None:
    """The engine `accelerate launch` was configured for: "fsdp", "deepspeed", or None (DDP / one process)."""
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    return None


def fallback_problem(requested: str | None, distributed_type: str, num_processes: int) -> str | None:
    """A loud message when the engine asked for is not the one running (None when they agree)."""
    if requested is None:
        return None
    running = distributed_type.split(".")[-1]
    if requested == "fsdp" and running == "FSDP" or requested == "deepspeed" and running == "DEEPSPEED":
        return None
    if requested == "deepspeed":
        # Observed with accelerate 1.15 + DeepSpeed 0.19.8: without CUDA, DeepSpeed picks its CPU
        # accelerator (gloo) and accelerate keeps DEEPSPEED, with one process or several. Only accelerate's
        # CPU mode turns it off.
        cause = ("accelerate's state was created in CPU mode (--cpu, use_cpu: true or ACCELERATE_USE_CPU), which "
                 "turns DeepSpeed off; DeepSpeed itself runs on CPU (its cpu accelerator, gloo)")
        fix = ("launch without --cpu / use_cpu: accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml "
               "--mixed_precision no hf_sft.py ... (on CPU)")
    elif num_processes <= 1:
        cause = "only one process is running, and accelerate enables sharding only with several"
        fix = "launch several: accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes N"
    else:
        cause = f"accelerate kept distributed_type {running} and dropped the FSDP plugin"
        fix = "launch with configs/accelerate/fsdp.yaml (GPUs) or configs/accelerate/fsdp_cpu_2proc.yaml (CPU)"
    return (f"!!! {requested.upper()} was requested (accelerate launch config) but the engine is {running}: the "
            f"model is NOT sharded. Cause: {cause}. Fix: {fix}.")


FSDP_CPU_MIN_TORCH = (2, 7)


def fsdp_cpu_problem(torch_version: str) -> str | None:
    """Why this torch cannot run FSDP2 on CPU processes (gloo), or None.

    torch 2.6's FSDP2 all-gathers through torch.cpu.Stream, which has no record_event there: every CPU run
    stops at the first forward with an AttributeError (found running the suite under torch 2.6.0; 2.7.1
    passes). CUDA runs use CUDA streams, which have it.
    """
    if Version(torch_version).release[:2] >= FSDP_CPU_MIN_TORCH:
        return None
    return (f"FSDP on CPU processes needs torch >= {'.'.join(map(str, FSDP_CPU_MIN_TORCH))}; this is torch "
            f"{torch_version}, whose FSDP2 all-gathers through a CPU stream without record_event. Upgrade torch "
            "(pip install 'torch>=2.7,<2.14'), or train on CPU with DDP (accelerate launch without the FSDP "
            "config); FSDP on CUDA GPUs is not affected")


def apply_requested_engine(trainer) -> str:
    """Call right after building the Trainer, on every process; returns the engine name that will run."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    requested = requested_engine()
    if requested == "fsdp" and state.distributed_type == DistributedType.MULTI_CPU:
        import torch

        problem = fsdp_cpu_problem(torch.__version__)
        if problem:
            raise ValueError(problem)
        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch exported
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        # What AcceleratorState.__init__ does for MULTI_GPU + an FSDP plugin, done for MULTI_CPU.
        AcceleratorState._shared_state.update(distributed_type=DistributedType.FSDP, fsdp_plugin=plugin)
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        trainer.is_fsdp_enabled = True
        if plugin.activation_checkpointing and training_arg(trainer.args, "activation_checkpointing"):
            raise ValueError("FSDP's activation checkpointing (fsdp_activation_checkpointing) and "
                             "--activation_checkpointing are both on: turn one off (--activation_checkpointing false)")
        if trainer.args.process_index == 0:
            logger.warning("FSDP%s on CPU (gloo): accelerate keeps MULTI_CPU and would run DDP; the state is switched "
                           "to FSDP with the launch config's plugin", plugin.fsdp_version)
    problem = fallback_problem(requested, str(state.distributed_type), state.num_processes)
    if problem:
        logger.warning(problem)
        if trainer.args.process_index == 0:
            print(problem, flush=True)
    return str(state.distributed_type).split(".")[-1]


def engine_facts(model) -> dict:
    """What wraps the model and how its parameters are held, on this process."""
    from accelerate.state import AcceleratorState
    from torch.distributed.tensor import DTensor

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # older torch
        FSDPModule = ()
    params = list(model.parameters()) if model is not None else []
    dtensors = [p for p in params if isinstance(p, DTensor)]
    zero = [p for p in params if hasattr(p, "ds_id")]  # DeepSpeed ZeRO-3 parameters (partitioned)
    state = AcceleratorState()
    plugin = getattr(state, "fsdp_plugin", None)
    deepspeed = getattr(state, "deepspeed_plugin", None)

    def local(p) -> int:
        if isinstance(p, DTensor):
            return p.to_local().numel()
        return p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()

    return {
        "distributed_type": str(state.distributed_type).split(".")[-1],
        "fsdp_version": getattr(plugin, "fsdp_version", None),
        "zero_stage": getattr(deepspeed, "zero_stage", None),
        "wrapper": type(model).__name__,
        "fsdp_module": isinstance(model, FSDPModule) if FSDPModule else False,
        "parameters": len(params),
        "dtensor_parameters": len(dtensors),
        "zero_parameters": len(zero),
        # Small ZeRO-3 parameters (below stage3_param_persistence_threshold) stay gathered between steps.
        "zero_gathered_parameters": sum(getattr(p.ds_status, "name", "") == "AVAILABLE" for p in zero),
        "local_numel": sum(local(p) for p in params),
        "global_numel": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


class EngineReport(TrainerCallback):
    """Writes output_dir/engine-rank{r}.json at train begin and end; rank 0 logs it once."""

    def _write(self, args, model, moment: str) -> None:
        facts = {"moment": moment, **engine_facts(model)}
        path = Path(args.output_dir) / f"engine-rank{args.process_index}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(facts, indent=2) + "\n")
        if args.process_index == 0:
            logger.info("Engine at train %s: %s", moment, facts)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._write(args, model, "begin")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._write(args, model, "end")


# Config fields that mark a mixture-of-experts model: a router sends each token to a few experts, so a
# micro-batch can leave an expert (and its LoRA adapters) without a gradient.
MOE_CONFIG_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def ddp_find_unused_parameters(model, requested: bool | None = None) -> bool:
    """DDP's find_unused_parameters for this model: False where every trainable parameter gets a gradient.

    The Trainer's default is True for a PEFT model (and for any model without gradient checkpointing),
    which costs a traversal of the autograd graph every step. Here the loss (sft.train.loss) keeps the
    whole model in the graph even for a micro-batch without supervised tokens, so for a dense model every
    trainable parameter (full, freeze, LoRA/DoRA/QLoRA adapters, prompt-tuning embeddings) is used in every
    forward: False. A mixture-of-experts model may route no token to an expert: True. An explicit
    --ddp_find_unused_parameters (requested) wins.
    """
    if requested is not None:
        return requested
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    experts = [getattr(config, name, None) for name in MOE_CONFIG_FIELDS]
    return any(isinstance(n, int) and n > 1 for n in experts)
