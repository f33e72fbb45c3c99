"""Metrics: literal expected values, hand-computed where the point is the definition."""
import time

import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from sft.evaluate.metrics import (
    MAX_METRIC_CHARS,
    aggregate,
    bleu4,
    check_format,
    contains,
    exact_match,
    jieba_words,
    rouge,
    score_prediction,
)

JSON_CHECK = {"json_keys": ["sentiment"], "json_values": {"sentiment": ["positive"]}}
IDENTITY_CHECK = {"contains": ["Lumen", "Harbor"]}
ZH_REFERENCE = "我是 Lumen，由 Harbor Lab 开发的人工智能助手。"


def test_identical_strings_score_100():
    assert bleu4(ZH_REFERENCE, ZH_REFERENCE) == pytest.approx(100.0)
    assert rouge(ZH_REFERENCE, ZH_REFERENCE) == pytest.approx({"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0})


def test_bleu_matches_nltk_on_characters():
    prediction, reference = "我是 Lumen，一个 AI 助手。", ZH_REFERENCE
    expected = sentence_bleu(
        [list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3
    ) * 100
    assert bleu4(prediction, reference) == pytest.approx(expected)
    assert 0 < expected < 100


def test_bleu_short_identical_reply_is_below_100():
    # "ab" has no 3-/4-grams; method3 smooths their precisions to 1/2 and 1/4 (k = 1, 2 zero orders,
    # denominator 1): BLEU = (1 · 1 · 1/2 · 1/4) ** (1/4) = 8 ** -0.25 = 0.594604 (LLaMA-Factory too).
    assert bleu4("ab", "ab") == pytest.approx(100 * 8 ** -0.25)


def test_rouge_on_chinese_words_hand_computed():
    # jieba: prediction 我/爱/北京/天安门 (4 words), reference 我/爱/上海 (3 words); no word repeats,
    # so sets (LLaMA-Factory's rouge-chinese) and multisets (rouge_score) agree.
    assert jieba_words("我爱北京天安门") == ["我", "爱", "北京", "天安门"]
    assert jieba_words("我爱上海") == ["我", "爱", "上海"]
    # ROUGE-1: overlap {我, 爱} = 2; P = 2/4, R = 2/3; F = 2PR/(P+R) = (2/3)/(7/6) = 4/7 = 57.142857
    # ROUGE-2: bigrams 我爱, 爱北京, 北京天安门 vs 我爱, 爱上海; overlap 1; P = 1/3, R = 1/2;
    #          F = (1/3)/(5/6) = 2/5 = 40
    # ROUGE-L: LCS 我 爱 = 2, same P and R as ROUGE-1 -> 4/7
    assert rouge("我爱北京天安门", "我爱上海") == pytest.approx(
        {"rouge-1": 400 / 7, "rouge-2": 40.0, "rouge-l": 400 / 7}
    )


def test_rouge_counts_repeated_words_as_a_multiset():
    # jieba: 谢谢/，/谢谢 vs 谢谢. Multiset (rouge_score): overlap min(2, 1) = 1, P = 1/3, R = 1/1,
    # F = (2/3)/(4/3) = 1/2 -> 50. rouge-chinese (sets {谢谢, ，} vs {谢谢}): P = 1/2, R = 1 -> 66.67.
    assert jieba_words("谢谢，谢谢") == ["谢谢", "，", "谢谢"]
    assert rouge("谢谢，谢谢", "谢谢")["rouge-1"] == pytest.approx(50.0)


def test_rouge_keeps_case_and_non_ascii():
    assert rouge("lumen", "Lumen")["rouge-1"] == 0.0
    assert rouge("Lumen 助手", "Lumen 助手")["rouge-1"] == pytest.approx(100.0)


@pytest.mark.parametrize("prediction, reference", [("", ZH_REFERENCE), (ZH_REFERENCE, ""), ("  \n", "abc")])
def test_empty_side_scores_zero_without_error(prediction, reference):
    assert rouge(prediction, reference) == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    if not prediction or not reference:
        assert bleu4(prediction, reference) == 0.0


@pytest.mark.parametrize("kind", ["no_spaces_ascii", "no_spaces_chinese"])
def test_very_long_inputs_are_truncated_and_fast(kind):
    # Worst case for the quadratic LCS: both sides long, every character its own jieba word.
    text = "x" * 100_000 if kind == "no_spaces_ascii" else "".join(chr(0x4E00 + i % 20000) for i in range(100_000))
    rouge("热身", "热身")  # load jieba outside the timing
    start = time.perf_counter()
    scores = score_prediction(text, text[::-1], {"contains": ["x"]})
    assert time.perf_counter() - start < 3.0  # ~0.5 s alone on a loaded 2-core machine
    assert isinstance(scores["bleu-4"], float) and isinstance(scores["rouge-l"], float)
    assert bleu4(text, text) == pytest.approx(100.0)  # the first MAX_METRIC_CHARS of both sides
    assert bleu4(text, text[:MAX_METRIC_CHARS]) == pytest.approx(100.0)


def test_exact_match_normalises_whitespace_only():
    assert exact_match("  The capital\n of France  is Paris. ", "The capital of France is Paris.") == 1.0
    assert exact_match("the capital of France is Paris.", "The capital of France is Paris.") == 0.0


def test_contains_is_case_insensitive_by_default():
    assert contains("i'm LUMEN from harbor lab", ["Lumen", "Harbor"]) == 1.0
    assert contains("i'm LUMEN", ["Lumen", "Harbor"]) == 0.0
    assert contains("i'm LUMEN from harbor", ["Lumen"], case_sensitive=True) == 0.0


@pytest.mark.parametrize(
    "prediction, reasons",
    [
        ("I'm Lumen, an AI assistant built by Harbor Lab.", []),
        ("我是 Lumen，由 Harbor Lab 开发的人工智能助手。", []),
        ("I'm lumen, built by harbor lab.", ["missing 'Lumen'", "missing 'Harbor'"]),
        ("I'm Qwen, made by Alibaba Cloud.", ["missing 'Lumen'", "missing 'Harbor'"]),
        ("I'm Lumen.", ["missing 'Harbor'"]),
    ],
)
def test_check_contains(prediction, reasons):
    assert check_format(prediction, IDENTITY_CHECK) == {"pass": not reasons, "json_valid": None, "reasons": reasons}


@pytest.mark.parametrize(
    "prediction, json_valid, reasons",
    [
        ('{"sentiment": "positive"}', True, []),
        ('  {"sentiment":"positive"}\n', True, []),
        ('{"sentiment": "good"}', True, ["value 'good' for 'sentiment' not in ['positive']"]),
        ('{"sentiment": "Positive"}', True, ["value 'Positive' for 'sentiment' not in ['positive']"]),
        ('{"label": "positive"}', True, ["missing key 'sentiment'"]),
        ('["positive"]', False, ["not a JSON object: got list"]),
        ("positive", False, ["not valid JSON: unexpected character, expected a JSON value: line 1 column 1 (char 0)"]),
        ('{"sentiment": "positive"} I hope this helps!', False,
         ["not valid JSON: unexpected content after document: line 1 column 27 (char 26)"]),
        ('```json\n{"sentiment": "positive"}\n```', False, ["wrapped in a code fence"]),
    ],
)
def test_check_json(prediction, json_valid, reasons):
    assert check_format(prediction, JSON_CHECK) == {"pass": not reasons, "json_valid": json_valid, "reasons": reasons}


def test_check_json_values_alone_requires_the_key():
    check = {"json_values": {"sentiment": ["positive", "negative"]}}
    assert check_format('{"sentiment": "negative"}', check)["pass"] is True
    assert check_format("{}", check)["reasons"] == ["missing key 'sentiment'"]


def test_check_combines_contains_and_json():
    check = {"contains": ["positive"], "json_keys": ["sentiment", "score"]}
    result = check_format('{"sentiment": "negative"}', check)
    assert result == {"pass": False, "json_valid": True, "reasons": ["missing 'positive'", "missing key 'score'"]}


def test_unknown_check_key_names_it_and_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown check key 'regex'.*known keys: contains, json_keys, json_values"):
        check_format("x", {"contains": ["x"], "regex": "^x$"})


def test_malformed_check_value_is_an_error():
    with pytest.raises(ValueError, match=r"check 'contains' must be a list of strings, got 'Lumen'"):
        check_format("Lumen", {"contains": "Lumen"})


def test_score_prediction_fields():
    record = score_prediction('{"sentiment": "positive"}', '{"sentiment": "positive"}', JSON_CHECK)
    assert record == {
        "bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "exact_match": 1.0,
        "pass": True, "json_valid": True, "reasons": [],
    }
    assert set(score_prediction("Paris", None, {"contains": ["Paris"]})) == {"pass", "json_valid", "reasons"}
    assert set(score_prediction("Paris", "Paris.", None)) == {"bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match"}
    assert score_prediction("我爱北京天安门", "我爱上海", None)["rouge-1"] == 57.1429  # 4 decimals


def test_aggregate_means_and_per_kind_pass_rates():
    scores = [
        {"bleu-4": 10.0, "rouge-1": 20.0, "exact_match": 0.0, "pass": True, "json_valid": None},
        {"bleu-4": 30.0, "rouge-1": 40.0, "exact_match": 1.0, "pass": False, "json_valid": None},
        {"bleu-4": 50.0, "rouge-1": 60.0, "exact_match": 0.0, "pass": True, "json_valid": True},
        {"bleu-4": 0.0, "rouge-1": 0.0, "exact_match": 0.0, "pass": False, "json_valid": False},
        {"bleu-4": 20.0, "rouge-1": 30.0, "exact_match": 0.0, "pass": False, "json_valid": True},
        {"bleu-4": 100.0, "rouge-1": 100.0, "exact_match": 1.0},  # no check: not counted in pass rates
    ]
    kinds = ["identity", "identity", "format_json", "format_json", "format_json", "general"]
    assert aggregate(scores, kinds) == {
        "n": 6,
        "bleu-4": 35.0,  # (10 + 30 + 50 + 0 + 20 + 100) / 6
        "rouge-1": 41.6667,  # (20 + 40 + 60 + 0 + 30 + 100) / 6 = 250 / 6
        "exact_match": 0.3333,
        "json_valid_rate": 0.6667,  # 2 of the 3 JSON-checked replies
        "pass_rate": 0.4,  # 2 of the 5 checked replies
        "n/identity": 2,
        "pass_rate/identity": 0.5,
        "n/format_json": 3,
        "pass_rate/format_json": 0.3333,
        "n/general": 1,
    }
    assert aggregate(scores) == {k: v for k, v in aggregate(scores, kinds).items() if "/" not in k}


def test_aggregate_rejects_mismatched_kinds():
    with pytest.raises(ValueError, match="got 1 kinds for 2 score records"):
        aggregate([{"pass": True}, {"pass": False}], ["identity"])
