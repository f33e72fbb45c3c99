"""Adapters on disk: recognise one, find its base, and merge it into plain weights.

The one owner of adapter detection and merging: training's --save_merged, full_then_lora's resume,
the evaluator's loading and `hf_sft_eval.py --run R --merge` all come here.

    is_adapter_dir("outputs/lora/checkpoint-20")          # True: adapter_config.json is there
    merge_adapter("outputs/lora", "outputs/lora/merged")   # base + adapter -> plain model folder
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from sft.files import atomic_path
from sft.models import load_model

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
MERGED_MARKER = ".sft_merged"  # written into every merged folder: it may be replaced by the next merge


def check_merge_target(target: str | os.PathLike, protected: list[str | os.PathLike], overwrite: bool = False) -> None:
    """Refuse a merge target whose replacement would delete something the merge did not write.

    Never the protected folders (the run, the adapter) or a folder holding one of them, whatever --overwrite
    says; an existing non-empty folder only when an earlier merge wrote it (MERGED_MARKER) or with overwrite.
    """
    target = Path(target).resolve()
    for folder in protected:
        folder = Path(folder).resolve()
        if folder == target or target in folder.parents:
            raise ValueError(f"--merge_output {target}: that folder holds {folder}, which replacing it would delete; "
                             "give a new folder, e.g. --merge_output " + str(folder / "merged"))
    if target.is_file():
        raise ValueError(f"--merge_output {target} is a file; give a folder path")
    if target.is_dir() and any(target.iterdir()) and not (target / MERGED_MARKER).is_file() and not overwrite:
        raise ValueError(f"--merge_output {target} exists and was not written by a merge; give a new folder, or "
                         "pass --overwrite to replace it (its current contents are deleted)")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(adapter_dir: str | os.PathLike, base_override: str | None = None,
                 fallback: str | None = None) -> str:
    """The base model of an adapter: base_override, else adapter_config's base_model_name_or_path, else fallback.

    A relative or moved base (e.g. full_then_lora's `full_phase/`) is also looked for beside the run.
    """
    if base_override:
        return base_override
    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path") or fallback or ""
    if not base:
        raise ValueError(f"{adapter_dir}/{ADAPTER_CONFIG} does not name its base model; pass --base_model PATH")
    if os.path.isdir(base) or not base.startswith(("/", ".")):
        return base
    for parent in (Path(adapter_dir), Path(adapter_dir).parent):
        candidate = parent / Path(base).name
        if candidate.is_dir():
            return str(candidate)
    raise FileNotFoundError(f"base model {base} of adapter {adapter_dir} not found; pass --base_model PATH")


def merge_adapter(adapter_dir: str | os.PathLike, merged_dir: str | os.PathLike, tokenizer=None,
                  base_model: str | None = None, dtype: str = "float32") -> Path:
    """Fold the adapter saved in `adapter_dir` into a fresh copy of its base and save it to `merged_dir`.

    The base is reloaded from disk rather than merging an in-memory model: merging in place would
    unwrap the caller's model, and a QLoRA base is 4-bit (merged weights must be full precision).
    Prompt/prefix methods have no weights to fold: they raise ValueError saying so.
    """
    from peft import PeftConfig, PeftModel

    adapter_config = PeftConfig.from_pretrained(str(adapter_dir))
    if adapter_config.is_prompt_learning:
        raise ValueError(f"the adapter in {adapter_dir} is {adapter_config.peft_type.value.lower()}: its virtual "
                         "tokens are not weights of the model, so there is nothing to merge; load it as an adapter")
    base = load_model(adapter_base(adapter_dir, base_model), dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    # The merged config must not claim a quantization it no longer has.
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    with atomic_path(merged_dir, folder=True) as tmp:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MERGED_MARKER).write_text(f"merged from {adapter_dir}\n")
    logger.info("Merged %s into %s", adapter_dir, merged_dir)
    return Path(merged_dir)
