"""The validation set: the same encoding and masking as training, as a list of padded batches."""
from __future__ import annotations

import logging
import os
from typing import Iterator

from sft.conversation import Conversation
from sft.data.formats import read_conversations as read_file_conversations
from sft.tokens.collate import StreamOptions, collate_batch
from sft.tokens.encoding import EncodeOptions, encode_conversation

logger = logging.getLogger(__name__)

def read_conversations(path: str, fmt: str = "auto", limit: int | None = None) -> Iterator[tuple[str, Conversation]]:
    """(sample id, Conversation) for the valid records of a file; a bad record raises with file:line."""
    count = 0
    for item in read_file_conversations(path, None if fmt == "auto" else fmt):
        if limit is not None and count >= limit:
            return
        if item.error is not None:
            raise item.error
        count += 1
        yield f"{os.path.basename(path)}:{item.raw.line}", item.conversation


def build_eval_batches(conversations: list[tuple[str, Conversation]], tokenizer, encode_options: EncodeOptions,
                       options: StreamOptions) -> list[dict]:
    """Validation set as a list of padded batches (same encoding and masking as training)."""
    samples = []
    for sample_id, conversation in conversations:
        encoded = encode_conversation(conversation, tokenizer, encode_options)
        if encoded is None:
            continue
        samples.append({"input_ids": encoded.input_ids, "labels": encoded.labels, "id": sample_id})
    samples.sort(key=lambda s: len(s["input_ids"]))
    plain = StreamOptions(**{**options.__dict__, "packing": False})
    batches = [collate_batch(samples[i:i + options.batch_size], tokenizer, plain)
               for i in range(0, len(samples), options.batch_size)]
    for batch in batches:
        batch.pop("sample_ids")
    return batches


