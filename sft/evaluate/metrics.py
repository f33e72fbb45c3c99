"""Scoring for the evaluator: generated answer vs reference, and format checks from the eval prompts.

Overlap metrics follow LLaMA-Factory's SFT evaluation (`compute_metrics` with `predict_with_generate`),
all ×100 and averaged per sample:
- `bleu-4`: sentence BLEU-4 over CHARACTERS, nltk `sentence_bleu` with `SmoothingFunction().method3`.
  A reply shorter than 4 characters cannot reach 100 even when identical (no 3-/4-grams exist; method3
  smooths them to a small value): bleu4("ab", "ab") ≈ 59.46, as in LLaMA-Factory.
- `rouge-1`, `rouge-2`, `rouge-l`: F-measure on jieba words (whitespace-only tokens dropped, no
  lowercasing), computed with Google's `rouge_score` and a jieba tokenizer (its default tokenizer
  drops every non-ASCII character, so Chinese would score 0).

The one known difference from LLaMA-Factory: it scores with the `rouge-chinese` package, which counts
ROUGE-1/2 overlap on SETS of n-grams, while `rouge_score` counts multisets (clipped counts). Scores
differ only when an n-gram repeats within one text: reply "谢谢，谢谢" vs reference "谢谢" is
ROUGE-1 50.0 here, 66.67 there. ROUGE-L is plain LCS over the word lists in both. (rouge-chinese also
adds 1e-8 to the F denominator, so its "100" is 99.999999; invisible after rounding.)

Cost bound: every text is cut to its first `MAX_METRIC_CHARS` characters before BLEU/ROUGE, and each
side of ROUGE to its first `MAX_ROUGE_TOKENS` words, since rouge_score's LCS is a pure-Python O(n·m)
table (1000×1000 words ≈ 0.4 s; 2500×2500 ≈ 2.5 s). Texts are truncated, never skipped. Typical
references are short, so the word cap only bites when both sides are long.

Format checks (`check` objects of data/*eval*.jsonl, see data/README.md "Held-out evaluation
prompts"): `contains` (case-sensitive), `json_keys`, `json_values`.

nltk, rouge_score and jieba are imported on first use: together they take seconds to import and load.
"""
from __future__ import annotations

import functools
import logging
import warnings

import orjson

MAX_METRIC_CHARS = 4000  # characters of prediction/reference fed to BLEU and ROUGE
MAX_ROUGE_TOKENS = 1000  # jieba words per side fed to ROUGE (LCS is quadratic)
ROUND_DIGITS = 4

ROUGE_KEYS = ("rouge-1", "rouge-2", "rouge-l")
CHECK_KEYS = ("contains", "json_keys", "json_values")
_ROUGE_TYPES = {"rouge-1": "rouge1", "rouge-2": "rouge2", "rouge-l": "rougeL"}


# --- overlap metrics -------------------------------------------------------------------------------

@functools.cache
def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)  # silences the "Building prefix dict ..." banner on stderr
    jieba.initialize()
    return jieba


def jieba_words(text: str) -> list[str]:
    """jieba words of `text`, whitespace-only tokens dropped: "我爱 北京" -> ["我", "爱", "北京"]."""
    return [word for word in _jieba().cut(text) if word.strip()]


class _JiebaTokenizer:
    """The `tokenize()` object rouge_score asks for; caps the word count (see MAX_ROUGE_TOKENS)."""

    def tokenize(self, text: str) -> list[str]:
        return jieba_words(text)[:MAX_ROUGE_TOKENS]


@functools.cache
def _rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(list(_ROUGE_TYPES.values()), tokenizer=_JiebaTokenizer())


@functools.cache
def _nltk_bleu():
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    return functools.partial(sentence_bleu, smoothing_function=SmoothingFunction().method3)


def bleu4(prediction: str, reference: str) -> float:
    """Character BLEU-4 ×100 (LLaMA-Factory's definition); 0.0 when either side is empty."""
    prediction, reference = prediction[:MAX_METRIC_CHARS], reference[:MAX_METRIC_CHARS]
    if not prediction or not reference:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns about zero n-gram overlaps; a 0 score says it
        return float(_nltk_bleu()([list(reference)], list(prediction))) * 100


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measure ×100 on jieba words: {"rouge-1": .., "rouge-2": .., "rouge-l": ..}.

    All 0.0 when either side has no words.
    """
    prediction, reference = prediction[:MAX_METRIC_CHARS], reference[:MAX_METRIC_CHARS]
    if not prediction.strip() or not reference.strip():
        return {key: 0.0 for key in ROUGE_KEYS}
    scores = _rouge_scorer().score(reference, prediction)  # rouge_score's order: (target, prediction)
    return {key: scores[name].fmeasure * 100 for key, name in _ROUGE_TYPES.items()}


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when equal after stripping and collapsing whitespace runs to one space, else 0.0."""
    return float(" ".join(prediction.split()) == " ".join(reference.split()))


def contains(prediction: str, needles: list[str], *, case_sensitive: bool = False) -> float:
    """1.0 when every needle occurs in the prediction (case-insensitive unless asked), else 0.0."""
    if not case_sensitive:
        prediction, needles = prediction.casefold(), [needle.casefold() for needle in needles]
    return float(all(needle in prediction for needle in needles))


