"""eval/report.md and the PNG plots, rebuilt from eval/metrics.jsonl after every evaluated checkpoint.

    write_report(setup)   # eval/report.md: table of checkpoints (best marked), base vs best answers
    plot_eval(setup)      # eval/loss.png (train + validation loss), eval/metrics.png (scores vs step)
"""
from __future__ import annotations

import json
from pathlib import Path

from sft.files import write_text_atomic
from sft.train.plots import loss_series, read_train_log, save_figure

REPORT_NAME = "report.md"
LOSS_PNG = "loss.png"
METRICS_PNG = "metrics.png"
EXAMPLES_PER_KIND = 2


def read_metrics(eval_dir: Path) -> list[dict]:
    from sft.evaluate.evaluator import read_done

    return [record for _, record in sorted(read_done(eval_dir).items())]


def best_record(records: list[dict]) -> dict | None:
    """Best by pass rate when prompts have checks (ties: lower validation loss), else by validation loss,
    else by ROUGE-L."""
    if not records:
        return None
    if any("pass_rate" in r for r in records):
        return max(records, key=lambda r: (r.get("pass_rate", -1), -r.get("eval_loss", 0.0)))
    if any("eval_loss" in r for r in records):
        return min(records, key=lambda r: r.get("eval_loss", float("inf")))
    return max(records, key=lambda r: r.get("rouge-l", -1))


def train_loss_at(loss_steps: tuple[list[int], list[float]], step: int) -> float | None:
    """The last logged training loss at or before `step`, from loss_series(train_log, "loss")."""
    before = [v for s, v in zip(*loss_steps) if s <= step]
    return before[-1] if before else None


def _columns(records: list[dict]) -> list[tuple[str, str]]:
    wanted = [("eval_loss", "val loss"), ("perplexity", "ppl"), ("pass_rate", "pass")]
    kinds = sorted({k for r in records for k in r if k.startswith("pass_rate/")})
    wanted += [(k, f"pass {k.split('/', 1)[1]}") for k in kinds]
    wanted += [("exact_match", "exact"), ("bleu-4", "BLEU-4"), ("rouge-1", "ROUGE-1"), ("rouge-2", "ROUGE-2"),
               ("rouge-l", "ROUGE-L"), ("general/pass_rate", "general pass"),
               ("general/pass_rate_delta", "general Δ vs base")]
    return [(key, title) for key, title in wanted if any(key in r for r in records)]


def _cell(value, signed: bool = False) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:+.4g}" if signed else f"{value:.4g}"
    return str(value)


def write_report(setup) -> Path:
    """Rewrite eval/report.md from metrics.jsonl and the predictions of the base and best steps."""
    eval_dir = setup.eval_dir
    records = read_metrics(eval_dir)
    best = best_record([r for r in records if r["step"] != 0]) or best_record(records)
    log_path = setup.run_dir / "train_log.jsonl"
    train_losses = loss_series(read_train_log(log_path) if log_path.is_file() else [], "loss")
    columns = _columns(records)
    lines = [f"# Evaluation of `{setup.run_dir}`", ""]
    lines += [f"- base model: `{setup.base_model}`; template `{setup.encode.template}`"
              + (f", system prompt `{setup.encode.system_prompt}`" if setup.encode.system_prompt else ""),
              f"- validation: {setup.sources.get('val') or 'none'} ({len(setup.val)} samples, training masking)",
              f"- prompts: {setup.sources.get('prompts') or 'none'} ({len(setup.prompts)}); general set: "
              f"{setup.sources.get('general') or 'none'} ({len(setup.general)})",
              f"- decoding: {'sampling' if setup.generation.do_sample else 'greedy'}, "
              f"max_new_tokens {setup.generation.max_new_tokens}"
              + (f"; generation on every {setup.generate_every}th checkpoint (--generate_every), validation loss on "
                 "all" if setup.generate_every > 1 else ""),
              f"- weights on the CPU: {setup.dtype}" + (f" ({setup.dtype_reason})" if setup.dtype_reason else "")]
    if setup.quantized_base:
        lines.append(f"- QLoRA run: the adapters' scores are **on the unquantized base** ({setup.dtype}), not on the "
                     "4-bit base they trained on (the CPU evaluator loads the base unquantized), so they can differ "
                     "slightly from the training run's own eval_loss")
    lines.append("")
    if best is not None:
        lines += [f"Best: **{best['checkpoint']}** (step {best['step']}) — marked ★. "
                  "Best = highest pass rate, ties by lower validation loss (or lowest validation loss).", ""]
    header = ["step", "checkpoint", "train loss"] + [title for _, title in columns]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        mark = " ★" if best is not None and r["step"] == best["step"] else ""
        row = [str(r["step"]), f"{r['checkpoint']}{mark}", _cell(train_loss_at(train_losses, r["step"]) if r["step"] else None)]
        row += [_cell(r.get(key), signed=key.endswith("_delta")) for key, _ in columns]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if best is not None and records and records[0]["step"] == 0 and best["step"] != 0:
        lines += _examples(eval_dir, best)
    lines += ["Plots: `loss.png` (train and validation loss), `metrics.png` (scores against step).", ""]
    target = eval_dir / REPORT_NAME
    write_text_atomic(target, "\n".join(lines))
    return target


