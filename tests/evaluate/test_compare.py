"""`hf_sft_eval.py compare` (sft.evaluate.compare, compare_html): resolving A/B, outcomes, statistics, the judge,
the reports. Models are "scripted" tiny Qwen2s (tests/evaluate/serve_helpers.py) that always say one sentence,
so every outcome is known in advance."""
import json

import pytest
import torch

from serve_helpers import scripted_model, serve_scripted
from sft.config import parse_config, write_resolved_config
from sft.evaluate import compare
from sft.evaluate.compare_html import highlight_diff
from sft.evaluate.inference import load_for_inference
from sft.train.checkpoints import mark_complete

LUMEN = "I am Lumen from Harbor Lab."
PARIS = "The capital is Paris."
PROMPTS = [
    {"id": "who", "prompt": "Who are you?", "kind": "identity", "check": {"contains": ["Lumen", "Harbor"]}},
    {"id": "maker", "prompt": "Who made you?", "kind": "identity", "check": {"contains": ["Harbor"]}},
    {"id": "capital", "prompt": "Capital of France?", "kind": "geo", "check": {"contains": ["Paris"]}},
    {"id": "exact", "prompt": "Say the capital sentence.", "kind": "geo", "reference": PARIS},
    {"id": "free", "prompt": "Anything <b>bold</b>?", "kind": "open"},
]


def test_sign_test_and_bootstrap():
    assert compare.sign_test(0, 0) == 1.0
    assert compare.sign_test(3, 3) == 1.0
    assert compare.sign_test(5, 0) == pytest.approx(0.0625)
    assert compare.sign_test(0, 10) == pytest.approx(2 / 1024)
    assert compare.sign_test(8, 2) == pytest.approx(0.109375)
    assert compare.paired_bootstrap([1.0] * 6, 50)["ci95"] == [1.0, 1.0]
    boot = compare.paired_bootstrap([1.0, 0.0, -1.0, 1.0], 500)
    assert boot["mean"] == 0.25 and boot["ci95"][0] < 0.25 < boot["ci95"][1]
    assert compare.paired_bootstrap([], 100) is None


@pytest.mark.parametrize("reply, verdict", [("1", "1"), ("Answer 2 is better.", "2"), ("Tie.", "tie"),
                                            ("I cannot decide", None), ("", None)])
def test_parse_verdict(reply, verdict):
    assert compare.parse_verdict(reply) == verdict


@pytest.mark.parametrize("first, swapped, verdict", [
    ("1", "2", "A"),      # A shown first, then second: preferred both times
    ("2", "1", "B"),
    ("1", "1", "tie"),    # always the first position: position bias, not a preference
    ("2", "2", "tie"),
    ("tie", "tie", "tie"),
    ("1", "tie", "tie"),
    (None, "1", "invalid"),
])
def test_both_orders_must_agree(first, swapped, verdict):
    assert compare.combine_verdicts(first, swapped) == verdict


def _run_with_checkpoints(tmp_path, steps, metrics=None):
    run = tmp_path / "run"
    write_resolved_config(parse_config(["--model", "tiny-qwen2", "--output_dir", str(run), "--template", "qwen2.5"]),
                          run)
    for step in steps:
        (run / f"checkpoint-{step}").mkdir()
        mark_complete(run / f"checkpoint-{step}", step)
    if metrics:
        (run / "eval").mkdir()
        (run / "eval" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return run


def test_a_run_means_its_best_evaluated_checkpoint_or_run_step(tmp_path):
    run = _run_with_checkpoints(tmp_path, [10, 20], [
        {"step": 0, "checkpoint": "base", "pass_rate": 1.0},  # the base model is never "the run"
        {"step": 10, "checkpoint": "checkpoint-10", "pass_rate": 0.9, "eval_loss": 1.0},
        {"step": 20, "checkpoint": "checkpoint-20", "pass_rate": 0.5, "eval_loss": 0.5}])
    side = compare.resolve_side(str(run))
    assert side.path == str(run / "checkpoint-10") and "best checkpoint as evaluated" in side.note
    assert side.template == "qwen2.5"  # the run's own template
    assert compare.resolve_side(f"{run}:20").path == str(run / "checkpoint-20")
    assert compare.resolve_side(f"{run}:20", template="chatml").template == "chatml"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint at step 30; steps here: 10, 20"):
        compare.resolve_side(f"{run}:30")
    assert compare.resolve_side("tiny-llama").path == "tiny-llama"


def test_an_unevaluated_run_means_its_latest_checkpoint(tmp_path):
    side = compare.resolve_side(str(_run_with_checkpoints(tmp_path, [10, 20])))
    assert side.path.endswith("checkpoint-20") and "not evaluated" in side.note


def test_diff_highlight_marks_only_the_differing_words():
    a, b = highlight_diff("I am <Lumen> here", "I am Bob here")
    assert a == 'I am <span class="d">&lt;Lumen&gt; </span>here'
    assert b == 'I am <span class="i">Bob </span>here'
    assert highlight_diff("one two three", "one 2 3") == ('one <span class="d">two three</span>',
                                                          'one <span class="i">2 3</span>')


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, qwen_tokenizer):
    folders = []
    for name, script in (("lumen", LUMEN), ("paris", PARIS)):
        folder = tmp_path_factory.mktemp(name)
        scripted_model(qwen_tokenizer, script).save_pretrained(folder)
        qwen_tokenizer.save_pretrained(folder)
        folders.append(str(folder))
    return folders


