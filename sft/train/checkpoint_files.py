"""What is on disk in a checkpoint folder, read cheaply: is a file whole (`checkpoint_damage`), is it a killed
writer's leftover (`remove_stale_temp_files`), are the weights sane (`weights_problem`), did a data file change
(`file_fingerprint`). sft.train.checkpoints applies these to the checkpoint contract.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- damaged files

# Files a checkpoint folder holds that a cheap look can vouch for; FSDP's .distcp shards and the like
# are not looked at (the loader reports them).
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_MAX_JSON_BYTES = 64 << 20


def checkpoint_damage(folder: str | os.PathLike) -> str | None:
    """None when every weights, optimizer and state file of `folder` looks whole, else "FILE: what is wrong".

    Cheap (headers and zip directories, not the tensors): safetensors' header must parse and its tensors
    fit in the file; torch files must be zip archives whose directory is intact (a truncated zip loses
    its directory, which sits at the end); JSON states must parse. A malicious pickle passes this look:
    torch.load(weights_only=True) refuses it at load time.
    """
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        try:
            if path.suffix == ".safetensors":
                problem = _safetensors_damage(path)
            elif path.suffix in _TORCH_SUFFIXES:
                problem = _torch_file_damage(path)
            elif path.suffix == ".json" and path.stat().st_size <= _MAX_JSON_BYTES:
                json.loads(path.read_text(encoding="utf-8"))
                problem = None
            else:
                problem = None
        except (OSError, ValueError) as err:
            problem = f"unreadable ({err})"
        if problem:
            return f"{path}: {problem}"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        missing = sorted(name for name in shards if not (folder / name).is_file())
        if missing:
            return f"{index}: names weight files that are missing ({', '.join(missing)})"
    return None


def _safetensors_damage(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated ({size} bytes, not even a safetensors header)"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            return f"truncated: the header says {header_len} header bytes, the file has {size} bytes in all"
        header = json.loads(f.read(header_len))
    end = max((info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        return f"truncated: its tensors need {8 + header_len + end} bytes, the file has {size}"
    return None


def _torch_file_damage(path: Path) -> str | None:
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic[:1] == b"\x80":
        return None  # torch's legacy (pre-zip) format: a bare pickle, nothing cheap to check
    if magic != b"PK":
        return "not a torch file (neither a zip archive nor a pickle)"
    try:
        with zipfile.ZipFile(path) as archive:
            size = path.stat().st_size
            for info in archive.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"truncated: {info.filename} runs past the end of the file"
    except zipfile.BadZipFile as err:
        return f"truncated or corrupt: {err}"
    return None


# A safetensors save writes `.tmpXXXXXX` (Rust's tempfile) then renames it; sft.files writes
# `.NAME.tmp-PID`. Either name still in a folder whose writers all returned is a killed writer's leftover.
_STALE_TEMP_RE = re.compile(r"^\.(tmp[A-Za-z0-9_]{6,}|.+\.tmp-\d+)$")


def remove_stale_temp_files(folder: str | os.PathLike) -> list[str]:
    """Delete killed writers' temporary files inside checkpoint `folder`; returns their names."""
    removed = []
    for path in Path(folder).iterdir() if Path(folder).is_dir() else ():
        if _STALE_TEMP_RE.match(path.name):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        logger.info("removed stale temporary files from %s: %s", folder, ", ".join(sorted(removed)))
    return removed


# ------------------------------------------------------------------------------- data files

FINGERPRINT_BYTES = 64 << 10  # hashed at each end of a data file


def file_fingerprint(path: str | os.PathLike) -> dict | None:
    """{"size", "sha256"} of a data file: its size and a hash of its first and last 64 KB (a folder: the names and
    sizes of its files); None for a hub dataset. Cheap at any size, and unlike the mtime it survives a copy
    while catching what breaks a saved byte offset: lines prepended, appended or edited near either end."""
    path = Path(path)
    if path.is_dir():
        listing = sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file())
        return {"size": sum(size for _, size in listing),
                "sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}
    if not path.is_file():
        return None
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            digest.update(f.read())
    return {"size": size, "sha256": digest.hexdigest()}


# ------------------------------------------------------------------------------- sane weights

# A checkpoint whose largest weight exceeds this many times the largest weight at train begin is not
# offered as "last good": training was already diverging (the trial found 3.3e29 in one).
SANE_WEIGHT_FACTOR = 100.0


def weights_problem(checkpoint: str | os.PathLike, reference: float | None) -> str | None:
    """Why `checkpoint`'s weights are not a sane place to resume (non-finite values, or max |w| above
    SANE_WEIGHT_FACTOR x `reference`), or None. Reads its safetensors files tensor by tensor."""
    from safetensors import safe_open

    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        return None  # sharded engine layouts (FSDP .distcp): not checked here
    largest, where = 0.0, ""
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if not tensor.is_floating_point() or tensor.numel() == 0:
                    continue
                tensor = tensor.float()
                if not torch.isfinite(tensor).all():
                    return f"{file.name} has non-finite values in {key}"
                value = float(tensor.abs().max())
                if value > largest:
                    largest, where = value, f"{file.name}:{key}"
    if reference and largest > SANE_WEIGHT_FACTOR * reference:
        return (f"its largest weight is {largest:.3g} ({where}), over {SANE_WEIGHT_FACTOR:g}x the largest at "
                f"train begin ({reference:.3g}): training was already diverging")
    return None