def _examples(eval_dir: Path, best: dict) -> list[str]:
    base = _predictions(eval_dir / "predictions-0.jsonl")
    tuned = {(r["set"], r["id"]): r for r in _predictions(eval_dir / f"predictions-{best['step']}.jsonl")}
    per_kind: dict[str, int] = {}
    out = [f"## Base model vs {best['checkpoint']}", ""]
    for row in base:
        key = (row["set"], row["id"])
        if key not in tuned or per_kind.get(row["kind"], 0) >= EXAMPLES_PER_KIND:
            continue
        per_kind[row["kind"]] = per_kind.get(row["kind"], 0) + 1
        after = tuned[key]
        out += [f"**[{row['kind']}]** {_quote(row['prompt'])}", ""]
        if row.get("reference"):
            out.append(f"- reference: {_quote(row['reference'])}")
        out.append(f"- base: {_quote(row['prediction'])}{_verdict(row)}")
        out.append(f"- {best['checkpoint']}: {_quote(after['prediction'])}{_verdict(after)}")
        out.append("")
    return out


def _verdict(row: dict) -> str:
    if "pass" not in row:
        return ""
    return " ✅" if row["pass"] else f" ❌ ({'; '.join(row.get('reasons') or [])})"


def _quote(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[:limit] + " …"
    return "`" + text.replace("`", "'") + "`" if text else "*(empty)*"


def _predictions(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ plots


def plot_eval(setup) -> list[Path]:
    """eval/loss.png and eval/metrics.png (atomically replaced)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(setup.eval_dir)
    log_path = setup.run_dir / "train_log.jsonl"
    train_log = read_train_log(log_path) if log_path.is_file() else []
    written = []

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    steps, values = loss_series(train_log, "loss")
    if steps:
        ax.plot(steps, values, "-", label="train loss (train_log.jsonl)", alpha=0.7)
    evaluated = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if evaluated:
        ax.plot(*zip(*evaluated), "o-", label="validation loss (evaluator)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"{setup.run_dir.name}: loss")
    ax.grid(alpha=0.3)
    if steps or evaluated:
        ax.legend()
    written.append(save_figure(fig, setup.eval_dir / LOSS_PNG))

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    keys = ["pass_rate"] + sorted({k for r in records for k in r if k.startswith("pass_rate/")})
    keys += ["rouge-l", "bleu-4", "general/pass_rate"]
    drawn = 0
    for key in keys:
        points = [(r["step"], r[key] / (100.0 if key in ("rouge-l", "bleu-4") else 1.0))
                  for r in records if isinstance(r.get(key), (int, float))]
        if points:
            label = f"{key} / 100" if key in ("rouge-l", "bleu-4") else key
            ax.plot(*zip(*points), "o-", label=label, markersize=4)
            drawn += 1
    ax.set_xlabel("optimizer step (0 = base model)")
    ax.set_ylabel("score (0-1)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"{setup.run_dir.name}: evaluation scores")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, loc="best")
    written.append(save_figure(fig, setup.eval_dir / METRICS_PNG))
    return written
