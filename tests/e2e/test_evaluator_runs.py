"""hf_sft_eval.py on real (tiny) training runs: every checkpoint once, never a half-written one,
restart without redoing work, a watcher beside a running trainer, adapter == merged generations."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import hf_sft_eval  # noqa: E402
from sft.evaluate import evaluator  # noqa: E402

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def _write_data(path: Path, n: int, offset: int = 0) -> None:
    words = ["alpha", "beta", "gamma", "delta", "你好", "世界", "one", "two"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(offset, offset + n):
            q = " ".join(words[(i * 7 + k) % len(words)] for k in range(3 + i % 5))
            a = " ".join(words[(i * 3 + k) % len(words)] for k in range(2 + i % 4))
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"q{i} {q}"},
                                                  {"from": "gpt", "value": a}], "kind": f"k{i % 2}"},
                               ensure_ascii=False) + "\n")


def _write_prompts(path: Path) -> None:
    rows = [{"prompt": "alpha beta", "reference": "gamma delta", "kind": "echo", "check": {"contains": ["gamma"]}},
            {"prompt": "你好", "reference": "世界", "kind": "zh"},
            {"prompt": "one two", "reference": "{\"a\": 1}", "kind": "json", "check": {"json_keys": ["a"]}}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _train_cmd(tmp: Path, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "hf_sft.py", "--model", "tiny-qwen2", "--report_to", "none", "--max_length", "64",
            "--learning_rate", "1e-3", "--warmup_steps", "0", "--precision", "fp32",
            "--data", str(tmp / "train.jsonl"), "--val_data", str(tmp / "val.jsonl"),
            "--eval_prompts", str(tmp / "prompts.jsonl"), "--general_eval", str(tmp / "general.jsonl"),
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--shuffle_buffer", "8",
            "--per_device_eval_batch_size", "8",
            "--output_dir", str(out), *extra]


def _train(tmp: Path, out: Path, extra: list[str]) -> None:
    result = subprocess.run(_train_cmd(tmp, out, extra), cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _eval_args(out: Path, *extra: str) -> list[str]:
    # float32: these tests hold the evaluator's loss to the Trainer's own to 1e-4 (auto may pick bf16 here)
    return ["--run", str(out), "--max_new_tokens", "6", "--threads", "1", "--nice", "0", "--eval_dtype", "float32",
            *extra]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "eval" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaldata")
    _write_data(tmp / "train.jsonl", 40)
    _write_data(tmp / "val.jsonl", 6, offset=100)  # one validation batch: the Trainer's mean equals ours
    _write_prompts(tmp / "prompts.jsonl")
    (tmp / "general.jsonl").write_text(json.dumps({"prompt": "q1 alpha", "reference": "beta",
                                                   "check": {"contains": ["beta"]}}) + "\n")
    return tmp


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    _train(data_dir, out, ["--max_steps", "4", "--save_steps", "2", "--eval_steps", "2", "--save_total_limit", "5"])
    return out


def test_evaluates_base_and_every_checkpoint_with_training_masking(full_run):
    end = json.loads((full_run / "run_end.json").read_text())
    assert end["status"] == "finished" and end["last_checkpoint"] == "checkpoint-4"
    assert hf_sft_eval.main(_eval_args(full_run)) == 0
    records = _metrics(full_run)
    assert [r["step"] for r in records] == [0, 2, 4]
    assert [r["checkpoint"] for r in records] == ["base", "checkpoint-2", "checkpoint-4"]
    # Same encoding and masking as training: the evaluator's loss equals the Trainer's eval_loss.
    logged = {r["step"]: r["eval_loss"] for r in map(json.loads, (full_run / "train_log.jsonl").read_text().splitlines())
              if "eval_loss" in r}
    for record in records[1:]:
        assert record["eval_loss"] == pytest.approx(logged[record["step"]], rel=1e-4)
    for record in records:
        assert record["n"] == 3 and record["general/n"] == 1
        assert 0.0 <= record["pass_rate"] <= 1.0 and "rouge-l" in record and "bleu-4" in record
        assert record["perplexity"] == pytest.approx(2.718281828 ** record["eval_loss"], rel=1e-3)
    assert "general/pass_rate_delta" in records[2] and "general/pass_rate_delta" not in records[0]
    predictions = [json.loads(line) for line in (full_run / "eval" / "predictions-4.jsonl").read_text().splitlines()]
    assert [(p["set"], p["kind"]) for p in predictions] == [("prompts", "echo"), ("prompts", "zh"),
                                                            ("prompts", "json"), ("general", "general")]
    report = (full_run / "eval" / "report.md").read_text()
    assert "★" in report and "| 4 | checkpoint-4" in report and "## Base model vs" in report
    for png in ("loss.png", "metrics.png"):
        assert (full_run / "eval" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_restart_does_not_redo_work_and_half_written_checkpoint_is_never_loaded(full_run, monkeypatch):
    if not (full_run / "eval" / "metrics.jsonl").is_file():
        assert hf_sft_eval.main(_eval_args(full_run)) == 0
    before = (full_run / "eval" / "metrics.jsonl").read_text()
    # A checkpoint the trainer is still writing: no COMPLETE marker, weights cut short.
    half = full_run / "checkpoint-6"
    shutil.copytree(full_run / "checkpoint-4", half)
    (half / "COMPLETE").unlink()
    weights = half / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    loaded = []
    original = evaluator.ModelCache.load
    monkeypatch.setattr(evaluator.ModelCache, "load", lambda self, path, base: loaded.append(path) or original(self, path, base))
    try:
        assert hf_sft_eval.main(_eval_args(full_run)) == 0
    finally:
        shutil.rmtree(half)
    assert loaded == []  # nothing redone, the incomplete checkpoint-6 untouched
    assert (full_run / "eval" / "metrics.jsonl").read_text() == before


def test_checkpoint_deleted_while_read_is_skipped(full_run, tmp_path, monkeypatch):
    run = tmp_path / "copy"
    shutil.copytree(full_run, run, ignore=shutil.ignore_patterns("eval"))
    original = evaluator.ModelCache.load

    def rotate_during_load(self, path, base):
        if path.endswith("checkpoint-2"):
            shutil.rmtree(path)  # what save_total_limit does while we read
        return original(self, path, base)

    monkeypatch.setattr(evaluator.ModelCache, "load", rotate_during_load)
    assert hf_sft_eval.main(_eval_args(run, "--no_base")) == 0
    assert [r["step"] for r in _metrics(run)] == [4]
    assert not (run / "eval" / "errors.jsonl").exists()


def test_watcher_beside_a_running_trainer_evaluates_every_checkpoint(data_dir, tmp_path):
    out = tmp_path / "live"
    log = open(tmp_path / "trainer.log", "w")  # a file, not a pipe: nobody reads it while the watcher runs
    trainer = subprocess.Popen(_train_cmd(data_dir, out, ["--max_steps", "8", "--save_steps", "2", "--eval_steps", "4",
                                                          "--save_total_limit", "10"]),
                               cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    # Started together with the trainer: the watcher waits for the run to appear.
    watcher = subprocess.run([sys.executable, "hf_sft_eval.py", *_eval_args(out, "--watch", "--poll_seconds", "0.5",
                                                                           "--max_idle_minutes", "5")],
                             cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert trainer.wait(timeout=600) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
    log.close()
    assert watcher.returncode == 0, watcher.stderr[-3000:]
    assert [r["step"] for r in _metrics(out)] == [0, 2, 4, 6, 8]
    assert not (out / "eval" / "errors.jsonl").exists()
    assert "Traceback" not in watcher.stderr


def test_adapter_and_merged_generate_the_same(data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from sft.conversation import Conversation, Message
    from sft.evaluate.inference import (
        GenerationOptions,
        generate_answers,
        load_for_inference,
        prompt_ids,
    )

    out = tmp_path / "lora"
    _train(data_dir, out, ["--finetuning_type", "lora", "--learning_rate", "5e-2", "--max_steps", "3",
                           "--save_steps", "3", "--eval_steps", "3"])
    assert hf_sft_eval.main(["--run", str(out), "--merge", "--threads", "1", "--nice", "0"]) == 0
    merged_dir = out / "merged"
    plain = AutoModelForCausalLM.from_pretrained(merged_dir)  # a plain model: no PEFT needed to load it
    assert not [name for name, _ in plain.named_parameters() if "lora" in name]
    assert not (merged_dir / "adapter_config.json").exists()

    options = GenerationOptions(max_new_tokens=8)
    questions = ["q1 alpha beta", "你好 世界", "two one"]
    texts = {}
    for name, path in (("adapter", str(out)), ("merged", str(merged_dir)), ("base", "tiny-qwen2")):
        model, tokenizer = load_for_inference(path)
        prompts = [prompt_ids(Conversation([Message("user", q)]), tokenizer) for q in questions]
        texts[name] = [g.text for g in generate_answers(model, tokenizer, prompts, options)]
    assert texts["adapter"] == texts["merged"]
    assert texts["adapter"] != texts["base"]  # the adapter changed something: the comparison is not vacuous


def test_lora_run_checkpoints_are_evaluated_as_adapters(data_dir, tmp_path):
    out = tmp_path / "lora_eval"
    _train(data_dir, out, ["--finetuning_type", "lora", "--max_steps", "2", "--save_steps", "2", "--eval_steps", "2"])
    assert hf_sft_eval.main(_eval_args(out)) == 0
    records = _metrics(out)
    assert [(r["step"], r["model_kind"]) for r in records] == [(0, "full"), (2, "adapter")]
    assert "base_weights" not in records[1]
    assert "QLoRA" not in (out / "eval" / "report.md").read_text()
    # The same adapter as a QLoRA run would leave it: the CPU evaluator scores it on the unquantized base, and says so.
    qlora = tmp_path / "qlora_eval"
    shutil.copytree(out, qlora, ignore=shutil.ignore_patterns("eval"))
    config = qlora / "sft_config.yaml"
    config.write_text(config.read_text().replace("finetuning_type: lora", "finetuning_type: qlora"))
    assert hf_sft_eval.main(_eval_args(qlora, "--no_base")) == 0
    assert [(r["model_kind"], r["base_weights"]) for r in _metrics(qlora)] == [("adapter", "unquantized (float32)")]
    assert ("- QLoRA run: the adapters' scores are **on the unquantized base** (float32), not on the 4-bit base"
            in (qlora / "eval" / "report.md").read_text())


def test_errors_name_the_fix(tmp_path, capsys):
    assert hf_sft_eval.main(["--run", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert hf_sft_eval.main(["--run", str(tmp_path)]) == 2
    assert "sft_config.yaml" in capsys.readouterr().err


def test_full_then_lora_end_to_end_through_hf_sft_and_the_evaluator(data_dir, tmp_path):
    """The hybrid on the real stream: one data order across the switch, phase-2 adapters on full_phase/."""
    out = tmp_path / "hybrid"
    _train(data_dir, out, ["--finetuning_type", "full_then_lora", "--full_ratio", "0.5", "--max_steps", "4",
                           "--save_steps", "1", "--eval_steps", "1", "--save_total_limit", "10",
                           "--log_sample_ids", "true"])
    steps = [json.loads(line) for line in (out / "sample_ids-rank0.jsonl").read_text().splitlines()]
    ids = [i for record in steps for i in record["ids"]]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and len(ids) == len(set(ids)) == 8  # no replay at the switch
    assert (out / "full_phase" / "model.safetensors").is_file() and (out / "adapter_config.json").is_file()

    assert hf_sft_eval.main(_eval_args(out)) == 0
    records = _metrics(out)
    assert [(r["step"], r["model_kind"]) for r in records] == [(0, "full"), (1, "full"), (2, "adapter"),
                                                               (3, "adapter"), (4, "adapter")]
    logged = {r["step"]: r["eval_loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
              if "eval_loss" in r}
    for record in records[1:]:  # each adapter evaluated on the right base gives the trainer's own number
        assert record["eval_loss"] == pytest.approx(logged[record["step"]], rel=1e-4), record["step"]


def test_threads_default_to_half_the_usable_cpus_while_training_runs(monkeypatch):
    from sft.evaluate import cli

    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine's cores: not what this process may use
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(cli, "cgroup_cpu_quota", lambda *a: None)
    monkeypatch.setattr("torch.set_num_threads", lambda n: None)
    assert cli.configure_cpu(None, 0, training_running=True) == 4
    assert cli.configure_cpu(None, 0, training_running=False) == 8
    assert cli.configure_cpu(3, 0, training_running=False) == 3
    monkeypatch.setattr(cli, "cgroup_cpu_quota", lambda *a: 2.5)  # a container with --cpus 2.5
    assert cli.configure_cpu(None, 0, training_running=False) == 2
    assert cli.configure_cpu(None, 0, training_running=True) == 1


def test_two_evaluators_on_one_run_evaluate_each_step_once(full_run, tmp_path):
    # Before: both read an empty metrics.jsonl and evaluated base, checkpoint-2 and checkpoint-4 twice.
    run = tmp_path / "copy"
    shutil.copytree(full_run, run, ignore=shutil.ignore_patterns("eval"))
    command = [sys.executable, "hf_sft_eval.py", *_eval_args(run)]
    evaluators = [subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True) for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in evaluators]
    assert [p.returncode for p in evaluators] == [0, 0], logs
    assert sorted(r["step"] for r in _metrics(run)) == [0, 2, 4]
    evaluated = [int(line.split("evaluated ", 1)[1].split()[0]) for log in logs for line in log.splitlines()
                 if "model(s) in this call" in line]
    assert sum(evaluated) == 3, logs
    assert list((run / "eval" / "locks").iterdir()) == []  # finished steps leave no lock behind


def test_auto_dtype_is_bf16_where_the_cpu_has_native_bf16_and_the_report_says_so(full_run, tmp_path):
    from sft.evaluate.inference import cpu_bf16_feature

    run = tmp_path / "copy"
    shutil.copytree(full_run, run, ignore=shutil.ignore_patterns("eval"))
    args = [a for a in _eval_args(run, "--no_base", "--num_prompts", "1") if a not in ("--eval_dtype", "float32")]
    assert hf_sft_eval.main(args) == 0
    feature = cpu_bf16_feature()
    expected = "bfloat16" if feature else "float32"
    records = _metrics(run)
    assert [r["dtype"] for r in records] == [expected, expected]
    report = (run / "eval" / "report.md").read_text()
    assert f"- weights on the CPU: {expected} (auto: the CPU has " in report
    logged = {r["step"]: r["eval_loss"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())
              if "eval_loss" in r}
    for record in records:  # bf16 weights: the same loss to bf16's precision
        assert record["eval_loss"] == pytest.approx(logged[record["step"]], rel=2e-2 if feature else 1e-4)


def test_generate_every_k_generates_on_every_kth_checkpoint_and_scores_loss_on_all(full_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(full_run, run, ignore=shutil.ignore_patterns("eval"))
    # save_steps 2: checkpoint-2 is the 1st, checkpoint-4 the 2nd; the base always generates
    assert hf_sft_eval.main(_eval_args(run, "--generate_every", "2")) == 0
    records = {r["step"]: r for r in _metrics(run)}
    assert sorted(records) == [0, 2, 4] and all("eval_loss" in r for r in records.values())
    assert "pass_rate" in records[0] and "pass_rate" in records[4]
    assert "pass_rate" not in records[2] and records[2]["generation"] == "skipped (--generate_every 2)"


@pytest.mark.parametrize("method, flags, mergeable", [
    # PiSSA checkpoints are raw (resumable), the final adapter converted; LoRA+ goes through run.make_trainer.
    # ia3 and p_tuning are scored and merged in-process in tests/train/test_peft_methods.py.
    ("lora_pissa_loraplus", ["--finetuning_type", "lora", "--lora_init", "pissa", "--loraplus_lr_ratio", "4"], True),
    ("prefix_tuning", ["--finetuning_type", "prefix_tuning", "--num_virtual_tokens", "4"], False),
])
def test_peft_method_checkpoints_are_scored_as_adapters_and_merged_or_refused(method, flags, mergeable, data_dir,
                                                                               tmp_path, capsys):
    out = tmp_path / method
    _train(data_dir, out, [*flags, "--max_steps", "2", "--save_steps", "1", "--eval_steps", "1",
                           "--save_total_limit", "5"])
    assert hf_sft_eval.main(_eval_args(out)) == 0
    records = _metrics(out)
    assert [(r["step"], r["model_kind"]) for r in records] == [(0, "full"), (1, "adapter"), (2, "adapter")]
    logged = {r["step"]: r["eval_loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
              if "eval_loss" in r}
    for record in records[1:]:  # the evaluator's base + adapter gives the trainer's own validation loss
        assert record["eval_loss"] == pytest.approx(logged[record["step"]], rel=1e-4), record["step"]
    capsys.readouterr()
    code = hf_sft_eval.main(["--run", str(out), "--merge", "--threads", "1", "--nice", "0"])
    if mergeable:
        assert code == 0 and (out / "merged" / "model.safetensors").is_file()
    else:
        assert code == 2 and not (out / "merged").exists()
        assert "is prefix_tuning: its virtual tokens are not weights of the model, so there is nothing to merge" in \
            capsys.readouterr().err
