"""Our hf_sft.py pipeline vs TRL's SFTTrainer: same model, data, max length, batch, steps, schedule.

    pip install -r bench/requirements-bench.txt          # TRL: a bench-only dependency
    python bench/bench_vs_trl.py                         # ~15 min on a 2-core CPU
    python bench/bench_vs_trl.py --steps 12 --modes trl ours ours_pack --rounds 2
    python bench/bench_vs_trl.py --steps 10 --modes trl ours ours_fixed --seeds 42 43 44 45   # loss check

Each mode trains in its own subprocess (so peak RSS is its own), alternating when --rounds > 1:
    trl           TRL SFTTrainer defaults: conversational prompt/completion data, completion-only loss,
                  padding to the longest sample of each batch
    ours          hf_sft.py defaults: length-grouped, token-balanced batches from the shuffle buffer (8
                  samples per step on average), chunked loss on supervised positions only
    ours_fixed    ours with --balance_batches false (length-grouped, exactly 8 samples per batch)
    ours_nogroup  ours without length grouping (padding like TRL's)
    ours_gc       ours with --gradient_checkpointing (TRL's SFTConfig turns it on by default)
    ours_tokens   ours with --batch_tokens 2048 (length-grouped batches of ~equal tokens, ~8 samples on average)
    ours_pack     ours with --packing: 8 shuffled samples per step (as TRL), packed into rows as long as
                  the longest of them (sdpa), so no padding and no attention across samples

Measured the same way for every mode: the collator's batches give computed / real (non-pad) /
supervised tokens, a forward pre-hook gives step start times; steps 3..N-1 are timed (warm-up
excluded). After training, the held-out loss of the trained model on the same 64 unseen samples is
computed with the same masking for every mode. MFU = 6 x parameters x real tokens/s divided by a
GEMM peak measured in this run at the same precision and thread count.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODES = ("trl", "ours", "ours_fixed", "ours_gc", "ours_tokens", "ours_nogroup", "ours_pack")
HELDOUT = 64


# ----------------------------------------------------------------------------------------- data


def make_data(out_dir: Path, samples: int) -> tuple[Path, Path]:
    """Chinese instruction data with SFT-like lengths (median ~210 SmolLM2 tokens, ~9% above 512)."""
    sys.path.insert(0, str(REPO / "bench"))
    from make_firefly import generate

    raw = out_dir / "firefly_raw.jsonl"
    generate(samples + HELDOUT, str(raw), seed=7, dup_rate=0.0, length_scale=0.2)
    lines = raw.read_text(encoding="utf-8").splitlines()
    train, heldout = out_dir / "train.jsonl", out_dir / "heldout.jsonl"
    train.write_text("\n".join(lines[:samples]) + "\n", encoding="utf-8")
    heldout.write_text("\n".join(lines[samples:]) + "\n", encoding="utf-8")
    return train, heldout


# --------------------------------------------------------------------------------- measurement


class Meter:
    """Per-batch token counts (from the collator) and per-step forward start times (from a hook)."""

    def __init__(self):
        self.batches: list[tuple[int, ...]] = []  # (computed, real, supervised, rows, samples)
        self.forwards: list[float] = []
        self.active = True

    def count(self, batch: dict, padding_tokens: int = 0, samples: int | None = None) -> dict:
        if self.active:
            ids, labels = batch["input_ids"], batch.get("labels")
            mask = batch.get("attention_mask")
            real = int(mask.sum()) if mask is not None else ids.numel() - padding_tokens
            supervised = int((labels[:, 1:] != -100).sum()) if labels is not None else 0
            self.batches.append((ids.numel(), real, supervised, ids.shape[0], samples or ids.shape[0]))
        return batch

    def hook(self, model) -> None:
        def pre_forward(module, args, kwargs):
            if self.active and module.training:
                self.forwards.append(time.perf_counter())
        model.register_forward_pre_hook(pre_forward, with_kwargs=True)

    def summary(self, first_timed: int = 3) -> dict:
        steps = len(self.forwards)
        if steps <= first_timed:
            raise SystemExit(f"only {steps} steps ran; use --steps >= {first_timed + 2}")
        seconds = self.forwards[-1] - self.forwards[first_timed - 1]
        timed = self.batches[first_timed - 1:steps - 1]
        computed, real, supervised, rows = (sum(b[i] for b in timed) for i in range(4))
        return {"timed_steps": len(timed), "seconds": round(seconds, 2),
                "real_tokens_per_s": round(real / seconds, 1), "supervised_tokens_per_s": round(supervised / seconds, 1),
                "computed_tokens_per_s": round(computed / seconds, 1),
                "padding_fraction": round(1 - real / computed, 4) if computed else 0.0,
                "seconds_per_step": round(seconds / len(timed), 2), "rows_per_step": round(rows / len(timed), 1),
                "samples_trained": sum(b[4] for b in self.batches[:steps])}


def heldout_loss(model, tokenizer, path: Path) -> float:
    """Token-weighted loss on the held-out records with the training masking (same for every mode)."""
    from sft.evaluate.evaluator import masked_loss_sum
    from sft.tokens.collate import StreamOptions
    from sft.tokens.encoding import EncodeOptions
    from sft.tokens.evalset import build_eval_batches, read_conversations

    model.eval()
    batches = build_eval_batches(list(read_conversations(str(path))), tokenizer, EncodeOptions(max_length=512),
                                 StreamOptions(batch_size=8))
    total, count = masked_loss_sum(model, batches)
    return round(total / count, 4)


# -------------------------------------------------------------------------------------- children


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    meter = Meter()
    started = time.time()
    if args.child == "trl":
        model, tokenizer = train_trl(args, meter)
    else:
        model, tokenizer = train_ours(args, meter)
    meter.active = False
    result = {"mode": args.child, **meter.summary(), "wall_s": round(time.time() - started, 1),
              "params": sum(p.numel() for p in model.parameters())}
    result["heldout_loss"] = heldout_loss(model, tokenizer, Path(args.heldout))
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return result


def _common_training_kwargs(args) -> dict:
    return dict(per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=args.steps,
                learning_rate=5e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, seed=args.seed,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                bf16=args.precision == "bf16", disable_tqdm=True)


def trl_dataset(lines: list[str]):
    """Firefly records -> TRL's conversational prompt/completion dataset (chat template, completion-only loss)."""
    from datasets import Dataset

    rows = [json.loads(line) for line in lines if line.strip()]
    return Dataset.from_list([{"prompt": [{"role": "user", "content": r["input"]}],
                               "completion": [{"role": "assistant", "content": r["target"]}]} for r in rows])


