"""`hf_sft_eval.py compare A B --prompts FILE`: two models, the same prompts, the same decoding, side by side.

    python hf_sft_eval.py compare smollm2-135m-instruct outputs/demo --prompts data/demo_eval_prompts.jsonl
    # -> outputs/compare/smollm2-135m-instruct_vs_demo/{compare.md, compare.html, compare.jsonl}

A and B are each a run folder (its best checkpoint as the evaluator ranked it in RUN/eval/metrics.jsonl, else
its latest model), `RUN:STEP`, a checkpoint folder or a model name. Each prompt is scored with its checks
(`contains`, JSON checks) and, with a reference, exact match (sft.evaluate.metrics); B wins a prompt when its
check score is higher. A paired sign test over the prompts that differ, and a paired bootstrap of the mean
score difference, say whether "B is better" is more than chance. `--judge_url` adds an OpenAI-compatible
judge that sees both answers in both orders: a verdict counts only when both orders agree.

compare.jsonl, one line per prompt:
    {"id", "kind", "prompt", "reference", "check", "outcome": "A"|"B"|"tie"|"unscored",
     "a": {"answer", "num_tokens", "stopped", "score", "pass"?, "reasons"?, ...}, "b": {...},
     "judge"?: {"verdict": "A"|"B"|"tie"|"invalid", "replies": [first order, swapped order]}}
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sft.config import load_run_config, parse_args
from sft.evaluate.evaluator import PromptItem, _resolve, read_prompt_items
from sft.evaluate.inference import (
    Generated,
    generate_answers,
    load_for_inference,
    prompt_ids,
    resolve_eval_dtype,
)
from sft.evaluate.options import CompareArguments, GenerationOptions

logger = logging.getLogger(__name__)

JUDGE_KEY_ENV = "SFT_JUDGE_API_KEY"
JUDGE_SYSTEM = "You are a strict, impartial judge. You compare two answers to the same user prompt."
JUDGE_TEMPLATE = ("[User prompt]\n{prompt}\n\n[Answer 1]\n{first}\n\n[Answer 2]\n{second}\n\n"
                  "Which answer is better: more correct, more helpful, and following the prompt's instructions? "
                  "Reply with exactly one of: 1, 2, tie.")
VERDICT = re.compile(r"\b(tie|1|2)\b", re.I)


@dataclass
class Side:
    """One model of the comparison: what was asked for, what is loaded, how its prompts are rendered."""

    spec: str
    path: str
    template: str = "auto"
    system_prompt: str | None = None
    note: str = ""
    dtype: str = "float32"  # the weights' dtype on the CPU (--eval_dtype, resolved)

    @property
    def name(self) -> str:
        return Path(self.spec.rstrip("/")).name or self.spec


# ------------------------------------------------------------------------------------ resolving


def resolve_side(spec: str, template: str | None = None, system_prompt: str | None = None) -> Side:
    """A run folder, RUN:STEP, a checkpoint folder or a model name -> the model to load and its template."""
    run, step = spec, None
    if ":" in spec and os.path.isdir(spec.rsplit(":", 1)[0]):
        run, step_text = spec.rsplit(":", 1)
        if not step_text.isdigit():
            raise ValueError(f"{spec}: after RUN: expected a step number, e.g. {run}:50")
        step = int(step_text)
    folder = Path(run)
    run_dir = folder if (folder / "sft_config.yaml").is_file() else (
        folder.parent if (folder.parent / "sft_config.yaml").is_file() else None)
    side = Side(spec, run)
    if run_dir is not None:
        model = load_run_config(run_dir).model
        side.template, side.system_prompt = model.template, model.system_prompt
    if template is not None:
        side.template = template
    if system_prompt is not None:
        side.system_prompt = system_prompt
    if run_dir is not None and folder == run_dir:
        side.path, side.note = _run_model(run_dir, step, spec)
    elif step is not None:
        raise ValueError(f"{spec}: RUN:STEP needs a run folder (with sft_config.yaml) before the colon")
    return side


def _run_model(run: Path, step: int | None, spec: str) -> tuple[str, str]:
    """(model path, how it was chosen) for a run: the given step, else the evaluator's best, else the latest."""
    from sft.evaluate.report import best_record, read_metrics
    from sft.train.checkpoints import complete_checkpoints, read_run_end

    checkpoints = dict(complete_checkpoints(run))
    end = read_run_end(run) or {}
    final_step = end.get("global_step") if end.get("final_model") else None
    if step is not None:
        if step in checkpoints:
            return str(checkpoints[step]), f"step {step}"
        if step == final_step:
            return str(run), f"final model (step {step})"
        known = sorted(checkpoints) + ([final_step] if final_step is not None else [])
        raise FileNotFoundError(f"{spec}: no complete checkpoint at step {step}; steps here: "
                                f"{', '.join(map(str, known)) or 'none'}")
    records = [r for r in read_metrics(run / "eval") if r.get("step") != 0] if (run / "eval").is_dir() else []
    best = best_record(records)
    if best is not None:
        how = f"best checkpoint as evaluated ({best['checkpoint']}, step {best['step']}" + (
            f", pass rate {best['pass_rate']:.3g})" if "pass_rate" in best else ")")
        if best["checkpoint"] == "final" or best["step"] == final_step and best["step"] not in checkpoints:
            return str(run), how
        if best["step"] in checkpoints:
            return str(checkpoints[best["step"]]), how
        logger.warning("%s: the best evaluated checkpoint (step %s) is gone (rotated); using the latest model",
                       spec, best["step"])
    if final_step is not None:
        return str(run), f"final model (step {final_step}; run not evaluated: `hf_sft_eval.py --run {run}` ranks it)"
    if checkpoints:
        last = max(checkpoints)
        return str(checkpoints[last]), f"latest checkpoint (step {last}; the run is not evaluated yet)"
    raise FileNotFoundError(f"{spec}: the run has no complete checkpoint and no final model yet")


