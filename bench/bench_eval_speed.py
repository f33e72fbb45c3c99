#!/usr/bin/env python
"""Checkpoints per minute of the CPU evaluator for a Qwen2.5-0.5B-shaped model, fp32 vs bf16.

    python bench/bench_eval_speed.py                       # 0.5B shape, every dtype this CPU runs natively
    python bench/bench_eval_speed.py --dtypes float32 --num_val 16 --max_new_tokens 32
    python bench/bench_eval_speed.py --tiny                # a seconds-long dry run of the same code path

One checkpoint's evaluation, timed in its parts with the evaluator's own functions (sft.evaluate.evaluator):
loading the checkpoint, the validation loss on --num_val synthetic SFT conversations (training's encoding
and masking, ~570 tokens median), and greedy generation on the bundled held-out prompts
(data/demo_eval_prompts.jsonl + data/general_eval.jsonl, 73 prompts). The model has random weights
(hidden 896, 24 layers, 14 heads / 2 KV heads, intermediate 4864, vocab 151936, tied) with the real Qwen2.5
tokenizer: a random model never stops, so every answer runs to --max_new_tokens, the cost of a base model
that rambles (a fine-tuned one that stops early is cheaper). Prints seconds per part, seconds per checkpoint
and checkpoints per minute for each dtype; bf16 only where the CPU has native bf16 unless --dtypes says so.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # as hf_sft_eval.py: a CPU job
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_model(folder: Path, tiny: bool) -> None:
    """The random 0.5B-shaped model (bf16 on disk: half the bytes to write and read) + the Qwen2.5 tokenizer."""
    import torch
    from gpu_data import QWEN25_05B, TINY, qwen2_config
    from transformers import Qwen2ForCausalLM

    from sft.models import load_tokenizer

    torch.manual_seed(0)
    config = qwen2_config(TINY if tiny else QWEN25_05B)
    config.use_cache = True  # generation with a KV cache, as the evaluator runs it
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.to(torch.bfloat16).save_pretrained(folder)
    load_tokenizer("qwen2.5").save_pretrained(folder)


def make_setup(workdir: Path, num_val: int, max_new_tokens: int, batch_size: int, eval_batch_size: int):
    from gpu_data import write_conversations

    from sft.evaluate.evaluator import EvalSetup, read_prompt_items
    from sft.evaluate.options import GenerationOptions
    from sft.tokens.encoding import EncodeOptions
    from sft.tokens.evalset import read_conversations

    val_file = write_conversations(workdir / "val.jsonl", num_val, seed=1)
    val = list(read_conversations(str(val_file), "auto"))
    prompts = read_prompt_items(str(REPO / "data" / "demo_eval_prompts.jsonl"))
    general = read_prompt_items(str(REPO / "data" / "general_eval.jsonl"), default_kind="general")
    return EvalSetup(run_dir=workdir, base_model=str(workdir / "model"),
                     encode=EncodeOptions(template="qwen2.5", max_length=2048), val=val, prompts=prompts,
                     general=general, generation=GenerationOptions(max_new_tokens=max_new_tokens,
                                                                   batch_size=batch_size),
                     eval_batch_size=eval_batch_size)


def time_checkpoint(setup, dtype: str) -> dict:
    """Load, validation loss and generation of one checkpoint in `dtype`, each timed."""
    from sft.evaluate.evaluator import ModelCache, generate_for, validation_loss

    started = time.perf_counter()
    model, tokenizer, _ = ModelCache(dtype).load(setup.base_model, setup.base_model)
    loaded = time.perf_counter()
    loss = validation_loss(model, tokenizer, setup)
    scored = time.perf_counter()
    answers = generate_for(setup.prompts + setup.general, model, tokenizer, setup)
    generated = time.perf_counter()
    tokens = sum(a.num_tokens for a in answers)
    return {"dtype": dtype, "load_s": loaded - started, "val_loss_s": scored - loaded,
            "val_tokens": loss.get("eval_tokens", 0), "eval_loss": loss.get("eval_loss"),
            "generate_s": generated - scored, "generated_tokens": tokens, "total_s": generated - started}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", nargs="+", default=None, help="default: float32, plus bfloat16 if native")
    p.add_argument("--num_val", type=int, default=32, help="validation conversations (synthetic, SFT-like)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8, help="prompts generated together")
    p.add_argument("--eval_batch_size", type=int, default=8, help="validation-loss batch size")
    p.add_argument("--threads", type=int, default=None, help="default: every usable CPU (affinity, cgroup)")
    p.add_argument("--tiny", action="store_true", help="a tiny model: check the script in seconds")
    args = p.parse_args()

    import torch

    from sft.evaluate.cli import available_cpus
    from sft.evaluate.inference import cpu_bf16_feature

    threads = args.threads or available_cpus()
    torch.set_num_threads(threads)
    feature = cpu_bf16_feature()
    dtypes = args.dtypes or (["float32", "bfloat16"] if feature else ["float32"])
    with tempfile.TemporaryDirectory(prefix="bench_eval_speed_") as tmp:
        workdir = Path(tmp)
        build_model(workdir / "model", args.tiny)
        setup = make_setup(workdir, args.num_val, args.max_new_tokens, args.batch_size, args.eval_batch_size)
        cpu = platform.processor() or platform.machine()
        print(f"{'tiny' if args.tiny else 'Qwen2.5-0.5B-shaped'} model, random weights; {cpu}, {threads} thread(s) "
              f"of {os.cpu_count()} cores; native bf16: {feature or 'no'}; torch {torch.__version__}")
        print(f"per checkpoint: validation loss on {len(setup.val)} conversations, greedy generation on "
              f"{len(setup.prompts) + len(setup.general)} prompts x {args.max_new_tokens} new tokens "
              f"(batch {args.batch_size})")
        print("\n| dtype | load s | val loss s (tokens) | generation s (tokens, tok/s) | s / checkpoint "
              "| checkpoints/min | val loss only: checkpoints/min |", flush=True)
        print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
        rows = []
        for dtype in dtypes:  # each row as soon as it is measured: a long run killed midway keeps what it had
            r = time_checkpoint(setup, dtype)
            rows.append(r)
            print(f"| {r['dtype']} | {r['load_s']:.1f} | {r['val_loss_s']:.1f} ({r['val_tokens']}) | "
                  f"{r['generate_s']:.1f} ({r['generated_tokens']}, {r['generated_tokens'] / r['generate_s']:.1f}) "
                  f"| {r['total_s']:.1f} | {60 / r['total_s']:.2f} | {60 / (r['load_s'] + r['val_loss_s']):.2f} |",
                  flush=True)
    if len(rows) == 2:
        print(f"\nbf16 vs fp32: validation loss {rows[0]['val_loss_s'] / rows[1]['val_loss_s']:.2f}x, generation "
              f"{rows[0]['generate_s'] / rows[1]['generate_s']:.2f}x faster; eval_loss {rows[0]['eval_loss']} vs "
              f"{rows[1]['eval_loss']}")


if __name__ == "__main__":
    main()
