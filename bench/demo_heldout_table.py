"""The demo's before/after table on the held-out prompts, from evaluated runs' eval/metrics.jsonl.

    python hf_sft.py --config configs/demo_cpu.yaml --output_dir /tmp/demo-after
    python hf_sft_eval.py --run /tmp/demo-after --prompts data/demo_heldout_prompts.jsonl --max_new_tokens 64
    python bench/demo_heldout_table.py /tmp/demo-before /tmp/demo-after     # a Markdown table

One row for the base model (step 0 of the first run that has it) and one for each run's last evaluated
step: passes / prompts per kind of data/demo_heldout_prompts.jsonl (identity, format_json: English reviews,
format_json_zh: reviews wholly in Chinese, general), and the forgetting check on data/general_eval.jsonl.
A review passes its check only with the right label; "JSON format" counts the answers that are the asked
format whatever the label: one line, a JSON object whose keys are the check's and whose label is one of
the labels the prompts use (read from eval/predictions-STEP.jsonl).
The training wall time comes from the run's run_end.json and train_log.jsonl when they have it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

KINDS = ("identity", "format_json", "format_json_zh", "general")


def read_metrics(run: Path) -> list[dict]:
    path = run / "eval" / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: not found; evaluate the run first: python hf_sft_eval.py --run {run} "
                         "--prompts data/demo_heldout_prompts.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def counts(record: dict, kind: str, prefix: str = "") -> str:
    n, rate = record.get(f"{prefix}n/{kind}"), record.get(f"{prefix}pass_rate/{kind}")
    if n is None or rate is None:
        return "–"
    return f"{round(rate * n)}/{n}"


def general_eval(record: dict) -> str:
    n, rate = record.get("general/n"), record.get("general/pass_rate")
    return "–" if n is None or rate is None else f"{round(rate * n)}/{n}"


def format_total(record: dict) -> str:
    passed = total = 0
    for kind in ("format_json", "format_json_zh"):
        n, rate = record.get(f"n/{kind}"), record.get(f"pass_rate/{kind}")
        if n is None or rate is None:
            return "–"
        passed, total = passed + round(rate * n), total + n
    return f"{passed}/{total} ({passed / total:.0%})"


def json_format(run: Path, step: int) -> str:
    """Review answers in the trained format (one-line JSON object, the checked keys, a known label)."""
    path = run / "eval" / f"predictions-{step}.jsonl"
    if not path.is_file():
        return "–"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    reviews = [r for r in rows if r["kind"] in ("format_json", "format_json_zh")]
    labels = {v for r in reviews for v in json.loads(r["reference"]).values()}
    keys = {k for r in reviews for k in json.loads(r["reference"])}
    ok = 0
    for r in reviews:
        text = r["prediction"].strip()
        try:
            answer = json.loads(text)
        except ValueError:
            continue
        ok += ("\n" not in text and isinstance(answer, dict) and set(answer) == keys
               and all(v in labels for v in answer.values()))
    return f"{ok}/{len(reviews)} ({ok / len(reviews):.0%})" if reviews else "–"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="hf_sft.py output folders evaluated on the held-out prompts")
    args = parser.parse_args(argv)
    rows = []
    for run in map(Path, args.runs):
        records = read_metrics(run)
        base = next((r for r in records if r["step"] == 0), None)
        if base is not None and not any(label == "base" for label, _, _ in rows):
            rows.append(("base", base, json_format(run, 0)))
        tuned = [r for r in records if r["step"] > 0]
        if tuned:
            step = tuned[-1]["step"]
            rows.append((f"{run.name} step {step}", tuned[-1], json_format(run, step)))
    print("| model | identity | reviews EN | reviews ZH | JSON format | right label | general (held-out) "
          "| general_eval.jsonl |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, record, fmt in rows:
        cells = [counts(record, k) for k in KINDS[:3]] + [fmt, format_total(record), counts(record, "general"),
                                                         general_eval(record)]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