def default_prompts(sides: list[Side]) -> str:
    for side in sides:
        run = Path(side.spec.rsplit(":", 1)[0])
        if (run / "sft_config.yaml").is_file():
            prompts = load_run_config(run).data.eval_prompts
            if prompts:
                return _resolve(prompts, run)
    raise ValueError("no --prompts given and neither A nor B is a run with --eval_prompts; pass --prompts FILE")


# ---------------------------------------------------------------------------------- generation


def answer_all(side: Side, items: list[PromptItem], generation: GenerationOptions) -> list[Generated]:
    """Load one model, answer every prompt (batched, the evaluator's generate path), free it."""
    model, tokenizer = load_for_inference(side.path, dtype=side.dtype)
    try:
        prompts = [prompt_ids(item.conversation, tokenizer, side.template, side.system_prompt) for item in items]
        return generate_answers(model, tokenizer, prompts, generation)
    finally:
        del model


def score_side(item: PromptItem, answer: Generated) -> dict:
    """The answer with its check results; `score` is what wins a prompt: the check's pass (0/1), else exact
    match with the reference (0/1), else None (unscored)."""
    from sft.evaluate.metrics import score_prediction

    record = {"answer": answer.text, "num_tokens": answer.num_tokens, "stopped": answer.stopped,
              **score_prediction(answer.text, item.reference, item.check)}
    record["score"] = float(record["pass"]) if "pass" in record else record.get("exact_match")
    return record


def outcome(a: dict, b: dict) -> str:
    if a["score"] is None or b["score"] is None:
        return "unscored"
    return "B" if b["score"] > a["score"] else "A" if a["score"] > b["score"] else "tie"


# ---------------------------------------------------------------------------------- statistics


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value for `wins` vs `losses` (ties dropped): 1.0 when nothing differs."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap(diffs: list[float], samples: int, seed: int = 0) -> dict | None:
    """Mean of the paired differences (B - A) and its 95% percentile interval over `samples` resamples."""
    if not diffs or samples < 1:
        return None
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    return {"mean": round(sum(diffs) / n, 4), "ci95": [round(means[int(0.025 * (samples - 1))], 4),
                                                       round(means[int(0.975 * (samples - 1))], 4)],
            "samples": samples}


def summarize(rows: list[dict], bootstrap_samples: int) -> dict:
    """Win/loss/tie counts (all prompts and per kind), the sign test and the bootstrap, B relative to A."""
    from sft.evaluate.metrics import aggregate

    def counts(members: list[dict]) -> dict:
        out = {key: sum(r["outcome"] == value for r in members)
               for key, value in (("b_wins", "B"), ("a_wins", "A"), ("ties", "tie"), ("unscored", "unscored"))}
        out["p_value"] = sign_test(out["b_wins"], out["a_wins"])  # unrounded: 36 wins to 0 is p = 2.9e-11, not 0
        return out

    kinds = [r["kind"] for r in rows]
    scored = [r for r in rows if r["outcome"] != "unscored"]
    summary = {"n": len(rows), **counts(rows),
               "per_kind": {kind: counts([r for r in rows if r["kind"] == kind]) for kind in dict.fromkeys(kinds)},
               "bootstrap": paired_bootstrap([r["b"]["score"] - r["a"]["score"] for r in scored], bootstrap_samples)}
    metrics = {side: aggregate([{k: v for k, v in r[side].items() if k != "answer"} for r in rows], kinds)
               for side in ("a", "b")}
    summary["metrics"] = metrics
    summary["deltas"] = {key: round(metrics["b"][key] - value, 4) for key, value in metrics["a"].items()
                         if isinstance(value, float) and isinstance(metrics["b"].get(key), float)}
    judged = [r["judge"]["verdict"] for r in rows if "judge" in r]
    if judged:
        summary["judge"] = {"b_wins": judged.count("B"), "a_wins": judged.count("A"), "ties": judged.count("tie"),
                            "invalid": judged.count("invalid"),
                            "p_value": sign_test(judged.count("B"), judged.count("A"))}
    return summary