def train_trl(args, meter: Meter):
    from trl import SFTConfig, SFTTrainer

    from sft.models import load_model, load_tokenizer

    dataset = trl_dataset(Path(args.data).read_text(encoding="utf-8").splitlines())
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct", dtype="float32")
    config = SFTConfig(output_dir=args.out, max_length=512, **_common_training_kwargs(args))
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    collate = trainer.data_collator
    trainer.data_collator = lambda features: meter.count(collate(features))
    meter.hook(model)
    trainer.train()
    return model, tokenizer


def train_ours(args, meter: Meter):
    import sft.train.run
    from sft.config import parse_config
    from sft.models import load_tokenizer

    captured = {}
    prepare, make_collator = sft.train.run.prepare_model, sft.train.run.training_collator

    def prepare_and_hook(model, *rest):
        model = prepare(model, *rest)
        meter.hook(model)
        captured["model"] = model
        return model

    def counting_collator(*a):
        collate = make_collator(*a)
        return lambda items: meter.count(collate(items), items[0].get("padding_tokens", 0),
                                         len(items[0].get("sample_ids") or []))

    sft.train.run.prepare_model, sft.train.run.training_collator = prepare_and_hook, counting_collator
    flags = ["--model", "smollm2-135m-instruct", "--data", args.data, "--max_length", "512",
             "--output_dir", args.out, "--finetuning_type", "full", "--precision", args.precision,
             "--group_by_length", str(args.child != "ours_nogroup").lower(),
             "--packing", str(args.child == "ours_pack").lower(), "--shuffle_buffer", "1000",
             "--gradient_checkpointing", str(args.child == "ours_gc").lower(),
             "--balance_batches", str(args.child != "ours_fixed").lower()]
    if args.child == "ours_tokens":
        flags += ["--batch_tokens", "2048"]
    for key, value in _common_training_kwargs(args).items():
        if key in ("report_to", "bf16"):
            continue
        flags += [f"--{key}", str(value)]
    flags += ["--report_to", "none"]
    sft.train.run.run_training(parse_config(flags))
    return captured["model"], load_tokenizer("smollm2-135m-instruct")


# ---------------------------------------------------------------------------------------- parent


