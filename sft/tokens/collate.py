"""Encoded samples -> model batches: padded, or packed without padding (which samples go together
is sft.tokens.plan.plan_batches).

    pad_collate([s1, s2], tokenizer)             # {"input_ids": (B, L), "labels": (B, L), "attention_mask": (B, L)}
    pack_collate([s1, s2])                       # {"input_ids": (1, T), "labels", "position_ids", "use_cache": False}
    pack_collate([s1, s2], flash_kwargs=True)    # ... plus cu_seq_lens_q/k (int32) and max_length_q/k (int)
    pack_collate([s1, s2, s3], pad_id=0)         # rows as long as the longest sample, (R, max length)

A sample is an EncodedSample or a mapping with "input_ids" and "labels" (what a datasets row holds).

Packing isolation: in one packed row, position_ids restart at 0 for each sample and there is no
attention_mask. transformers (checked on 5.23, masking_utils.find_packed_sequence_indices) then
builds a block-diagonal causal mask from the position_ids, so no sample attends to another, but
only when past_key_values is None: the model must be called with use_cache=False (a model in
train mode still creates a DynamicCache when config.use_cache is True, and the samples then leak).
pack_collate puts use_cache=False into the batch for that reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from sft.tokens.encoding import IGNORE_INDEX
from sft.tokens.template import TURN_END_TOKENS


@dataclass
class StreamOptions:
    batch_size: int = 4
    shuffle_buffer: int = 1000
    group_by_length: bool = True
    packing: bool = False
    pack_one_row: bool = False  # packing: one row per micro-batch (flash attention) instead of rows of the longest
    flash_kwargs: bool = False  # one-row packing for flash attention: add cu_seq_lens_q/k and max_length_q/k
    max_length: int = 1024
    pad_to_multiple_of: int | None = None
    seed: int = 42
    skip_first: int = 0  # records of the first source held out for validation (--val_size)
    batch_tokens: int | None = None  # with group_by_length: padded tokens per micro-batch instead of batch_size
    balance_batches: bool = True  # with group_by_length: batch_size samples on average, ~equal padded tokens each


def _ids_labels(sample: Any) -> tuple[list[int], list[int]]:
    if isinstance(sample, Mapping):
        return list(sample["input_ids"]), list(sample["labels"])
    return list(sample.input_ids), list(sample.labels)


# ------------------------------------------------------------------------------------- padding


def checked_pad_id(tokenizer) -> int:
    """tokenizer.pad_token_id, refused when it is the eos/turn-end token that answers are trained to end with."""
    pad = tokenizer.pad_token_id
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if pad is None:
        raise ValueError(f"Tokenizer '{name}' has no pad token; load it with sft.models.load_tokenizer, which sets one.")
    ends = {tokenizer.eos_token_id, *(tokenizer.convert_tokens_to_ids(t) for t in TURN_END_TOKENS
                                      if t in tokenizer.get_added_vocab())}
    if pad in ends:
        raise ValueError(f"Tokenizer '{name}' pads with id {pad} ({tokenizer.pad_token!r}), the token that ends an "
                         "assistant turn: the model would never learn to stop. Set a different pad token "
                         "(sft.models.ensure_pad_token picks one).")
    return pad


def pad_collate(samples: list, tokenizer, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample (rounded up to pad_to_multiple_of); labels IGNORE_INDEX on padding.

    [[1, 2, 3], [4]] with pad 0 -> input_ids [[1, 2, 3], [4, 0, 0]], attention_mask [[1, 1, 1], [1, 0, 0]]
    """
    if not samples:
        raise ValueError("pad_collate got an empty batch")
    pad = checked_pad_id(tokenizer)
    pairs = [_ids_labels(s) for s in samples]
    for i, (_, labels) in enumerate(pairs):
        if pad in labels:
            raise ValueError(f"sample {i} of the batch trains the pad token id {pad}; pick a pad token that "
                             "never appears in answers (sft.models.ensure_pad_token)")
    width = max(len(ids) for ids, _ in pairs)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(pairs):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(labs)] = torch.tensor(labs, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def padding_fraction(batch: Mapping[str, Any]) -> float:
    """Share of the batch's positions that are padding."""
    total = torch.as_tensor(batch["input_ids"]).numel()
    mask = batch.get("attention_mask")
    if mask is None:
        return batch.get("padding_tokens", 0) / total
    return 1.0 - float(mask.sum()) / total


# ------------------------------------------------------------------------------------- packing


def pack_collate(samples: list, pad_id: int | None = None, flash_kwargs: bool = False) -> dict[str, Any]:
    """Samples -> packed rows; position_ids restart at 0 for each sample, so none sees another.

    One row (pad_id None): all samples concatenated, no padding at all (for flash-attention kernels,
    which take variable-length sequences only in a batch of one row):
        [[1, 2, 3], [4, 5]] -> input_ids [[1, 2, 3, 4, 5]], position_ids [[0, 1, 2, 0, 1]]
    Several rows (pad_id given; for sdpa/eager, whose attention is quadratic in the row length): rows
    as long as the longest sample, filled first-fit-decreasing, each row's tail filled with a pad
    segment that is a sequence of its own (position_ids restart, labels IGNORE_INDEX):
        [[1, 2, 3], [4], [5, 6]], pad 0 -> input_ids [[1, 2, 3], [5, 6, 4]], position_ids [[0, 1, 2], [0, 1, 0]]
    Each sample's first label is IGNORE_INDEX: predicting it would read the previous sample.
    "padding_tokens" counts the pad positions (there is no attention_mask to count them from).

    flash_kwargs (one row only): the sample boundaries as flash attention's varlen kernel takes them, so
    transformers does not re-derive them from position_ids in every layer (a device sync each time):
    cu_seq_lens_q/k = int32 [0, len1, len1+len2, ...] and max_length_q/k = the longest sample, a Python int,
    the keys and types of DataCollatorWithFlattening(return_flash_attn_kwargs=True):
        [[1, 2, 3], [4, 5]] -> cu_seq_lens_q tensor([0, 3, 5], dtype=int32), max_length_q 3

    The one-row layout is what transformers' DataCollatorWithFlattening builds (separator -100 as each
    sample's first label, restarting position_ids); it is kept here because the several-rows layout
    needs this code anyway, and one function for both keeps their labels and counts identical.
    """
    if not samples:
        raise ValueError("pack_collate got an empty batch")
    pairs = [_ids_labels(s) for s in samples]
    sizes = [len(ids) for ids, _ in pairs]
    if flash_kwargs and pad_id is not None:
        raise ValueError("pack_collate: flash_kwargs describe one packed row; call it with pad_id=None")
    if pad_id is None:
        rows, width = [list(range(len(pairs)))], sum(sizes)
    else:
        width = max(sizes)
        rows = _first_fit_decreasing(sizes, width)
    input_ids, labels, position_ids = [], [], []
    for row in rows:
        ids_row: list[int] = []
        labels_row: list[int] = []
        positions: list[int] = []
        for i in row:
            ids, labs = pairs[i]
            ids_row += ids
            labels_row += [IGNORE_INDEX] + labs[1:]
            positions += range(len(ids))
        tail = width - len(ids_row)
        input_ids.append(ids_row + [pad_id] * tail)
        labels.append(labels_row + [IGNORE_INDEX] * tail)
        positions += range(tail)
        position_ids.append(positions)
    out = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(position_ids, dtype=torch.long),
        "use_cache": False,  # a KV cache object disables transformers' packed-sequence masking
        "padding_tokens": len(rows) * width - sum(sizes),
    }
    if flash_kwargs:
        bounds = torch.tensor([0, *sizes], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        out.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=max(sizes), max_length_k=max(sizes))
    return out


