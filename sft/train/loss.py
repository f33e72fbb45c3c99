"""Token-level causal-LM loss that never holds full-vocabulary logits for a whole batch.

The plain HF path computes `lm_head` for every position (batch x seq x vocab; 2.5 GB in fp32 for
one 4096-token row of Qwen's 151,936-token vocabulary), upcasts it, and keeps the softmax for
backward. Here the model is asked for its final hidden state and for logits at one position only;
the loss function then projects only the positions whose (shifted) label is supervised, in chunks,
recomputing each chunk's logits during backward instead of storing them.

Normalization: the sum of token losses is divided by `num_items_in_batch`, which the HF Trainer (v5)
sets to the number of supervised *shifted* labels (`labels[..., 1:] != -100`) over the whole
gradient-accumulation window, gathered over all processes when `average_tokens_across_devices=True`
(the default). The Trainer then skips its own division by the accumulation steps (because a
`compute_loss_func` is set) and multiplies by the world size to undo DDP's gradient averaging, so
the applied gradient is the mean over every supervised token of the optimizer step:
batch 4 x accumulation 1 equals batch 1 x accumulation 4.

Wiring (sft.train.run; sft.train.collator.training_collator adds `loss_model_kwargs()` to each batch):

    trainer = Trainer(..., data_collator=training_collator(stats, sample_log),
                      compute_loss_func=make_loss_func(model, autocast_dtype=torch.bfloat16 if bf16 else None))
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sft.tokens.encoding import IGNORE_INDEX

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1024


def loss_model_kwargs() -> dict[str, Any]:
    """Extra model inputs the loss needs: the final (post-norm) hidden state, and logits for one position only.

    `output_hidden_states=-1` asks transformers 5 to keep only the last entry of the hidden-state tuple
    (which it ties to the post-norm `last_hidden_state`); under accelerate's mixed precision every
    returned hidden state is copied to fp32, so asking for all layers would cost layers x tokens x hidden.
    """
    return {"output_hidden_states": -1, "logits_to_keep": 1}


def make_loss_func(
    model: torch.nn.Module,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    autocast_dtype: torch.dtype | None = None,
) -> Callable[..., torch.Tensor]:
    """Build a `compute_loss_func(outputs, labels, num_items_in_batch=None) -> loss` for the HF Trainer.

    model: the model being trained (plain, PEFT-wrapped, tied or untied embeddings); its output
        embeddings module is called directly, so LoRA/modules_to_save wrappers on lm_head still apply.
    chunk_size: supervised positions projected to the vocabulary at once; peak extra memory is about
        3 x chunk_size x vocab x 4 bytes.
    autocast_dtype: dtype for the lm_head matmul, e.g. torch.bfloat16 when training with --bf16. The
        Trainer runs compute_loss_func outside the autocast that accelerate wraps around model.forward,
        so without it the projection runs in the weights' dtype. Logits are upcast to fp32 per chunk.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"make_loss_func: chunk_size={chunk_size!r}; expected a positive int such as 1024")
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(
            f"make_loss_func: {type(model).__name__}.get_output_embeddings() returned None; the chunked loss "
            "needs a causal LM with an lm_head (e.g. *ForCausalLM, or a PEFT model wrapping one)"
        )
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    if getattr(config, "logit_scale", None) not in (None, 1.0):
        raise ValueError(
            f"make_loss_func: the model config has logit_scale={config.logit_scale}, which this loss does not "
            "apply; train this model without compute_loss_func (the plain HF loss)"
        )
    virtual_tokens = _virtual_token_count(model)
    checked = {"head": False, "full_logits_warned": False}

    def chunk_logits(hidden: torch.Tensor) -> torch.Tensor:
        autocast = (
            torch.autocast(device_type=hidden.device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            logits = head(hidden)
        logits = logits.float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return logits

    def chunk_loss_sum(hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(chunk_logits(hidden), targets, reduction="sum")

    def compute_loss_func(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        hidden = final_hidden_state(outputs)
        if labels is None:
            raise ValueError("compute_loss_func got labels=None: the batch must carry 'labels' (use the sft collators)")
        if hidden.shape[1] == labels.shape[1] + virtual_tokens:
            hidden = hidden[:, virtual_tokens:]  # PEFT prompt tuning prepends its virtual tokens
        if labels.shape != hidden.shape[:2]:
            raise ValueError(
                f"compute_loss_func: labels shape {tuple(labels.shape)} does not match the hidden states "
                f"{tuple(hidden.shape[:2])} (batch, sequence); labels must be aligned with input_ids, unshifted"
            )
        if not checked["head"]:
            _check_head_reproduces_logits(outputs, hidden, chunk_logits, checked)
            checked["head"] = True

        # Position t predicts label t+1; gather only the supervised predictions (packed rows included:
        # the batching stage masks each sample's first label, so no prediction crosses a boundary).
        targets = labels[:, 1:].to(hidden.device)
        supervised = targets != IGNORE_INDEX
        picked_hidden = hidden[:, :-1][supervised]
        picked_targets = targets[supervised]

        if picked_targets.numel() == 0:
            # A zero loss still attached to the graph through the layers and the lm_head: backward gives
            # zero gradients instead of failing, and DDP still sees every parameter used (untied heads too).
            return chunk_logits(hidden[:, -1]).sum() * 0.0
        total = torch.zeros((), device=hidden.device)
        recompute = torch.is_grad_enabled() and picked_hidden.requires_grad
        for start in range(0, picked_targets.numel(), chunk_size):
            chunk = (picked_hidden[start : start + chunk_size], picked_targets[start : start + chunk_size])
            if recompute:
                # Recomputing the chunk in backward means its vocab-sized logits are never kept alive.
                total = total + checkpoint(chunk_loss_sum, *chunk, use_reentrant=False)
            else:
                total = total + chunk_loss_sum(*chunk)
        return total / _denominator(num_items_in_batch, picked_targets.numel(), total.device)

    return compute_loss_func


def final_hidden_state(outputs: Any) -> torch.Tensor:
    """The post-norm last hidden state from a model output made with `loss_model_kwargs()`."""
    hidden_states = outputs.get("hidden_states") if hasattr(outputs, "get") else None
    if not hidden_states:
        raise ValueError(
            "compute_loss_func: the model output has no hidden_states. The batch must ask for them: add "
            "sft.train.loss.loss_model_kwargs() to the inputs (sft.train.collator.training_collator does)"
        )
    return hidden_states[-1]


def _virtual_token_count(model: torch.nn.Module) -> int:
    """Positions a PEFT prompt-tuning / p-tuning model prepends to every row (0 for other models)."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is None or not getattr(peft_config, "is_prompt_learning", False):
        return 0
    if str(getattr(peft_config, "peft_type", "")).endswith("PREFIX_TUNING"):
        return 0  # prefix tuning extends the KV cache, not the hidden states
    return int(peft_config.num_virtual_tokens)


def _denominator(num_items_in_batch: Any, batch_count: int, device: torch.device) -> torch.Tensor:
    # The Trainer's count covers the whole accumulation window (and all ranks); without it (e.g. a
    # direct call) use this batch's count. Clamp at 1: a window with no supervised tokens gives 0, not NaN.
    count = batch_count if num_items_in_batch is None else num_items_in_batch
    if torch.is_tensor(count):
        if count.numel() != 1:
            raise ValueError(
                f"compute_loss_func: num_items_in_batch has shape {tuple(count.shape)}; expected a scalar. "
                "torch DataParallel (several GPUs in one process) is not supported: launch with torchrun/accelerate"
            )
        return count.to(device=device, dtype=torch.float32).reshape(()).clamp(min=1)
    return torch.tensor(float(max(int(count), 1)), device=device)


def _check_head_reproduces_logits(
    outputs: Any, hidden: torch.Tensor, chunk_logits: Callable, state: dict
) -> None:
    """Once per loss function: the model's own last-position logits must equal head(hidden[-1]).

    This catches a model whose hidden_states[-1] is taken before the final norm, or that transforms
    logits after lm_head in a way this loss does not reproduce - either would silently train wrong.
    """
    logits = outputs.get("logits")
    if logits is None or logits.dim() != 3 or logits.shape[0] != hidden.shape[0]:
        return  # nothing comparable (e.g. a custom logits_to_keep mask flattened the batch)
    if logits.shape[1] != 1 and not state["full_logits_warned"]:
        state["full_logits_warned"] = True
        logger.warning(
            "compute_loss_func: the model computed logits for all %d positions; pass logits_to_keep=1 "
            "(sft.train.loss.loss_model_kwargs) so full-vocabulary logits are not materialized", logits.shape[1]
        )
    with torch.no_grad():
        ours = chunk_logits(hidden[:, -1].detach())
        theirs = logits[:, -1].detach().float()
        tolerance = 2e-2 * (1.0 + theirs.abs().max().item())
        error = (ours - theirs).abs().max().item()
    if error > tolerance:
        raise ValueError(
            f"compute_loss_func: lm_head(hidden_states[-1]) differs from the model's logits by {error:.3g} "
            f"(tolerance {tolerance:.3g}). This model's last hidden state is probably taken before its final "
            "norm, or its logits are post-processed; train it without compute_loss_func (the plain HF loss)"
        )
