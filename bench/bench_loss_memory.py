"""Peak memory and time of one forward+backward: plain HF loss vs sft.train.loss's chunked loss.

A random Qwen2 with a tiny hidden size but the real 151,936-token vocabulary, so the logits dominate.
Each configuration runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own.

    python bench/bench_loss_memory.py                        # seq 4096, fp32, chunks 1024 and 256
    python bench/bench_loss_memory.py --autocast bf16        # under torch.autocast(bfloat16)
    python bench/bench_loss_memory.py --device cuda          # also reports torch.cuda peak allocated
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_child(args: argparse.Namespace) -> dict:
    """One configuration in this process: build, one warm-up step, timed steps; peaks as JSON."""
    import contextlib

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sft.train.loss import attach_chunked_loss

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max(args.seq, 4096), tie_word_embeddings=True,
    )
    device = torch.device(args.device)
    model = Qwen2ForCausalLM(config).to(device)
    model.config.use_cache = False
    input_ids = torch.randint(0, args.vocab, (1, args.seq), device=device)
    labels = input_ids.clone()
    # The first (1 - supervised) share is a prompt, as in SFT; 1.0 is the worst case for the chunked loss.
    labels[:, : int(args.seq * (1 - args.supervised))] = -100
    dtype = {"none": None, "bf16": torch.bfloat16}[args.autocast]

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    if args.mode == "plain":
        def step():
            with autocast():
                loss = model(input_ids=input_ids, labels=labels).loss
            loss.backward()
            return loss
    else:
        attach_chunked_loss(model, chunk_size=args.chunk)

        def step():
            with autocast():
                loss = model(input_ids=input_ids, labels=labels).loss
            loss.backward()
            return loss

    baseline = rss_mb()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    times, cpu_times = [], []
    for _ in range(args.steps):
        model.zero_grad(set_to_none=True)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    result = {
        "loss": round(loss.item(), 5),
        "baseline_rss_mb": round(baseline),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "step_s": round(min(times), 3),
        # CPU seconds (all threads) are steadier than wall time on a shared machine.
        "step_cpu_s": round(min(cpu_times), 3),
    }
    if device.type == "cuda":
        result["cuda_peak_over_model_mb"] = round((torch.cuda.max_memory_allocated() - cuda_base) / 2**20)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chunks", default="1024,256", help="chunk sizes for the chunked loss, comma-separated")
    parser.add_argument("--supervised", type=float, default=1.0, help="share of positions with a label")
    parser.add_argument("--autocast", choices=("none", "bf16"), default="none")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2, help="steps per run; the fastest is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each run (0: torch default)")
    parser.add_argument("--mode", choices=("plain", "chunked"), help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=1024, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.mode:  # child process
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(run_child(args)))
        return

    common = [f"--{k}={getattr(args, k)}" for k in
              ("seq", "vocab", "hidden", "layers", "supervised", "autocast", "device", "steps", "threads")]
    runs = [("plain HF loss", ["--mode=plain"])]
    runs += [(f"sft.train.loss chunk {c}", ["--mode=chunked", f"--chunk={c}"]) for c in args.chunks.split(",")]
    print(f"seq {args.seq}, vocab {args.vocab}, hidden {args.hidden}, layers {args.layers}, "
          f"supervised {args.supervised:.0%}, autocast {args.autocast}, device {args.device}")
    cuda = args.device.startswith("cuda")
    header = "| path | peak RSS MB | RSS before step MB | peak - before MB |" + (" CUDA peak MB |" if cuda else "")
    print(header + " step wall s | step CPU s | loss |")
    print("|---|---:|---:|---:|" + ("---:|" if cuda else "") + "---:|---:|---:|")
    for name, extra in runs:
        proc = subprocess.run([sys.executable, __file__, *common, *extra], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"| {name} | failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]} |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        cells = [name, r["peak_rss_mb"], r["baseline_rss_mb"], r["peak_rss_mb"] - r["baseline_rss_mb"]]
        cells += [r["cuda_peak_over_model_mb"]] if cuda else []
        cells += [r["step_s"], r["step_cpu_s"], r["loss"]]
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
