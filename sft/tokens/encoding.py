"""Conversation -> token ids + labels (aligned with input_ids; the model shifts them inside its loss).

    sample = encode_conversation(conv, tokenizer, EncodeOptions(max_length=2048), stats)
    sample.input_ids  [151644, 8948, 198, ..., 151644, 77091, 198, 9707, 0, 151645, 198]
    sample.labels     [-100,   -100, -100, ..., -100,   -100,  -100, 9707, 0, 151645, -100]

Rules (REFERENCE §2): the content and the closing turn-end token of every assistant turn are
trained; everything else (system block, user blocks, tool results, the `<|im_start|>assistant\\n`
header, the `\\n` after `<|im_end|>`) gets IGNORE_INDEX. Options train the prompt too, only the
last assistant turn, and honour Message.train (an explicit flag on an assistant turn wins over the
default and over last_turn_only).

Tokenization: every segment from sft.tokens.template is tokenized on its own. Segment boundaries sit only
at structural special tokens and right after the generation prompt, so the ids of each prompt prefix
are exactly what `apply_chat_template(msgs, add_generation_prompt=True)` + tokenization gives at
inference (an answer starting with "\\n" never merges with the header's "\\n", REFERENCE §5.7).
Text is tokenized with split_special_tokens=True: a user who writes "<|im_end|>" gets the plain
characters, never the control token; structural tokens come only from the template. (Added tokens
that are not flagged special, e.g. Qwen's <tool_call>, keep their ids, as in plain encoding.)

Truncation to max_length keeps whole turns where it can: the oldest rounds (a user turn and what
follows it) are dropped first, the system block is kept, then the last answer's tail is cut. A
sample without a single supervised token is dropped and counted in EncodeStats, never returned.

Plain-text records (sft.conversation.is_plain_text): the text + eos, every token trained.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator

from sft.chat_templates import TEMPLATES
from sft.conversation import Conversation, is_plain_text
from sft.tokens.template import Segment, render_segments

IGNORE_INDEX = -100


@dataclass
class EncodeOptions:
    template: str = "auto"  # auto | qwen2.5 | chatml | tokenizer (see sft.tokens.template)
    system_prompt: str | None = None  # default system for records without one; "qwen"/"firefly" presets
    max_length: int | None = 2048  # tokens per sample; None: no limit
    train_on_prompt: bool = False  # also train system/user/tool tokens and assistant headers
    last_turn_only: bool = False  # train only the last assistant turn

    def __post_init__(self) -> None:
        problems = []
        if self.template not in TEMPLATES:
            problems.append(f"template={self.template!r} is unknown; choose one of {', '.join(TEMPLATES)}")
        if self.max_length is not None and self.max_length < 2:
            problems.append(f"max_length={self.max_length} must be at least 2 (or None for no limit)")
        if problems:
            raise ValueError("Invalid encoding options: " + "; ".join(problems))


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where not trained
    num_supervised: int  # labels that reach the loss (position 0 never does: labels are shifted)
    truncated: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class EncodeStats:
    """Counters for the trainer's report; encode_conversation adds to them."""

    seen: int = 0
    encoded: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    last_drop: str | None = None  # reason of the latest drop (for a rejects file)
    tokens: int = 0
    supervised_tokens: int = 0

    def summary(self) -> str:
        drops = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        return (f"{self.encoded}/{self.seen} conversations encoded, {self.truncated} truncated, "
                f"dropped: {drops}; {self.tokens} tokens, {self.supervised_tokens} supervised")


DROP_NO_TRAINED_TURN = "no_trained_turn"  # no assistant turn selected for training
DROP_NO_ROOM = "no_supervised_token_fits"  # the prompt alone fills max_length


def encode_conversation(conv: Conversation, tokenizer, options: EncodeOptions | None = None,
                        stats: EncodeStats | None = None) -> EncodedSample | None:
    """Encode one conversation; None (counted in `stats.dropped`) when nothing would be trained."""
    options = options or EncodeOptions()
    stats = stats if stats is not None else EncodeStats()
    stats.seen += 1
    if is_plain_text(conv):
        sample = _encode_plain_text(conv, tokenizer, options.max_length)
    else:
        sample = _encode_chat(conv, tokenizer, options, stats)
    if sample is None:
        return None
    if sample.num_supervised == 0:
        stats.dropped[DROP_NO_ROOM] += 1
        stats.last_drop = DROP_NO_ROOM
        return None
    stats.encoded += 1
    stats.truncated += sample.truncated
    stats.tokens += sample.num_tokens
    stats.supervised_tokens += sample.num_supervised
    return sample


def encode_conversations(convs: Iterable[Conversation], tokenizer, options: EncodeOptions | None = None,
                         stats: EncodeStats | None = None) -> Iterator[EncodedSample]:
    """Lazily encode a stream, skipping (and counting in `stats`) dropped conversations."""
    for conv in convs:
        sample = encode_conversation(conv, tokenizer, options, stats)
        if sample is not None:
            yield sample


