"""Tokenization throughput: our encoder (template + prompt mask) vs TRL's dataset preparation.

    pip install -r bench/requirements-bench.txt
    python bench/bench_tokenize.py --samples 4000

Same records (the synthetic Chinese instruction set of bench_vs_trl.py), same tokenizer (SmolLM2),
max length 512. Ours: read + normalize + render + tokenize + labels, 1 process and N processes
(multiprocessing over record chunks). TRL: SFTTrainer's dataset preparation (chat template,
tokenization, completion mask, truncation) with dataset_num_proc 1 and N.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def _encode_chunk(lines: list[str]) -> int:
    from sft.data.formats import detect_format, to_conversation
    from sft.models import load_tokenizer
    from sft.tokens.encoding import EncodeOptions, encode_conversation

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    options = EncodeOptions(max_length=512)
    encoded = 0
    for line in lines:
        record = json.loads(line)
        encoded += encode_conversation(to_conversation(record, detect_format(record)), tokenizer, options) is not None
    return encoded


def ours(lines: list[str], processes: int) -> float:
    _encode_chunk(lines[:8])  # tokenizer load and template probe outside the timing
    started = time.perf_counter()
    if processes == 1:
        done = _encode_chunk(lines)
    else:
        chunks = [lines[i::processes] for i in range(processes)]
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            done = sum(pool.map(_encode_chunk, chunks))
    # Records whose prompt alone exceeds max_length are dropped (nothing left to train), as in training.
    print(f"  (ours, {processes} process(es): {done} of {len(lines)} encoded)", file=sys.stderr)
    return len(lines) / (time.perf_counter() - started)


def trl(lines: list[str], processes: int) -> float:
    from bench_vs_trl import trl_dataset
    from datasets import disable_caching
    from trl import SFTConfig, SFTTrainer

    from sft.models import load_model, load_tokenizer

    disable_caching()
    dataset = trl_dataset(lines)
    tokenizer, model = load_tokenizer("smollm2-135m-instruct"), load_model("smollm2-135m-instruct")
    config = SFTConfig(output_dir="/tmp/bench_tokenize_trl", max_length=512, dataset_num_proc=processes,
                       report_to=[], use_cpu=True, max_steps=1)
    started = time.perf_counter()
    SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    return len(lines) / (time.perf_counter() - started)


def main() -> None:
    from make_firefly import generate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path = REPO / "bench" / "out" / f"tokenize-{args.samples}.jsonl"
    generate(args.samples, str(path), seed=7, dup_rate=0.0, length_scale=0.2)
    lines = path.read_text(encoding="utf-8").splitlines()
    print(f"{len(lines)} records, SmolLM2 tokenizer, max_length 512\n")
    print("| pipeline | processes | samples/s |")
    print("|---|---:|---:|")
    for name, fn in (("ours (sft.tokens.encoding)", ours), ("TRL SFTTrainer dataset preparation", trl)):
        for processes in sorted({1, args.processes}):
            print(f"| {name} | {processes} | {fn(lines, processes):.0f} |", flush=True)


if __name__ == "__main__":
    main()
