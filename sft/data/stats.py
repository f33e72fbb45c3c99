"""Dataset statistics and noisy-answer flags for `--stats` (JSON report, Markdown summary, PNG).

Flags never drop a record: they point at records worth a look. An answer is flagged when it
- `empty_answer`: has no letter, digit or CJK character (e.g. "。" or "..."),
- `answer_equals_question`: equals the user turn before it (whitespace/case ignored),
- `repeated_char_run`: holds one non-space character REPEAT_RUN or more times in a row,
- `unbalanced_brackets`: has unmatched (), [], {}, （）, 【】, 《》, “” pairs or an odd number of '"'.
A record (not an answer) is flagged `duplicate_keys` when one of its JSON objects repeats a key: the
parser kept the last value silently (sft.data.json_checks.has_duplicate_keys).

Token lengths (with a tokenizer) estimate the ChatML length: content tokens + 5 per message + 5 for the
system block (`<|im_start|>role\\n ... <|im_end|>\\n`), without the default system prompt's text.
"""
from __future__ import annotations

import json
import re
from array import array
from collections import Counter
from typing import Any

import numpy as np

from sft.conversation import Conversation, is_plain_text

REPEAT_RUN = 20
_REPEAT = re.compile(r"(\S)\1{%d,}" % (REPEAT_RUN - 1))
_PAIRS = (("(", ")"), ("[", "]"), ("{", "}"), ("（", "）"), ("【", "】"), ("《", "》"), ("“", "”"))
FLAGS = ("empty_answer", "answer_equals_question", "repeated_char_run", "unbalanced_brackets", "duplicate_keys")
PERCENTILES = (50, 90, 95, 99)
MAX_EXAMPLES = 20
_TEMPLATE_TOKENS_PER_MESSAGE = 5


def answer_flags(question: str, answer: str) -> list[str]:
    """Names of the noisy-answer flags that apply to one assistant answer."""
    flags = []
    if not any(ch.isalnum() for ch in answer):
        flags.append("empty_answer")
    elif " ".join(answer.lower().split()) == " ".join(question.lower().split()):
        flags.append("answer_equals_question")
    if _REPEAT.search(answer):
        flags.append("repeated_char_run")
    if any(answer.count(a) != answer.count(b) for a, b in _PAIRS) or answer.count('"') % 2:
        flags.append("unbalanced_brackets")
    return flags


def record_features(conv: Conversation) -> tuple:
    """(messages, chars, prompt chars, answer chars, noisy flags): what StatsCollector needs of a
    record; a small tuple so that worker processes can compute it and send it back cheaply."""
    prompt = answer = 0
    question = ""
    flags: list[str] = []
    plain = is_plain_text(conv)
    for m in conv.messages:
        if m.role == "assistant":
            answer += len(m.content)
            if not m.tool_calls and not plain:
                flags += answer_flags(question, m.content)
        else:
            prompt += len(m.content)
            if m.role == "user":
                question = m.content
    system = len(conv.system or "")
    return len(conv.messages), prompt + answer + system, prompt + system, answer, tuple(flags)


