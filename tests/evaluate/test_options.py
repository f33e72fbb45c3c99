"""The evaluator reads a run through training's own parser; chat/batch/evaluator flags are declared once."""
import json
import shutil

import pytest
import yaml

import hf_sft_eval
from sft.config import parse_config, write_resolved_config
from sft.evaluate.cli import parse_eval_args
from sft.evaluate.evaluator import EvalSetup
from sft.evaluate.options import GenerationOptions


def _val_file(path):
    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
            for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _run(tmp_path, *flags):
    """A run folder as hf_sft.py leaves it at start: its resolved config, written by training's own writer."""
    out = tmp_path / "run"
    config = parse_config(["--model", "tiny-qwen2", "--output_dir", str(out), *flags])
    write_resolved_config(config, out)
    return out


def test_the_run_is_evaluated_with_its_own_max_length_template_and_data(tmp_path):
    val = _val_file(tmp_path / "val.jsonl")
    run = _run(tmp_path, "--max_length", "48", "--template", "chatml", "--system_prompt", "Be brief.",
               "--val_data", str(val), "--train_on_prompt", "--per_device_eval_batch_size", "3")
    setup = EvalSetup.from_run(str(run))
    assert setup.encode.max_length == 48  # not a fallback of the evaluator's own
    assert (setup.encode.template, setup.encode.system_prompt) == ("chatml", "Be brief.")
    assert setup.encode.train_on_prompt is True
    assert setup.base_model == "tiny-qwen2" and setup.eval_batch_size == 3
    assert len(setup.val) == 3 and len(setup.prompts) == 3


def test_evaluator_flags_override_the_run(tmp_path):
    run = _run(tmp_path, "--max_length", "48")
    args, generation = parse_eval_args(["--run", str(run), "--template", "qwen2.5", "--max_new_tokens", "9"])
    setup = EvalSetup.from_run(str(run), args, generation)
    assert setup.encode.template == "qwen2.5" and setup.encode.max_length == 48
    assert setup.generation.max_new_tokens == 9


def test_a_gpu_run_is_readable_by_the_cpu_evaluator(tmp_path):
    run = _run(tmp_path, "--max_length", "64")
    path = run / "sft_config.yaml"
    values = yaml.safe_load(path.read_text())
    values.update(bf16=True, use_cpu=False, finetuning_type="qlora")  # what a QLoRA run on a GPU writes
    path.write_text(yaml.safe_dump(values))
    setup = EvalSetup.from_run(str(run))
    assert setup.encode.max_length == 64


@pytest.mark.parametrize("text, message", [
    ("max_length: [1, 2\n", "line 2, column 1: not valid YAML"),
    ("model: tiny-qwen2\n\tmax_length: 48\n", "line 2, column 1: not valid YAML (found character '\\t'"),
    ("max_lenght: 48\n", "unknown key 'max_lenght' (did you mean max_length"),
    ("max_length: lots\n", "invalid int value: 'lots'"),
    ("", "the file is empty"),
    ("- model\n- tiny-qwen2\n", "expected a mapping of flag names to values, got a YAML list"),
    # argparse would take a YAML mapping or list as the default of an int flag unchecked (the evaluator then ran)
    ("model: tiny-qwen2\nmax_steps: {a: 1}\n", "line 2: max_steps: {'a': 1} is not a valid value for --max_steps"),
    ("per_device_eval_batch_size: [1, 2]\n", "line 1: per_device_eval_batch_size: [1, 2] is not a valid value"),
    (b"\xff\xfemodel: x\n", "not UTF-8 text (byte 0xff at offset 0)"),
])
def test_a_malformed_run_config_is_one_clear_error_naming_the_file(tmp_path, capsys, text, message):
    run = tmp_path / "run"
    run.mkdir()
    path = run / "sft_config.yaml"
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    assert hf_sft_eval.main(["--run", str(run), "--threads", "1", "--nice", "0"]) == 2
    err = capsys.readouterr().err
    assert f"hf_sft_eval.py: error: {path}: the run's resolved config" in err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["--run", "x", "--max_new_token", "5"], "unknown argument '--max_new_token' (did you mean --max_new_tokens"),
    (["--run", "x", "--template", "jinja"], "--template 'jinja': expected one of auto"),
    (["--run", "x", "--merge_output", "m"], "--merge_from/--merge_output/--overwrite only apply with --merge"),
    (["--run", "x", "--max_new_tokens", "0", "--do_sample", "--temperature", "0"], "--max_new_tokens 0"),
    (["chat", "--model", "m", "--template", "jinja"], "--template 'jinja'"),
    (["batch", "--model", "m", "--input", "a.jsonl", "--output", "a.jsonl"], "is the --input file"),
    (["batch", "--model", "m", "--input", "a.jsonl"], "missing required argument --output"),
    (["serve", "--model", "m", "--port", "70000", "--max_queue", "0"], "--max_queue 0: must be at least 1"),
    (["serve", "--model", "m", "--port", "70000"], "--port 70000: expected 0..65535"),
    (["serve", "--model", "m", "--temperature", "0"], "unknown argument '--temperature'"),  # decoding is per request
    (["compare", "a", "b", "c"], "expected two models A B, got 3"),
    (["compare", "a", "b", "--judge_modle", "x"], "did you mean --judge_model"),
])
def test_flag_problems_exit_2_before_anything_loads(capsys, argv, message):
    assert hf_sft_eval.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine: --device cuda is valid there")
def test_serve_on_cuda_without_a_gpu_is_one_clear_error(capsys):
    assert hf_sft_eval.main(["serve", "--model", "m", "--device", "cuda"]) == 2
    assert "--device cuda: torch sees no CUDA device on this machine" in capsys.readouterr().err


def test_generation_flags_are_declared_once_with_one_default():
    for argv in (["--run", "x"],):
        _, generation = parse_eval_args(argv)
        assert generation == GenerationOptions()
    assert GenerationOptions().max_new_tokens == 256


@pytest.mark.parametrize("argv, flags", [
    (["--help"], ["--run", "--watch", "--max_new_tokens", "--batch_size", "--merge_output", "--config"]),
    (["chat", "--help"], ["--model", "--template", "--max_new_tokens", "--do_sample", "--top_p"]),
    (["batch", "--help"], ["--model", "--input", "--output", "--max_new_tokens", "--batch_size"]),
    (["serve", "--help"], ["--model", "--host", "--port", "--api_key", "--default_max_tokens", "--max_queue"]),
    (["compare", "--help"], ["MODEL", "--prompts", "--judge_url", "--max_new_tokens", "--output_dir"]),
])
def test_help_lists_the_flags_and_each_default_once(capsys, argv, flags):
    with pytest.raises(SystemExit) as exit_:
        hf_sft_eval.main(argv)
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: 256)" in text and text.count("(default: 256)") == 1
    for flag in flags:
        assert flag in text
