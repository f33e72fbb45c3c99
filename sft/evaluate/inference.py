"""Inference: load a trained result (full weights or an adapter on its base) and generate answers.

    model, tokenizer = load_for_inference("outputs/demo/checkpoint-80")
    ids = prompt_ids(conversation, tokenizer, template="auto")       # exactly the training prefix
    answers = generate_answers(model, tokenizer, [ids, ...], GenerationOptions(max_new_tokens=64))
    # [Generated(text="I'm Lumen, ...", num_tokens=12, stopped=True), ...]

Prompts are built by the same renderer the trainer uses (sft.tokens.template), cut at the answer of the last
assistant turn, so the model sees at inference exactly the token prefix it was trained to continue.
Generation is batched with left padding and a KV cache and stops at the template's turn-end token.
"""
from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from sft.chat_templates import TURN_END_TOKENS
from sft.conversation import Conversation, Message, is_plain_text
from sft.evaluate.options import GenerationOptions
from sft.models import ModelLoadError, load_model, load_tokenizer
from sft.tokens.encoding import tokenize_segments
from sft.tokens.template import render_segments
from sft.train.export import adapter_base, is_adapter_dir

logger = logging.getLogger(__name__)

@dataclass
class Generated:
    text: str
    num_tokens: int
    stopped: bool  # ended on a turn-end/eos token (False: cut by max_new_tokens)


def load_for_inference(path: str, base_model: str | None = None, dtype: str = "float32",
                       merge: bool = False, device: str = "cpu", fallback_base: str | None = None,
                       load_base: Callable[[str], Any] | None = None):
    """(model, tokenizer) for a model folder, built-in name, hub id, or an adapter folder on its base.

    merge=True folds a LoRA adapter into the base weights (faster generation, plain model returned).
    The tokenizer comes from `path` when it has one (checkpoints carry the chat template), else the base.
    fallback_base: the base when the adapter names none. load_base(path) -> model lets a caller reuse
    one base for many adapters (the evaluator's cache); default: load it fresh.
    """
    try:
        model, tokenizer = _load(path, base_model, dtype, merge, fallback_base, load_base)
    except (pickle.UnpicklingError, EOFError) as err:
        raise ModelLoadError(unsafe_pickle_message(path, err)) from None
    except RuntimeError as err:  # torch's reader on a truncated or non-zip .bin
        if "PytorchStreamReader" not in str(err) and "weights_only" not in str(err):
            raise
        raise ModelLoadError(unsafe_pickle_message(path, err)) from None
    model.to(device).eval()
    return model, tokenizer


def unsafe_pickle_message(path: str, err: BaseException) -> str:
    """The error for a pickled weights file torch refused (weights_only) or could not read, naming the file."""
    files = sorted(str(f) for pattern in ("*.bin", "*.pt", "*.pth") for f in Path(path).glob(pattern)
                   if f.name != "training_args.bin") if Path(path).is_dir() else []
    # torch's own text is not repeated: it suggests weights_only=False, which would run whatever the file holds
    named = " or ".join(files) if files else f"a pickled weights file of {path}"
    return (f"{named}: torch refused to load it ({type(err).__name__}): a pickled (.bin/.pt) weights file "
            "that holds objects other than tensors (possibly malicious) or is corrupt. It was not executed. Use "
            "another checkpoint, or re-save this one as safetensors from a trusted copy; never load it with "
            "weights_only=False unless you trust its source")


def _load(path: str, base_model: str | None, dtype: str, merge: bool, fallback_base: str | None,
          load_base: Callable[[str], Any] | None):
    if is_adapter_dir(path):
        from peft import PeftModel

        base = adapter_base(path, base_model, fallback_base)
        base_weights = load_base(base) if load_base else load_model(base, dtype=dtype)
        model = PeftModel.from_pretrained(base_weights, path, is_trainable=False)
        keep_prefix_in_generate(model)
        if merge:
            model = model.merge_and_unload()
        tokenizer = load_inference_tokenizer(path, base)
    else:
        model = load_model(path, dtype=dtype)
        tokenizer = load_tokenizer(path)
    return model, tokenizer