def verdict_line(summary: dict) -> str:
    """One sentence a user can act on."""
    b, a, p = summary["b_wins"], summary["a_wins"], summary["p_value"]
    if b == a:
        return f"No difference on the checks: B wins {b}, A wins {a} (sign test p = {p:.3g})."
    better = "B" if b > a else "A"
    strength = "significant at 5%" if p < 0.05 else "NOT significant at 5%: could be chance"
    return (f"{better} is better on the checks: B wins {b}, A wins {a}, ties {summary['ties']} "
            f"(sign test p = {p:.3g}, {strength}).")


# --------------------------------------------------------------------------------------- judge


def judge_rows(rows: list[dict], url: str, model: str | None, api_key: str | None, max_tokens: int) -> str:
    """Add a "judge" verdict to every row (both orders asked; they must agree); returns the judge model name."""
    base = url.rstrip("/")
    model = model or _first_model(base, api_key)
    for k, row in enumerate(rows):
        first = _ask_judge(base, model, api_key, max_tokens, row["prompt"], row["a"]["answer"], row["b"]["answer"])
        swapped = _ask_judge(base, model, api_key, max_tokens, row["prompt"], row["b"]["answer"], row["a"]["answer"])
        row["judge"] = {"verdict": combine_verdicts(parse_verdict(first), parse_verdict(swapped)),
                        "replies": [first, swapped]}
        logger.info("judge %d/%d: %s", k + 1, len(rows), row["judge"]["verdict"])
    return model


def parse_verdict(reply: str) -> str | None:
    """"1", "2", "tie" (first one named in the reply), or None when the reply names none."""
    match = VERDICT.search(reply or "")
    return match.group(1).lower() if match else None


def combine_verdicts(first: str | None, swapped: str | None) -> str:
    """first: A shown as answer 1; swapped: B shown as answer 1. Agreement wins, disagreement is a tie
    (the judge followed the position, not the answer), an unreadable reply is "invalid"."""
    if first is None or swapped is None:
        return "invalid"
    as_first = {"1": "A", "2": "B", "tie": "tie"}[first]
    as_swapped = {"1": "B", "2": "A", "tie": "tie"}[swapped]
    return as_first if as_first == as_swapped else "tie"


def _ask_judge(base: str, model: str, api_key: str | None, max_tokens: int, prompt: str, first: str,
               second: str) -> str:
    body = {"model": model, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "system", "content": JUDGE_SYSTEM},
                         {"role": "user", "content": JUDGE_TEMPLATE.format(prompt=prompt, first=first, second=second)}]}
    reply = _request(base + "/chat/completions", api_key, body)
    return reply["choices"][0]["message"].get("content") or ""


def _first_model(base: str, api_key: str | None) -> str:
    models = _request(base + "/models", api_key).get("data") or []
    if not models:
        raise ValueError(f"--judge_url {base}: /models lists no model; pass --judge_model")
    return models[0]["id"]