def _first_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Indices of `sizes` binned into rows of at most `capacity`, longest first: [3, 1, 2], 3 -> [[0], [2, 1]]."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        free = next((r for r, left in enumerate(room) if sizes[i] <= left), None)
        if free is None:
            rows.append([i])
            room.append(capacity - sizes[i])
        else:
            rows[free].append(i)
            room[free] -= sizes[i]
    return rows


def _vocab_size(model) -> int:
    """config.vocab_size: under ZeRO-3 a partitioned embedding weight has shape (0,), so never read it."""
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    raise ValueError(f"{type(model).__name__}: its config has no vocab_size; --packing needs it to build "
                     "the isolation check's token ids")


def packing_leak(model, pad_id: int, one_row: bool = False, flash_kwargs: bool = False) -> float:
    """How much packing changes a model's logits: 0.0 when packed samples are isolated.

    Packing relies on the model building a block-diagonal mask from position_ids (transformers'
    masking_utils does, for the architectures that use it; flex attention gets it as a document
    BlockMask), or on flash attention's cu_seq_lens (flash_kwargs); a model that ignores them would
    let samples attend to each other without any error. This runs three short samples packed (the
    two shorter ones share a row) and alone, on the model's device, and returns the largest logit
    difference relative to the logit scale.
    """
    vocab = _vocab_size(model)
    texts = [[(k * i + 3 * k) % vocab for i in range(n)] for k, n in ((7, 11), (11, 6), (13, 5))]
    samples = [{"input_ids": ids, "labels": ids} for ids in texts]
    batch = pack_collate(samples, None if one_row else pad_id, flash_kwargs=flash_kwargs and one_row)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()
                      if k in ("input_ids", "position_ids") or k.startswith(("cu_seq_lens", "max_length"))}
            packed = model(**inputs, use_cache=False).logits.float()
            flat = packed.reshape(-1, packed.shape[-1])
            ids = inputs["input_ids"].reshape(-1).tolist()
            worst, scale = 0.0, 1e-6
            for sample in texts:
                alone = model(input_ids=torch.tensor([sample], device=device), use_cache=False).logits[0].float()
                start = next(i for i in range(len(ids)) if ids[i:i + len(sample)] == sample)
                worst = max(worst, float((flat[start:start + len(sample)] - alone).abs().max()))
                scale = max(scale, float(alone.abs().max()))
    finally:
        model.train(was_training)
    return worst / scale