# ------------------------------------------------------------------------------------- chat


def _encode_chat(conv: Conversation, tokenizer, options: EncodeOptions, stats: EncodeStats) -> EncodedSample | None:
    trained = trained_turns(conv, options.last_turn_only)
    if not trained:
        stats.dropped[DROP_NO_TRAINED_TURN] += 1
        stats.last_drop = DROP_NO_TRAINED_TURN
        return None
    segments = render_segments(conv, tokenizer, options.template, options.system_prompt)
    pieces = tokenize_segments(segments, tokenizer)
    sample = _assemble(segments, pieces, trained, options.train_on_prompt)
    if options.max_length is None or sample.num_tokens <= options.max_length:
        return sample
    return _truncate(conv, segments, pieces, tokenizer, options)


def trained_turns(conv: Conversation, last_turn_only: bool) -> set[int]:
    """Indexes of the assistant messages whose answers carry loss."""
    assistant = [i for i, m in enumerate(conv.messages) if m.role == "assistant"]
    default = set(assistant[-1:]) if last_turn_only else set(assistant)
    return {i for i in assistant if (conv.messages[i].train if conv.messages[i].train is not None else i in default)}


def tokenize_segments(segments: list[Segment], tokenizer) -> list[list[int]]:
    """Token ids per segment: special segments by id, text segments with special tokens split."""
    texts = [s.text for s in segments if not s.special]
    encoded = iter(tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] if texts else [])
    out = []
    for s in segments:
        out.append([_special_id(tokenizer, s.text)] if s.special else list(next(encoded)))
    return out


def _special_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"The template uses the special token {token!r}, which tokenizer '{name}' does not have; "
                         "use --template tokenizer (its own chat template) for this model.")
    return token_id


def _assemble(segments: list[Segment], pieces: list[list[int]], trained: set[int],
              train_on_prompt: bool) -> EncodedSample:
    input_ids: list[int] = []
    labels: list[int] = []
    for s, ids in zip(segments, pieces):
        train = s.message_index in trained if s.answer else train_on_prompt
        input_ids += ids
        labels += ids if train else [IGNORE_INDEX] * len(ids)
    return EncodedSample(input_ids, labels, _count_supervised(labels))


def _count_supervised(labels: list[int]) -> int:
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


def _truncate(conv: Conversation, segments: list[Segment], pieces: list[list[int]], tokenizer,
              options: EncodeOptions) -> EncodedSample:
    """Drop the oldest rounds (keeping the system block), then cut the tail; see the module doc."""
    max_length = options.max_length
    msgs = conv.messages
    round_starts = [i for i in range(1, len(msgs)) if msgs[i].role == "user" and msgs[i - 1].role != "user"]
    system_len = sum(len(p) for s, p in zip(segments, pieces) if s.message_index is None)
    kept_from = round_starts[-1] if round_starts else 0
    for k in round_starts:  # the first (oldest-dropping) start whose rounds fit
        kept = system_len + sum(len(p) for s, p in zip(segments, pieces)
                                if s.message_index is not None and s.message_index >= k)
        if kept <= max_length and trained_turns(_tail(conv, k), options.last_turn_only):
            kept_from = k
            break
    candidates = []
    if kept_from > 0:
        shorter = _tail(conv, kept_from)
        candidates.append(_encode_whole(shorter, tokenizer, options))
    candidates.append((segments, pieces, trained_turns(conv, options.last_turn_only)))
    for segs, ps, trained in candidates:
        sample = _assemble(segs, ps, trained, options.train_on_prompt)
        if sample.num_tokens > max_length:
            sample.input_ids = sample.input_ids[:max_length]
            sample.labels = sample.labels[:max_length]
            sample.num_supervised = _count_supervised(sample.labels)
        sample.truncated = True
        if sample.num_supervised > 0:
            return sample
    return sample  # zero supervised tokens: the caller drops it


def _tail(conv: Conversation, k: int) -> Conversation:
    return replace(conv, messages=conv.messages[k:])


def _encode_whole(conv: Conversation, tokenizer, options: EncodeOptions):
    segments = render_segments(conv, tokenizer, options.template, options.system_prompt)
    return segments, tokenize_segments(segments, tokenizer), trained_turns(conv, options.last_turn_only)


# ------------------------------------------------------------------------------- plain text


def _encode_plain_text(conv: Conversation, tokenizer, max_length: int | None) -> EncodedSample:
    text = "".join(m.content for m in conv.messages)
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if _adds_bos(tokenizer):
        ids = [tokenizer.bos_token_id] + ids
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids = ids[:max_length]
    return EncodedSample(list(ids), list(ids), _count_supervised(ids), truncated)


def _adds_bos(tokenizer) -> bool:
    # Llama-style tokenizers prepend BOS when encoding plain text; Qwen and SmolLM2 do not.
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