def gemm_peak(precision: str, threads: int, repeats: int = 20) -> float:
    """GFLOP/s of a training-shaped matmul (2048 tokens x hidden 576 -> 1536, SmolLM2's MLP)."""
    import torch

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(2048, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048 * 576 * 1536 / best / 1e9


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = open("/proc/cpuinfo").read()
        cpu += " (avx512_bf16)" if "avx512_bf16" in flags else " (no avx512_bf16/AMX)"
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--rounds", type=int, default=1, help="Repeat the alternation (trl, ours, ...) this many times.")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 on CPUs with avx512_bf16/AMX, else fp32 (bf16 is emulated and ~30x slower there)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--seeds", type=int, nargs="+", default=[42],
                   help="Training seeds (sample order); every mode runs once per seed and round.")
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)  # a child's seed
    p.add_argument("--work", default="bench/out/vs_trl")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--heldout", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        Path(args.result).write_text(json.dumps(child(args)))
        return

    from sft.train.run import resolve_precision

    precision = resolve_precision(args.precision)
    work = REPO / args.work
    work.mkdir(parents=True, exist_ok=True)
    train, heldout = make_data(work, args.samples)
    peak = gemm_peak(precision, args.threads)
    print(f"machine: {machine()}; precision {precision}, {args.threads} threads; GEMM peak {peak:.0f} GFLOP/s",
          flush=True)
    results = []
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads))
    for seed, round_, mode in [(s, r, m) for s in args.seeds for r in range(args.rounds) for m in args.modes]:
        result_path = work / f"{mode}-seed{seed}-{round_}.json"
        cmd = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps), "--precision", precision,
               "--seed", str(seed),
               "--threads", str(args.threads), "--data", str(train), "--heldout", str(heldout),
               "--out", str(work / f"run-{mode}"), "--result", str(result_path)]
        with open(work / f"{mode}-seed{seed}-{round_}.log", "w") as log:
            code = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if code != 0:
            sys.exit(f"{mode} failed (exit {code}); see {work / f'{mode}-seed{seed}-{round_}.log'}")
        result = json.loads(result_path.read_text())
        result["mfu"] = round(6 * result["params"] * result["real_tokens_per_s"] / (peak * 1e9), 4)
        result["seed"] = seed
        results.append(result)
        print(json.dumps(result), flush=True)
    report(results, args, precision, peak)


def report(results: list[dict], args, precision: str, peak: float) -> None:
    trl = [r["real_tokens_per_s"] for r in results if r["mode"] == "trl"]
    base = sum(trl) / len(trl) if trl else None
    print(f"\n{args.samples} samples, max_length 512, batch 8, {args.steps} steps (steps 3..{args.steps - 1} timed), "
          f"constant lr 5e-5, {precision}, {args.threads} threads, GEMM peak {peak:.0f} GFLOP/s\n")
    print("| mode | seed | real tok/s | supervised tok/s | padding | peak RSS MB | samples trained | held-out loss "
          "| MFU | vs TRL |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ratio = f"{r['real_tokens_per_s'] / base:.2f}x" if base else ""
        print(f"| {r['mode']} | {r['seed']} | {r['real_tokens_per_s']:.0f} | {r['supervised_tokens_per_s']:.0f} | "
              f"{100 * r['padding_fraction']:.1f}% | {r['peak_rss_mb']} | {r['samples_trained']} | "
              f"{r['heldout_loss']:.4f} | {100 * r['mfu']:.1f}% | {ratio} |")
    loss_summary(results)


def loss_summary(results: list[dict]) -> None:
    """Held-out loss per mode minus TRL's on the same seed: mean and range over seeds (paired)."""
    trl = {r["seed"]: r["heldout_loss"] for r in results if r["mode"] == "trl"}
    if not trl:
        return
    print("\n| mode | seeds | mean held-out loss | std over seeds | minus TRL, mean | minus TRL, range |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in dict.fromkeys(r["mode"] for r in results):
        pairs = [(r["heldout_loss"], trl[r["seed"]]) for r in results if r["mode"] == mode and r["seed"] in trl]
        if not pairs:
            continue
        gaps = [ours - theirs for ours, theirs in pairs]
        spread = statistics.stdev(p[0] for p in pairs) if len(pairs) > 1 else 0.0
        print(f"| {mode} | {len(pairs)} | {sum(p[0] for p in pairs) / len(pairs):.4f} | {spread:.4f} | "
              f"{sum(gaps) / len(gaps):+.4f} | {min(gaps):+.4f} .. {max(gaps):+.4f} |")

if __name__ == "__main__":
    main()