def _request(url: str, api_key: str | None, body: dict | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise ValueError(f"judge {url}: HTTP {err.code}: {err.read().decode(errors='replace')[:300]}") from err
    except OSError as err:
        raise ValueError(f"judge {url}: cannot connect ({err}); is the server up? (--judge_url)") from err


# -------------------------------------------------------------------------------------- reports


def write_markdown(path: Path, sides: list[Side], rows: list[dict], summary: dict, generation: GenerationOptions,
                   prompts_file: str) -> None:
    a, b = sides
    lines = [f"# Compare: A = `{a.spec}` vs B = `{b.spec}`", "",
             *(f"- {label}: `{side.path}`" + (f", {side.note}" if side.note else "")
               + f" (template {side.template}, {side.dtype})" for label, side in (("A", a), ("B", b))),
             f"- prompts: `{prompts_file}` ({len(rows)}); decoding: "
             f"{'sampling' if generation.do_sample else 'greedy'}, max_new_tokens {generation.max_new_tokens}", "",
             f"**{verdict_line(summary)}**", ""]
    if summary.get("bootstrap"):
        boot = summary["bootstrap"]
        lines += [f"Mean score difference B − A: {boot['mean']:+.3f} (95% bootstrap interval "
                  f"[{boot['ci95'][0]:+.3f}, {boot['ci95'][1]:+.3f}], {boot['samples']} resamples).", ""]
    lines += ["| kind | B wins | A wins | ties | sign test p |", "|---|---:|---:|---:|---:|"]
    for kind, c in [("all", summary), *summary["per_kind"].items()]:
        lines.append(f"| {kind} | {c['b_wins']} | {c['a_wins']} | {c['ties']} | {c['p_value']:.3g} |")
    lines += ["", "| metric | A | B | Δ (B − A) |", "|---|---:|---:|---:|"]
    for key, delta in summary["deltas"].items():
        lines.append(f"| {key} | {summary['metrics']['a'][key]:.4g} | {summary['metrics']['b'][key]:.4g} | "
                     f"{delta:+.4g} |")
    if "judge" in summary:
        j = summary["judge"]
        lines += ["", f"Judge `{summary.get('judge_model')}` (both orders, agreement required): B wins {j['b_wins']}, "
                  f"A wins {j['a_wins']}, ties {j['ties']}, unreadable {j['invalid']} (sign test p = {j['p_value']:.3g})."]
    lines += ["", "## Prompts where the checks differ", ""]
    differing = [r for r in rows if r["outcome"] in ("A", "B")]
    for r in differing:
        lines += [f"### {r['id']} ({r['kind']}): {r['outcome']} wins", "", f"> {_quote(r['prompt'])}", "",
                  f"- A: {_inline(r['a']['answer'])}" + _reasons(r["a"]),
                  f"- B: {_inline(r['b']['answer'])}" + _reasons(r["b"]), ""]
    if not differing:
        lines.append("(none)")
    lines += ["", "Every prompt, side by side with the differences highlighted: `compare.html`; data: `compare.jsonl`."]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _quote(text: str) -> str:
    return text.replace("\n", "\n> ")


def _inline(text: str, width: int = 300) -> str:
    text = " ".join(text.split())
    return "`" + (text if len(text) <= width else text[:width] + "…").replace("`", "'") + "`"


def _reasons(side: dict) -> str:
    if "pass" not in side:
        return ""
    return " ✓" if side["pass"] else " ✗ " + "; ".join(side.get("reasons", []))


def write_reports(out: Path, sides: list[Side], rows: list[dict], summary: dict, generation: GenerationOptions,
                  prompts_file: str) -> None:
    from sft.evaluate.compare_html import render_html
    from sft.files import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "compare.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_markdown(out / "compare.md", sides, rows, summary, generation, prompts_file)
    meta = {"a": vars(sides[0]), "b": vars(sides[1]), "prompts": prompts_file, "verdict": verdict_line(summary),
            "decoding": f"{'sampling' if generation.do_sample else 'greedy'}, max_new_tokens "
                        f"{generation.max_new_tokens}"}
    write_text_atomic(out / "compare.html", render_html(meta, rows, summary))


# ----------------------------------------------------------------------------------------- main


def compare_main(argv: list[str]) -> int:
    args, generation = parse_args((CompareArguments, GenerationOptions), argv, prog="hf_sft_eval.py compare",
                                  description="Compare two models on the same prompts (A/B report).",
                                  positional="models")
    from sft.evaluate.cli import configure_cpu

    configure_cpu(args.threads, args.nice)
    dtype, why = resolve_eval_dtype(args.eval_dtype)
    sides = [resolve_side(spec, args.template, args.system_prompt) for spec in args.models]
    for side in sides:
        side.dtype = dtype
    logger.info("both models load in %s (%s)", dtype, why)
    prompts_file = args.prompts or default_prompts(sides)
    items = read_prompt_items(prompts_file)[:args.num_prompts]
    if not items:
        raise ValueError(f"--prompts {prompts_file}: no prompts")
    out = Path(args.output_dir or Path("outputs") / "compare" / f"{sides[0].name}_vs_{sides[1].name}")
    answers = []
    for label, side in zip("AB", sides):
        logger.info("%s = %s -> %s %s: answering %d prompts", label, side.spec, side.path, side.note, len(items))
        answers.append(answer_all(side, items, generation))
    rows = [{"id": item.id, "kind": item.kind, "prompt": item.conversation.messages[-1].content,
             "reference": item.reference, "check": item.check, "a": score_side(item, a), "b": score_side(item, b)}
            for item, a, b in zip(items, *answers)]
    for row in rows:
        row["outcome"] = outcome(row["a"], row["b"])
    judge_model = None
    if args.judge_url:
        judge_model = judge_rows(rows, args.judge_url, args.judge_model,
                                 args.judge_api_key or os.environ.get(JUDGE_KEY_ENV), args.judge_max_tokens)
    summary = summarize(rows, args.bootstrap_samples)
    if judge_model:
        summary["judge_model"] = judge_model
    write_reports(out, sides, rows, summary, generation, prompts_file)
    print(verdict_line(summary))
    print(f"reports: {out / 'compare.md'}, {out / 'compare.html'}, {out / 'compare.jsonl'}", flush=True)
    return 0

