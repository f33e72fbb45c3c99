"""Token-level causal-LM loss computed inside the model's forward, never holding full-vocabulary logits.

The plain HF path computes `lm_head` for every position (batch x seq x vocab; 2.5 GB in fp32 for
one 4096-token row of Qwen's 151,936-token vocabulary), upcasts it, and keeps the softmax for
backward. Here the output head projects only the positions whose (shifted) label is supervised, in
chunks, and each chunk's logits are turned at once into its loss AND its gradients
(sft.train.linear_cross_entropy: logits, softmax - onehot, dh = g @ W, dW += g.T @ h; three
vocab-sized matmuls per chunk, against four for checkpoint-and-recompute). The backward only scales
the saved dh / dW by the incoming scalar: it never reads the head's weight and recomputes nothing.

Memory beyond the model: about 2 x chunk_size x vocab x 4 bytes for one chunk's logits and gradient
(plus the chunk in the autocast dtype), and, when the head is trained, dW in fp32 while chunks run,
then in the weight's dtype until the backward (the size of the head's gradient, allocated earlier than
autograd would). A frozen head (LoRA, prompt tuning) has no dW. Matmuls run in the autocast dtype
(or the weight's), log-softmax in fp32.

Where it runs (why it is in the forward): a sharding engine gathers a module's weights only while
that module runs. FSDP2 (accelerate) puts the final norm and `lm_head` (and the tied embedding) in one
unit; DeepSpeed ZeRO-3 gathers each module's weights in its forward hooks and partitions them again
after. A loss that calls `lm_head` after the forward either re-enters those hooks once per chunk
(FSDP2: a second post-backward hook that frees the norm's weights before the norm's own backward;
ZeRO-3: one gather per chunk, and the chunk count follows each rank's supervised tokens, so ranks
issue different numbers of collectives and hang); a loss that recomputes chunk logits in backward
reads the ZeRO-3 head weight after it was partitioned (an empty tensor: "size mismatch ... vec (0)").
So `attach_chunked_loss` replaces the head's `forward` (the module stays, with its parameter names
and the engine's hooks): in a forward that carries labels, the ONE head call the model makes anyway
computes every chunk's loss and gradients while the engine has the head gathered. Collectives per
micro-batch are therefore the same on every rank by construction (one head call, whatever the
number of supervised tokens), and nothing touches the head after its forward. The loss leaves the
head through its output (`logits + 0 * ...` carries it), so an engine's pre-backward hook on the
head's output (FSDP2, ZeRO-3) fires for the head's own one-position `logits` output.

A head that is not a plain Linear (PEFT's LoRA on lm_head, `modules_to_save`, a quantized linear) has
no single weight to fuse: its chunks go through the wrapper's forward under activation checkpointing
and are recomputed in backward (four matmuls per chunk). That is correct under DDP and FSDP2 (the
head unit stays gathered for backward) but not under ZeRO-3, which is refused with a clear error.

Normalization: the sum of token losses is divided by `num_items_in_batch`, which the HF Trainer (v5)
passes to the model (it accepts loss kwargs) as the number of supervised *shifted* labels
(`labels[..., 1:] != -100`) over the whole gradient-accumulation window, gathered over all processes
when `average_tokens_across_devices=True` (the default). The Trainer then skips its own division by
the accumulation steps and multiplies by the world size to undo the engine's gradient averaging, so
the applied gradient is the mean over every supervised token of the optimizer step: batch 4 x
accumulation 1 equals batch 1 x accumulation 4. Without `num_items_in_batch` (evaluation, a direct
call) the batch's own count is used.

Kernel (`fused_loss`): on a CUDA device with liger-kernel installed, the plain-Linear case calls Liger
Kernel's LigerFusedLinearCrossEntropyLoss (Triton; it also computes the gradients in its forward, so the
engine argument above holds) on every position of the micro-batch with IGNORE_INDEX targets: no
boolean-mask gather, so no device sync per micro-batch. Elsewhere (CPU, no liger-kernel, a wrapped head)
the chunked torch path below runs. `choose_fused_loss` decides; `--fused_loss auto|liger|chunked`.

Wiring (sft.train.run):

    attach_chunked_loss(model, fused_loss=choose_fused_loss("auto", args.device.type))  # before the Trainer wraps it
    trainer = Trainer(model=model, ...) # no compute_loss_func: the model returns the loss
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sft.tokens.encoding import IGNORE_INDEX
from sft.train.linear_cross_entropy import linear_cross_entropy_sum

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1024
FUSED_LOSSES = ("auto", "liger", "chunked")


def liger_available() -> bool:
    """liger-kernel is importable (an optional dependency: GPU machines only)."""
    return importlib.util.find_spec("liger_kernel") is not None


def choose_fused_loss(requested: str, device_type: str) -> str:
    """--fused_loss and the training device -> "liger" or "chunked".

    auto: liger on CUDA when liger-kernel is installed, else chunked. liger: refused (ValueError naming the
    flag and the fix) off CUDA or without the package. chunked: always chunked.
    """
    if requested not in FUSED_LOSSES:
        raise ValueError(f"--fused_loss {requested!r}: expected one of {', '.join(FUSED_LOSSES)}")
    if requested == "chunked":
        return "chunked"
    if device_type != "cuda":
        if requested == "liger":
            raise ValueError(f"--fused_loss liger needs a CUDA device (Liger's kernels are Triton); this run trains "
                             f"on {device_type}: use --fused_loss auto or chunked")
        return "chunked"
    if not liger_available():
        if requested == "liger":
            raise ValueError("--fused_loss liger: the liger-kernel package is not installed: pip install "
                             "liger-kernel, or use --fused_loss auto (falls back to the chunked loss)")
        return "chunked"
    return "liger"


@dataclass
class ChunkedLoss:
    """The hooks `attach_chunked_loss` installed; `remove()` restores the model's own loss."""

    model: torch.nn.Module
    head: torch.nn.Module
    chunk_size: int
    virtual_tokens: int = 0
    softcap: float | None = None
    pending: dict | None = None  # labels/num_items of the forward in progress, then its loss
    head_checked: bool = False
    fused_loss: str = "chunked"  # "liger" or "chunked" (choose_fused_loss)
    liger_loss: Any = None  # the LigerFusedLinearCrossEntropyLoss module, made on first use
    chunks_run: list = field(default_factory=list)  # chunks per forward, for tests and reports
    handles: list = field(default_factory=list)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.head.__dict__.pop("forward", None)  # back to the class's forward
        self.head.__dict__.pop("_sft_original_forward", None)
        self.handles.clear()
        self.model.__dict__.pop("_sft_chunked_loss", None)

    def __enter__(self) -> "ChunkedLoss":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attach_chunked_loss(model: torch.nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE,
                        fused_loss: str = "chunked") -> ChunkedLoss:
    """Make `model(..., labels=L, num_items_in_batch=N).loss` the chunked supervised-only loss.

    model: the top-level model the Trainer calls (plain, PEFT-wrapped, tied or untied embeddings);
        attach before an engine wraps it. Without labels the model behaves as before (generation).
    chunk_size: supervised positions projected to the vocabulary at once; peak extra memory is about
        2 x chunk_size x vocab x 4 bytes, plus the head's gradient (fp32) when the head is trained.
    fused_loss: "chunked", or "liger" (Liger Kernel's fused linear cross-entropy for a plain-Linear head;
        see choose_fused_loss).
    Returns the handle (also a context manager) whose `remove()` undoes it.
    """
    if fused_loss not in ("liger", "chunked"):
        raise ValueError(f"attach_chunked_loss: fused_loss={fused_loss!r}; expected 'liger' or 'chunked' "
                         "(choose_fused_loss resolves 'auto')")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"attach_chunked_loss: chunk_size={chunk_size!r}; expected a positive int such as 1024")
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(
            f"attach_chunked_loss: {type(model).__name__}.get_output_embeddings() returned None; the chunked loss "
            "needs a causal LM with an lm_head (e.g. *ForCausalLM, or a PEFT model wrapping one)"
        )
    config = getattr(model, "config", None)
    if getattr(config, "logit_scale", None) not in (None, 1.0):
        raise ValueError(
            f"attach_chunked_loss: the model config has logit_scale={config.logit_scale}, which this loss does not "
            "apply; train this model with its own HF loss"
        )
    old = getattr(model, "_sft_chunked_loss", None)
    if old is not None:
        old.remove()
    state = ChunkedLoss(model=model, head=head, chunk_size=chunk_size, virtual_tokens=_virtual_token_count(model),
                        softcap=getattr(config, "final_logit_softcapping", None), fused_loss=fused_loss)
    # The head's own forward (LoRA/modules_to_save wrappers included), not an earlier attach's patch
    # (full_then_lora attaches again to the PEFT model around the same head).
    original_forward = head.__dict__.get("_sft_original_forward") or head.forward
    head.__dict__["_sft_original_forward"] = original_forward
    head.forward = lambda hidden, *args, **kwargs: _head_forward(state, original_forward, hidden, *args, **kwargs)
    state.handles.append(model.register_forward_pre_hook(
        lambda module, args, kwargs: _take_labels(state, args, kwargs), with_kwargs=True))
    state.handles.append(model.register_forward_hook(lambda module, args, output: _put_loss(state, output)))
    model.__dict__["_sft_chunked_loss"] = state
    return state