# --- format checks ---------------------------------------------------------------------------------

def validate_check(check: dict) -> None:
    """Raise ValueError for unknown keys or wrongly typed values (read_prompt_items calls it at start)."""
    unknown = [key for key in check if key not in CHECK_KEYS]
    if unknown:
        raise ValueError(
            f"unknown check key {unknown[0]!r} in {check!r}; known keys: {', '.join(CHECK_KEYS)}. "
            "Fix the eval prompt file (see data/README.md, 'Held-out evaluation prompts')."
        )
    for key in ("contains", "json_keys"):
        value = check.get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValueError(f"check {key!r} must be a list of strings, got {value!r}")
    values = check.get("json_values", {})
    if not isinstance(values, dict) or not all(isinstance(v, list) for v in values.values()):
        raise ValueError(
            f"check 'json_values' must map each key to a list of allowed values, got {values!r}"
        )


def _json_reasons(text: str, check: dict) -> tuple[bool, list[str]]:
    """(json_valid, reasons) for the JSON part of a check; the whole stripped text must be one object."""
    if text.startswith("```"):
        return False, ["wrapped in a code fence"]
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        return False, [f"not valid JSON: {error}"]
    if not isinstance(obj, dict):
        return False, [f"not a JSON object: got {type(obj).__name__}"]
    reasons = []
    required = list(dict.fromkeys([*check.get("json_keys", []), *check.get("json_values", {})]))
    reasons += [f"missing key {key!r}" for key in required if key not in obj]
    for key, allowed in check.get("json_values", {}).items():
        if key in obj and obj[key] not in allowed:
            reasons.append(f"value {obj[key]!r} for {key!r} not in {allowed!r}")
    return True, reasons


def check_format(prediction: str, check: dict) -> dict:
    """Run one eval prompt's `check` on a reply.

    Returns {"pass": bool, "json_valid": bool | None, "reasons": [str, ...]}: `json_valid` is None when
    the check has no JSON part, else whether the whole stripped reply parses as one JSON object (a
    ```json fence fails: the demo teaches a bare one-line object). `reasons` is empty on a pass, e.g.
    ["missing 'Lumen'"], ["not valid JSON: ..."], ["value 'good' for 'sentiment' not in ['positive']"].
    `contains` is case-sensitive, as data/README.md specifies. An unknown key raises ValueError.
    """
    validate_check(check)
    reasons = [f"missing {needle!r}" for needle in check.get("contains", []) if needle not in prediction]
    json_valid = None
    if "json_keys" in check or "json_values" in check:
        json_valid, json_reasons = _json_reasons(prediction.strip(), check)
        reasons += json_reasons
    return {"pass": not reasons, "json_valid": json_valid, "reasons": reasons}


# --- per-sample records and their aggregate --------------------------------------------------------

def score_prediction(prediction: str, reference: str | None, check: dict | None) -> dict:
    """One sample's record.

    With a reference: "bleu-4", "rouge-1", "rouge-2", "rouge-l" (×100, 4 decimals) and "exact_match"
    (0/1). With a check: "pass" (bool), "json_valid" (bool, or None for checks without JSON) and
    "reasons" (list of str).
    """
    record: dict = {}
    if reference is not None:
        record["bleu-4"] = round(bleu4(prediction, reference), ROUND_DIGITS)
        record.update({k: round(v, ROUND_DIGITS) for k, v in rouge(prediction, reference).items()})
        record["exact_match"] = exact_match(prediction, reference)
    if check is not None:
        record.update(check_format(prediction, check))
    return record


def _mean(values: list) -> float:
    return round(sum(float(value) for value in values) / len(values), ROUND_DIGITS)


def aggregate(scores: list[dict], kinds: list[str] | None = None) -> dict:
    """Per-sample means of `score_prediction` records (LLaMA-Factory averages per sample too).

    Keys, each present only when at least one record has its source field (an absent or None field
    is skipped, never counted as 0):
    - "n": number of records; "n/<kind>": records per kind (with `kinds`)
    - "bleu-4", "rouge-1", "rouge-2", "rouge-l": means, ×100 scale
    - "exact_match": share of exact matches (0..1)
    - "json_valid_rate": share of JSON-checked replies that were one valid JSON object (0..1)
    - "pass_rate": share of checked replies passing (0..1); "pass_rate/<kind>" the same per kind
    All rounded to 4 decimals. `kinds[i]` is the kind of `scores[i]` ("identity", "format_json", ...).
    """
    if kinds is not None and len(kinds) != len(scores):
        raise ValueError(f"got {len(kinds)} kinds for {len(scores)} score records; pass one per record")
    result: dict = {"n": len(scores)}
    fields = {"bleu-4": "bleu-4", **{k: k for k in ROUGE_KEYS}, "exact_match": "exact_match",
              "json_valid_rate": "json_valid", "pass_rate": "pass"}
    for name, field in fields.items():
        values = [record[field] for record in scores if record.get(field) is not None]
        if values:
            result[name] = _mean(values)
    for kind in dict.fromkeys(kinds or []):
        members = [record for record, k in zip(scores, kinds) if k == kind]
        result[f"n/{kind}"] = len(members)
        passes = [record["pass"] for record in members if record.get("pass") is not None]
        if passes:
            result[f"pass_rate/{kind}"] = _mean(passes)
    return result