def isolation_tolerance(model) -> float:
    """The largest packing_leak that still means "isolated", for the precision the model's weights hold.

    fp32 weights: 1e-3 (measured ~3e-7 on tiny-qwen2). Half-precision or quantized weights (bf16, fp16,
    bitsandbytes 4-bit storage): the packed and the separate forward round differently, so 5e-2 (tiny-qwen2
    in bf16: 7e-3 isolated; a leak, samples attending to each other: 0.72).
    """
    dtypes = {p.dtype for p in model.parameters()}
    return 1e-3 if dtypes <= {torch.float32, torch.float64} else 5e-2


def collate_batch(batch: list[dict], tokenizer, options: StreamOptions) -> dict:
    """Samples -> model inputs (sft.tokens.collate); `sample_ids` travels along for logging."""
    if options.packing:
        out = pack_collate(batch, None if options.pack_one_row else checked_pad_id(tokenizer),
                           flash_kwargs=options.flash_kwargs)
    else:
        out = pad_collate(batch, tokenizer, options.pad_to_multiple_of)
    out["sample_ids"] = [s["id"] for s in batch]
    return out


def unwrap_collate(items: list[dict]) -> dict:
    """DataLoader collate_fn for a stream of pre-collated batches (batch size 1)."""
    if len(items) != 1:
        raise ValueError(f"the training stream yields whole batches: per-DataLoader batch size must be 1, got {len(items)}")
    return items[0]


# ------------------------------------------------------------------------------------ validation