class StatsCollector:
    """Accumulates per-record numbers in compact arrays (a few bytes per record)."""

    def __init__(self, tokenizer: Any = None, max_length: int = 2048, batch: int = 512):
        self.tokenizer, self.max_length, self.batch = tokenizer, max_length, batch
        self.kinds: Counter = Counter()
        self.turns: Counter = Counter()
        self.chars, self.prompt_chars, self.answer_chars = array("I"), array("I"), array("I")
        self.tokens = array("I")
        self.flags = {name: {"count": 0, "examples": []} for name in FLAGS}
        self._pending: list[tuple[str, int]] = []

    def add(self, kind: str, where: str, features: tuple, conv: Conversation | None = None) -> None:
        """Count one written record; `features` from record_features(conv). `conv` is needed only
        when a tokenizer is set."""
        n_messages, chars, prompt, answer, flags = features
        self.kinds[kind] += 1
        self.turns[n_messages] += 1
        self.chars.append(chars)
        self.prompt_chars.append(prompt)
        self.answer_chars.append(answer)
        for flag in flags:
            self._flag(flag, where)
        if self.tokenizer is not None:
            text = "\n".join([conv.system or ""] + [m.content for m in conv.messages])
            self._pending.append((text, _TEMPLATE_TOKENS_PER_MESSAGE * (len(conv.messages) + 1)))
            if len(self._pending) >= self.batch:
                self._flush_tokens()

    def _flag(self, flag: str, where: str) -> None:
        entry = self.flags[flag]
        entry["count"] += 1
        if len(entry["examples"]) < MAX_EXAMPLES:
            entry["examples"].append(where)

    def _flush_tokens(self) -> None:
        if not self._pending:
            return
        ids = self.tokenizer([t for t, _ in self._pending], add_special_tokens=False)["input_ids"]
        self.tokens.extend(len(x) + extra for x, (_, extra) in zip(ids, self._pending))
        self._pending.clear()

    def report(self, counts: dict, extra: dict) -> dict:
        """The JSON report: `counts` (read/written/...) and `extra` (rejects by reason, mix, ...) included."""
        self._flush_tokens()
        unit, lengths = ("tokens", self.tokens) if self.tokenizer is not None else ("chars", self.chars)
        over = int((np.frombuffer(lengths, dtype=np.uint32) > self.max_length).sum()) if len(lengths) else 0
        return {
            "counts": counts,
            **extra,
            "kinds": dict(self.kinds.most_common()),
            "turns": {"messages_per_conversation": {str(k): v for k, v in sorted(self.turns.items())}},
            "chars": {"conversation": _describe(self.chars), "prompt": _describe(self.prompt_chars),
                      "answer": _describe(self.answer_chars)},
            "tokens": _describe(self.tokens) if self.tokenizer is not None else None,
            "over_max_length": {"max_length": self.max_length, "unit": unit, "count": over,
                                "share": round(over / len(lengths), 6) if len(lengths) else 0.0},
            "noisy_answers": self.flags,
        }

    def write(self, report: dict, json_path: str, md_path: str, png_path: str) -> None:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, ensure_ascii=False, indent=2)
        with open(md_path, "w", encoding="utf-8") as f:
            f.write(markdown_summary(report, png_path))
        self._plot(png_path)

    def _plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        series = [("characters per conversation", self.chars)]
        if self.tokenizer is not None:
            series.append(("tokens per conversation (ChatML estimate)", self.tokens))
        fig, axes = plt.subplots(len(series), 1, figsize=(8, 3.2 * len(series)), squeeze=False)
        for ax, (title, data) in zip(axes[:, 0], series):
            values = np.frombuffer(data, dtype=np.uint32) if len(data) else np.zeros(1, dtype=np.uint32)
            ax.hist(values, bins=80, log=True, color="#4477aa")
            if "tokens" in title:  # max_length counts tokens: never drawn on the characters axis
                ax.axvline(self.max_length, color="#cc3311", linestyle="--", label=f"max_length={self.max_length}")
                ax.legend()
            ax.set_title(title)
            ax.set_ylabel("records (log)")
        fig.tight_layout()
        fig.savefig(path, dpi=100, format="png")
        plt.close(fig)


def _describe(values: array) -> dict:
    if not len(values):
        return {"count": 0}
    a = np.frombuffer(values, dtype=np.uint32)
    out = {"count": int(a.size), "mean": round(float(a.mean()), 1), "min": int(a.min())}
    out.update({f"p{p}": int(np.percentile(a, p)) for p in PERCENTILES})
    out["max"] = int(a.max())
    return out


def mix_table(mix: list[dict]) -> str:
    """The --mix entries as a Markdown table; a set that fell short of its share is marked."""
    lines = ["| file | requested share | achieved share | needed | usable records | repeated | read | |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for m in mix:
        short = m["written"] + m.get("repeated", 0) < m["target"]
        note = "**short of its share**" if short else "repeated up to its share" if m.get("repeated") else ""
        lines.append(f"| {m['file']} | {m['requested_share']:.2%} | {m['achieved_share']:.2%} | {m['target']} | "
                     f"{m['written']} | {m.get('repeated', 0)} | {m['read']} | {note} |")
    return "\n".join(lines)


def markdown_summary(report: dict, png_path: str) -> str:
    c = report["counts"]
    lines = ["# Dataset build report", "",
             " ".join(f"{k}={v}" for k, v in c.items()), "",
             "## Records per kind", "", "| kind | records |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in report["kinds"].items()]
    lines += ["", "## Lengths", "", "| measure | mean | p50 | p90 | p95 | p99 | max |", "|---|---:|---:|---:|---:|---:|---:|"]
    rows = [(f"chars: {k}", v) for k, v in report["chars"].items()]
    if report.get("tokens"):
        rows.append(("tokens (ChatML estimate)", report["tokens"]))
    for name, d in rows:
        if d.get("count"):
            lines.append(f"| {name} | {d['mean']} | {d['p50']} | {d['p90']} | {d['p95']} | {d['p99']} | {d['max']} |")
    o = report["over_max_length"]
    lines += ["", f"Over max_length={o['max_length']} {o['unit']}: {o['count']} ({o['share']:.2%}).", "",
              "## Messages per conversation", "", "| messages | records |", "|---:|---:|"]
    lines += [f"| {k} | {v} |" for k, v in report["turns"]["messages_per_conversation"].items()]
    lines += ["", "## Rejected and duplicate records", ""]
    lines += [f"- rejected `{k}`: {v}" for k, v in report.get("rejected_by_reason", {}).items()] or ["- none rejected"]
    lines += [f"- duplicates ({k}): {v}" for k, v in report.get("duplicates_by_type", {}).items()]
    lines += ["", "## Flagged noisy answers (kept; worth a look)", "", "| flag | records | first examples |", "|---|---:|---|"]
    for name, d in report["noisy_answers"].items():
        lines.append(f"| {name} | {d['count']} | {', '.join(d['examples'][:5])} |")
    if report.get("mix"):
        lines += ["", "## Mixing", "", mix_table(report["mix"])]
    lines += ["", f"![length histogram]({png_path.rsplit('/', 1)[-1]})", ""]
    return "\n".join(lines)