def keep_prefix_in_generate(model) -> bool:
    """Make generate() use a prefix-tuning adapter's prefix (transformers >= 5.2x with peft 0.21); True if patched.

    PEFT reads and injects the prefix as model_kwargs["past_key_values"], but transformers' generate now passes
    the KV cache as "cache" and, given both, uses "cache" and ignores the prefix: generation silently runs
    the bare base model (the forward, hence the validation loss, is right). Renaming "cache" back to
    "past_key_values" in what the base model prepares lets PEFT see the cache and put the prefix in it.
    tests/evaluate: generate() equals greedy decoding with the adapter's own forward.
    """
    peft_type = str(getattr(getattr(model, "active_peft_config", None), "peft_type", ""))
    original = getattr(model, "base_model_prepare_inputs_for_generation", None)
    if not peft_type.endswith("PREFIX_TUNING") or original is None:
        return False

    def prepare(*args, **kwargs):
        inputs = original(*args, **kwargs)
        if "cache" in inputs and inputs.get("past_key_values") is None:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    model.base_model_prepare_inputs_for_generation = prepare
    return True


def load_inference_tokenizer(path: str, base_model: str | None = None):
    """The tokenizer saved with a checkpoint (it carries the training chat template), else its base's."""
    if any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return load_tokenizer(path)
    return load_tokenizer(adapter_base(path, base_model) if is_adapter_dir(path) else path)


# -------------------------------------------------------------------------------- weights dtype

CPUINFO = "/proc/cpuinfo"  # read at call time: tests point it at a fake file


def cpu_bf16_feature(cpuinfo: str | None = None) -> str | None:
    """The CPU feature that runs bf16 matmuls natively (AMX, AVX512_BF16, ARM BF16), or None.

    Without one torch emulates bf16 through fp32 conversions, which is slower than fp32 itself. torch's own
    get_cpu_capability() names only the kernel family it dispatches to (e.g. "AVX512" on a CPU that has
    avx512_bf16), so the kernel's CPU flags decide.
    """
    capability = str(torch.backends.cpu.get_cpu_capability())
    if "AMX" in capability or "BF16" in capability:
        return capability
    try:
        text = Path(cpuinfo or CPUINFO).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    flags = {word for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for word in line.split(":", 1)[-1].split()}
    for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512_BF16"), ("bf16", "ARM BF16")):
        if flag in flags:
            return name
    return None


def resolve_eval_dtype(choice: str, cpuinfo: str | None = None) -> tuple[str, str]:
    """(dtype to load in, why) for --eval_dtype auto|float32|bfloat16 on the CPU."""
    if choice != "auto":
        return choice, "--eval_dtype"
    feature = cpu_bf16_feature(cpuinfo)
    if feature:
        return "bfloat16", f"auto: the CPU has native bf16 ({feature})"
    return "float32", "auto: the CPU has no native bf16 (it would be emulated, slower than fp32)"


def resolve_device_dtype(choice: str, device: str = "cpu") -> tuple[str, str]:
    """(dtype to load in, why) for --eval_dtype on `device`: the CPU as resolve_eval_dtype says; on a GPU, auto
    is bfloat16 where it is native (Ampere and later), else float16 (pre-Ampere GPUs run fp16 at full speed,
    fp32 at a fraction of it and with twice the memory)."""
    if not device.startswith("cuda"):
        return resolve_eval_dtype(choice)
    if choice != "auto":
        return choice, "--eval_dtype"
    index = torch.device(device).index
    if index is None:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        with torch.cuda.device(index):
            native = torch.cuda.is_bf16_supported(including_emulation=False)
    if native:
        return "bfloat16", "auto: the GPU has native bf16"
    return "float16", "auto: the GPU has no native bf16"


# ------------------------------------------------------------------------------------- prompts


def prompt_ids(conv: Conversation, tokenizer, template: str = "auto", system_prompt: str | None = None) -> list[int]:
    """Token ids of `conv` (ending with a user/tool turn) plus the assistant generation prompt.

    A placeholder answer is rendered and cut off, so the prefix is the one training saw before an answer.
    """
    if conv.messages and conv.messages[-1].role == "assistant":
        raise ValueError("the conversation to answer ends with an assistant message; drop it (it is the answer)")
    probe = Conversation([*conv.messages, Message("assistant", "x")], system=conv.system, tools=conv.tools)
    last = len(probe.messages) - 1
    segments = render_segments(probe, tokenizer, template, system_prompt)
    pieces = tokenize_segments(segments, tokenizer)
    ids: list[int] = []
    for segment, piece in zip(segments, pieces):
        if segment.answer and segment.message_index == last:
            return ids
        ids += piece
    raise ValueError("the template rendered no assistant answer position; check --template")