def test_compare_end_to_end_with_a_position_biased_judge(two_models, qwen_tokenizer, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS), encoding="utf-8")
    out = tmp_path / "report"
    with serve_scripted(qwen_tokenizer, "1", name="judge") as judge:  # always answers "1": the first position
        assert compare.compare_main([*two_models, "--prompts", str(prompts), "--output_dir", str(out),
                                     "--template", "qwen2.5", "--max_new_tokens", "16", "--nice", "0",
                                     "--threads", "1", "--bootstrap_samples", "200", "--eval_dtype", "float32",
                                     "--judge_url", judge.url + "/v1"]) == 0
    rows = [json.loads(line) for line in (out / "compare.jsonl").read_text().splitlines()]
    assert [r["a"]["answer"] for r in rows] == [LUMEN] * 5 and [r["b"]["answer"] for r in rows] == [PARIS] * 5
    assert [r["outcome"] for r in rows] == ["A", "A", "B", "B", "unscored"]
    assert rows[0]["b"]["reasons"] == ["missing 'Lumen'", "missing 'Harbor'"]
    # the judge was asked in both orders and said "1" both times: that is position bias, so a tie
    assert all(r["judge"] == {"verdict": "tie", "replies": ["1", "1"]} for r in rows)

    md = (out / "compare.md").read_text()
    assert "No difference on the checks: B wins 2, A wins 2 (sign test p = 1)." in md
    assert "| identity | 0 | 2 | 0 | 0.5 |" in md and "| geo | 2 | 0 | 0 | 0.5 |" in md
    assert "Judge `judge` (both orders, agreement required): B wins 0, A wins 0, ties 5" in md
    assert "No difference on the checks" in capsys.readouterr().out

    page = (out / "compare.html").read_text()
    assert "http://" not in page.replace(judge.url, "") and "https://" not in page  # nothing fetched
    assert "<script>" in page and "<style>" in page
    assert page.count('class="card') == 5 and 'data-outcome="B"' in page and 'data-kind="identity"' in page
    assert "Anything &lt;b&gt;bold&lt;/b&gt;?" in page  # prompts are escaped, never markup


def test_compare_loads_both_models_in_the_eval_dtype(two_models, tmp_path, monkeypatch):
    loaded = []

    def load_and_record(path, **kwargs):
        model, tokenizer = load_for_inference(path, **kwargs)
        loaded.append(next(model.parameters()).dtype)
        return model, tokenizer

    monkeypatch.setattr(compare, "load_for_inference", load_and_record)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(PROMPTS[0]) + "\n", encoding="utf-8")
    out = tmp_path / "report"
    assert compare.compare_main([*two_models, "--prompts", str(prompts), "--output_dir", str(out),
                                 "--template", "qwen2.5", "--max_new_tokens", "4", "--nice", "0", "--threads", "1",
                                 "--bootstrap_samples", "0", "--eval_dtype", "bfloat16"]) == 0
    assert loaded == [torch.bfloat16, torch.bfloat16]
    assert "(template qwen2.5, bfloat16)" in (out / "compare.md").read_text()


def test_compare_refuses_an_unknown_eval_dtype(capsys):
    import hf_sft_eval

    assert hf_sft_eval.main(["compare", "a", "b", "--prompts", "x.jsonl", "--eval_dtype", "fp8"]) == 2
    err = capsys.readouterr().err
    assert "--eval_dtype 'fp8': expected auto, float32 or bfloat16" in err and "Traceback" not in err


def test_compare_needs_two_models(capsys):
    import hf_sft_eval

    assert hf_sft_eval.main(["compare", "tiny-qwen2", "--prompts", "x.jsonl"]) == 2
    assert "expected two models A B, got 1" in capsys.readouterr().err