def _take_labels(state: ChunkedLoss, args: tuple, kwargs: dict):
    """Top-level pre-forward: keep labels (and the window's token count) away from the model's own loss."""
    labels = kwargs.pop("labels", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    if labels is None:
        state.pending = None
        return args, kwargs
    state.pending = {"labels": labels, "num_items": num_items, "loss_sum": None}
    kwargs["logits_to_keep"] = 0  # the head gets every position; it projects only the supervised ones
    kwargs.pop("output_hidden_states", None)
    return args, kwargs


def _put_loss(state: ChunkedLoss, output: Any):
    """Top-level post-forward: the loss the head computed, normalized, as `output.loss`."""
    pending, state.pending = state.pending, None
    if pending is None:
        return output
    if pending["loss_sum"] is None:
        raise ValueError(
            f"attach_chunked_loss: {type(state.model).__name__}'s forward never called its output head "
            f"({type(state.head).__name__}); this model cannot use the chunked loss"
        )
    loss_sum, carrier, count = pending["loss_sum"], pending["carrier"], pending["count"]
    if not state.head_checked:
        _check_head_reproduces_logits(output, pending["last_logits"])
        state.head_checked = True
    # `carrier` is the head's output: routing the loss through it puts the engine's pre-backward hook
    # (registered on module outputs) on the loss's path.
    loss = (loss_sum + 0.0 * carrier.float().sum()) / _denominator(pending["num_items"], count, loss_sum.device)
    output["loss"] = loss
    return output


def _head_forward(state: ChunkedLoss, original_forward, hidden: torch.Tensor, *args, **kwargs):
    pending = state.pending
    if pending is None or pending["loss_sum"] is not None:
        return original_forward(hidden, *args, **kwargs)  # generation, or a second head call
    labels = pending["labels"]
    if hidden.shape[1] == labels.shape[1] + state.virtual_tokens:
        hidden = hidden[:, state.virtual_tokens:]  # PEFT prompt tuning prepends its virtual tokens
    if labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"chunked loss: labels shape {tuple(labels.shape)} does not match the hidden states "
            f"{tuple(hidden.shape[:2])} (batch, sequence); labels must be aligned with input_ids, unshifted"
        )

    def chunk_logits(h: torch.Tensor) -> torch.Tensor:
        logits = original_forward(h, *args, **kwargs).float()
        if state.softcap is not None:
            logits = state.softcap * torch.tanh(logits / state.softcap)
        return logits

    def chunk_loss_sum(h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(chunk_logits(h), targets, reduction="sum")

    # Position t predicts label t+1 (packed rows included: the batching stage masks each sample's first
    # label, so no prediction crosses a boundary).
    targets = labels[:, 1:].to(hidden.device)
    linear = _plain_linear(state.head) if not args and not kwargs else None
    if state.fused_loss == "liger" and linear is not None:
        return _liger_head_forward(state, pending, original_forward, linear, hidden, targets)
    # Gather only the supervised predictions.
    supervised = targets != IGNORE_INDEX
    picked_hidden = hidden[:, :-1][supervised]
    picked_targets = targets[supervised]
    last = original_forward(hidden[:, -1:], *args, **kwargs)  # the model's logits output, one position
    # A zero loss is still attached to the graph through the layers and the head (via `last`), so an
    # empty micro-batch gives zero gradients and DDP/FSDP still see every parameter used.
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    count = picked_targets.numel()
    chunks = -(-count // state.chunk_size)
    if count and linear is not None:
        # Loss and gradients in this forward, while the engine holds the head's weight (no recompute).
        device_type = hidden.device.type
        compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                         else linear.weight.dtype)
        total = linear_cross_entropy_sum(picked_hidden, linear.weight, linear.bias, picked_targets,
                                         state.chunk_size, compute_dtype, state.softcap)
    else:
        # A PEFT-wrapped head (LoRA on lm_head, modules_to_save) has no single weight to fuse: each chunk's
        # logits come from the wrapper's forward and are recomputed in backward. Correct for DDP and
        # FSDP2 (the head unit stays gathered for backward), NOT under ZeRO-3, which partitions the head's
        # weight after the forward: refused there.
        recompute = torch.is_grad_enabled() and picked_hidden.requires_grad
        if recompute and any(hasattr(p, "ds_id") for p in state.head.parameters()):
            raise ValueError(
                f"chunked loss: the output head is a {type(state.head).__name__} (not a plain Linear) under DeepSpeed "
                "ZeRO-3, whose weights are partitioned again before the backward would recompute its logits; "
                "do not wrap lm_head (LoRA target / modules_to_save) with ZeRO-3, or use ZeRO-2 or FSDP2")
        for start in range(0, count, state.chunk_size):
            chunk = (picked_hidden[start : start + state.chunk_size], picked_targets[start : start + state.chunk_size])
            if recompute:
                # Recomputing the chunk in backward means its vocab-sized logits are never kept alive.
                total = total + checkpoint(chunk_loss_sum, *chunk, use_reentrant=False)
            else:
                total = total + chunk_loss_sum(*chunk)
    state.chunks_run.append(chunks)
    del state.chunks_run[:-64]
    with torch.no_grad():
        ours = chunk_logits(hidden[:, -1].detach())
    pending.update(loss_sum=total, carrier=last, count=int(count), last_logits=ours)
    return last


def _liger_head_forward(state: ChunkedLoss, pending: dict, original_forward, linear: torch.nn.Linear,
                        hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The head's forward with Liger's fused linear cross-entropy: every position, IGNORE_INDEX skipped in the
    kernel, so nothing here waits for the device (the supervised count stays a tensor)."""
    if state.liger_loss is None:
        liger = importlib.import_module("liger_kernel.transformers")
        options = dict(ignore_index=IGNORE_INDEX, reduction="sum", softcap=state.softcap)
        try:  # the head's gradient accumulated over chunks in fp32, as the chunked path does (liger-kernel >= 0.6)
            state.liger_loss = liger.LigerFusedLinearCrossEntropyLoss(**options, accum_dtype=torch.float32)
        except TypeError:
            state.liger_loss = liger.LigerFusedLinearCrossEntropyLoss(**options)
        logger.info("loss: Liger Kernel's fused linear cross-entropy (--fused_loss)")
    device_type = hidden.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else linear.weight.dtype)
    flat_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1]).to(compute_dtype)
    flat_targets = targets.reshape(-1)
    # Liger's kernel is not autocast-aware: hidden and weight in one dtype (the cast's backward gives the
    # fp32 master weight its gradient).
    with torch.autocast(device_type, enabled=False):
        total = state.liger_loss(linear.weight.to(compute_dtype), flat_hidden, flat_targets,
                                 None if linear.bias is None else linear.bias.to(compute_dtype))
    if isinstance(total, tuple):  # versions that can also return a z-loss
        total = total[0]
    last = original_forward(hidden[:, -1:])
    state.chunks_run.append(1)
    del state.chunks_run[:-64]
    with torch.no_grad():
        ours = original_forward(hidden[:, -1].detach()).float()
        if state.softcap is not None:
            ours = state.softcap * torch.tanh(ours / state.softcap)
    pending.update(loss_sum=total.float(), carrier=last, count=(flat_targets != IGNORE_INDEX).sum(),
                   last_logits=ours)
    return last


def _plain_linear(head: torch.nn.Module) -> torch.nn.Linear | None:
    """The head if it computes exactly `F.linear(x, weight, bias)` (an engine's subclass such as FSDP2's
    FSDPLinear included), else None (PEFT wrappers, quantized linears): those take the recompute path."""
    if isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward:
        return head
    return None


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
                f"chunked loss: num_items_in_batch has shape {tuple(count.shape)}; expected a scalar. "
                "torch DataParallel (several GPUs in one process) is not supported: launch with torchrun/accelerate"
            )
        return count.to(device=device, dtype=torch.float32).reshape(()).clamp(min=1)
    return torch.tensor(float(max(int(count), 1)), device=device)


def _check_head_reproduces_logits(output: Any, ours: torch.Tensor) -> None:
    """Once per attach: the model's own last-position logits must equal our head(hidden[-1]).

    This catches a model that transforms logits after its head in a way this loss does not
    reproduce (other than Gemma's softcapping, which it applies) - it would silently train wrong.
    """
    logits = output.get("logits") if hasattr(output, "get") else None
    if logits is None or logits.dim() != 3 or logits.shape[0] != ours.shape[0]:
        return
    theirs = logits[:, -1].detach().float()
    tolerance = 2e-2 * (1.0 + theirs.abs().max().item())
    error = (ours.to(theirs.device) - theirs).abs().max().item()
    if error > tolerance:
        raise ValueError(
            f"chunked loss: the output head reproduces the model's logits only to {error:.3g} (tolerance "
            f"{tolerance:.3g}): this model post-processes its logits; train it with its own HF loss"
        )