def stop_token_ids(tokenizer) -> list[int]:
    """eos plus every turn-end token the tokenizer knows (generation stops at the first)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in TURN_END_TOKENS if t in vocab)
    return sorted(ids)


# ---------------------------------------------------------------------------------- generation


@torch.inference_mode()
def generate_answers(model, tokenizer, prompts: list[list[int]], options: GenerationOptions | None = None,
                     ) -> list[Generated]:
    """Answers for token-id prompts, batched (longest first, left padding), in the input order."""
    options = options or GenerationOptions()
    stops = stop_token_ids(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[Generated | None] = [None] * len(prompts)
    for start in range(0, len(order), options.batch_size):
        chunk = order[start:start + options.batch_size]
        for i, answer in zip(chunk, _generate_batch(model, tokenizer, [prompts[i] for i in chunk], options, stops)):
            out[i] = answer
    return out  # type: ignore[return-value]


def _generate_batch(model, tokenizer, prompts: list[list[int]], options: GenerationOptions,
                    stops: list[int]) -> list[Generated]:
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    if options.do_sample:
        torch.manual_seed(options.seed)
    output = generate(model, tokenizer, input_ids, attention, options, stops)
    return [decode_generated(row[width:].tolist(), tokenizer, stops) for row in output]


def generate(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, options: GenerationOptions,
             stops: list[int], streamer=None, stopping_criteria=None, min_new_tokens: int = 0) -> torch.Tensor:
    """The one `model.generate` call: KV cache, stop at the turn-end tokens, greedy or top-p sampling.

    top_k=None: the model's generation_config may set a top_k that would silently narrow --top_p sampling.
    stopping_criteria: extra reasons to stop (serve: the client went away, a stop string was written).
    min_new_tokens: the stop tokens are suppressed until then (serve's `ignore_eos`: fixed-length benchmarks).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sampling = dict(temperature=options.temperature, top_p=options.top_p) if options.do_sample else {}
    if min_new_tokens:
        sampling["min_new_tokens"] = min_new_tokens
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=options.max_new_tokens,
                          do_sample=options.do_sample, eos_token_id=stops, pad_token_id=pad, use_cache=True,
                          top_k=None, streamer=streamer, stopping_criteria=stopping_criteria, **sampling)


def decode_generated(new_ids: list[int], tokenizer, stops: list[int]) -> Generated:
    """New token ids -> Generated, cut at the first stop token (counted in num_tokens)."""
    stop_at = next((k for k, t in enumerate(new_ids) if t in stops), None)
    kept = new_ids if stop_at is None else new_ids[:stop_at]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    return Generated(text=text.strip(), num_tokens=len(kept) + (stop_at is not None), stopped=stop_at is not None)


def conversation_from_prompt(record: dict, where: str) -> tuple[Conversation, str | None]:
    """An eval/batch input record -> (conversation to answer, reference answer or None).

    Accepts {"prompt": str, "system"?: str, "reference"?: str} or any training format (the final
    assistant turn, if present, becomes the reference).
    """
    from sft.data.formats import detect_format, to_conversation

    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and "completion" not in record:
        system = record.get("system")
        return Conversation([Message("user", record["prompt"])], system=system), record.get("reference")
    try:
        conv = to_conversation(record, detect_format(record))
    except Exception as err:
        raise ValueError(f"{where}: not a prompt record ({err}); expected {{\"prompt\": \"...\"}} "
                         "or a conversation in a training format") from err
    if conv.messages and conv.messages[-1].role == "assistant":
        reference = conv.messages[-1].content
        return Conversation(conv.messages[:-1], system=conv.system, tools=conv.tools, meta=conv.meta), reference
    return conv, None


def read_prompt_records(path: str) -> Iterator[tuple[str, dict, Conversation, str | None]]:
    """(where, record, conversation to answer, reference) for each non-blank line of a prompts file.

    A bad line raises ValueError naming `file:line` and the expected shape.
    """
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); expected one object "
                                 'a line like {"prompt": "..."}') from err
            if not isinstance(record, dict):
                raise ValueError(f"{where}: a JSON {type(record).__name__}, expected an object like "
                                 '{"prompt": "..."}')
            conv, reference = conversation_from_prompt(record, where)
            if not conv.messages or is_plain_text(conv):
                raise ValueError(f"{where}: the record has no turn to answer; expected {{\"prompt\": \"...\"}} "
                                 "or a conversation with a user turn")
            yield where, record, conv, reference
