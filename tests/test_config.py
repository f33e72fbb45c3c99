import pytest
import yaml

from sft.config import ConfigError, parse_config, write_resolved_config


def test_yaml_defaults_and_cli_overrides(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rate: 3.0e-4\nlora_rank: 8\nmax_steps: 5\nmodel: tiny-qwen2\n")
    config = parse_config(["--config", str(cfg), "--max_steps", "7", "--output_dir", str(tmp_path / "out")])
    assert config.training.learning_rate == pytest.approx(3e-4)
    assert config.method.lora_rank == 8
    assert config.training.max_steps == 7  # the flag beats the file
    assert config.model.model == "tiny-qwen2"


def test_resolved_config_is_written_and_reusable(tmp_path):
    config = parse_config(["--model", "tiny-qwen2", "--max_steps", "3", "--lora_rank", "4",
                           "--output_dir", str(tmp_path / "out")])
    path = write_resolved_config(config, tmp_path / "out")
    values = yaml.safe_load(path.read_text())
    assert values["model"] == "tiny-qwen2" and values["max_steps"] == 3 and values["lora_rank"] == 4
    again = parse_config(["--config", str(path)])
    assert again.to_dict() == config.to_dict()


def test_unknown_yaml_key_is_named(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lerning_rate: 0.1\nmax_steps: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'lerning_rate' \(did you mean learning_rate"):
        parse_config(["--config", str(cfg)])


def test_unknown_flag_is_named():
    with pytest.raises(ConfigError, match=r"'--lora_rnak' \(did you mean --lora_rank"):
        parse_config(["--lora_rnak", "8"])


def test_all_value_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        parse_config(["--template", "jinja", "--lora_rank", "0", "--max_length", "4"])
    message = str(err.value)
    for fragment in ("--template 'jinja'", "--lora_rank 0", "--max_length 4"):
        assert fragment in message


def test_missing_config_file():
    with pytest.raises(ConfigError, match="--config nope.yaml: file not found"):
        parse_config(["--config", "nope.yaml"])


def test_entry_script_reports_config_errors_without_traceback(capsys):
    import hf_sft

    assert hf_sft.main(["--lerning_rate", "1"]) == 2
    err = capsys.readouterr().err
    assert "hf_sft.py: error: unknown argument '--lerning_rate'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--finetuning_type", "full", "--save_merged"], r"--save_merged only applies to LoRA-family.*full and freeze"),
    (["--finetuning_type", "freeze", "--save_merged", "true"], r"--save_merged only applies.*--finetuning_type freeze"),
    (["--early_stopping_patience", "2"], r"--early_stopping_patience 2 needs validation data.*--val_data"),
    (["--torch_dtype", "bf16"], r"--torch_dtype 'bf16': expected auto, float32, bfloat16 or float16"),
    (["--finetuning_type", "full", "--torch_dtype", "float16"], r"float16 with --finetuning_type full.*bfloat16"),
    (["--finetuning_type", "freeze", "--torch_dtype", "bfloat16", "--precision", "fp32"],
     r"freeze and fp32 precision.*--precision bf16"),
])
def test_cross_field_problems_are_config_errors(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(["--model", "tiny-qwen2", *flags])


def test_early_stopping_with_validation_data_is_fine():
    config = parse_config(["--model", "tiny-qwen2", "--early_stopping_patience", "2", "--val_size", "4"])
    assert config.data.early_stopping_patience == 2


def test_qlora_without_cuda_fails_before_any_model_loads(monkeypatch, capsys):
    import torch

    import hf_sft
    import sft.train.run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sft.train.run, "run_training", lambda config: pytest.fail("training started"))
    assert hf_sft.main(["--model", "tiny-qwen2", "--finetuning_type", "qlora"]) == 2
    err = capsys.readouterr().err
    assert "hf_sft.py: error: invalid configuration: --finetuning_type qlora needs a CUDA GPU" in err
    assert "Traceback" not in err


def test_forced_liger_loss_names_what_the_machine_lacks(monkeypatch):
    """(Without the package on a GPU: tests/train/test_loss.py, test_fused_loss_selection_and_its_fallback.)"""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--fused_loss liger needs a CUDA GPU .* use --fused_loss auto"):
        parse_config(["--model", "tiny-qwen2", "--fused_loss", "liger"])
    assert parse_config(["--model", "tiny-qwen2"]).model.fused_loss == "auto"  # auto never fails: it falls back
    with pytest.raises(ConfigError, match="--fused_loss 'triton': expected auto, liger or chunked"):
        parse_config(["--model", "tiny-qwen2", "--fused_loss", "triton"])


def test_entry_script_fails_on_cross_field_problems_before_loading(monkeypatch, capsys):
    import hf_sft
    import sft.train.run

    monkeypatch.setattr(sft.train.run, "run_training", lambda config: pytest.fail("training started"))
    assert hf_sft.main(["--model", "tiny-qwen2", "--save_merged", "--early_stopping_patience", "1"]) == 2
    err = capsys.readouterr().err
    assert "--save_merged only applies" in err and "--early_stopping_patience 1 needs validation data" in err


def test_bad_flag_value_is_a_config_error_not_an_exit():
    with pytest.raises(ConfigError, match=r"argument --max_length/--max-length: invalid int value: 'long'"):
        parse_config(["--max_length", "long"])


def test_help_shows_each_default_once(capsys):
    import hf_sft

    with pytest.raises(SystemExit) as exit_:
        hf_sft.main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: None)" not in text
    for flag in ("--config", "--max_length", "--finetuning_type", "--early_stopping_patience", "--learning_rate"):
        assert flag in text
    assert "Maximum tokens per sample (longer ones are truncated). (default: 1024)" in text


def test_prefetch_batches_must_not_be_negative():
    with pytest.raises(ConfigError, match=r"--prefetch_batches -1: must be >= 0 \(0: read in the training loop\)"):
        parse_config(["--model", "tiny-qwen2", "--prefetch_batches", "-1"])
    assert parse_config(["--model", "tiny-qwen2"]).data.prefetch_batches is None  # the default follows the device


# ---------------------------------------------------------------- transformers 5.17 (the lowest supported)


@pytest.fixture
def transformers_517_names(monkeypatch):
    """TrainingArguments as transformers 5.17 has it: gradient_checkpointing(_kwargs) only, no
    activation_checkpointing(_kwargs) (the names are all that differ between 5.17 and 5.24)."""
    import sft.config as config_module

    names = config_module._training_field_names() - {"activation_checkpointing", "activation_checkpointing_kwargs"}
    monkeypatch.setattr(config_module, "_training_field_names", lambda: names)


def test_new_checkpointing_names_read_as_the_old_ones_on_transformers_517(transformers_517_names):
    from sft.config import _compat_training_argv, _compat_training_values, valid_keys

    assert {"activation_checkpointing", "activation_checkpointing_kwargs"} <= valid_keys()  # a preset's key is known
    assert _compat_training_argv(["--activation_checkpointing", "true", "--activation_checkpointing_kwargs={}",
                                  "--max_steps", "3"]) == [
        "--gradient_checkpointing", "true", "--gradient_checkpointing_kwargs={}", "--max_steps", "3"]
    assert _compat_training_values({"activation_checkpointing": True, "bf16": True}) == {
        "gradient_checkpointing": True, "bf16": True}
    # A run's sft_config.yaml written under 5.24 holds both names: the new one wins, as it does there.
    assert _compat_training_values({"gradient_checkpointing": False, "activation_checkpointing": True,
                                    "activation_checkpointing_kwargs": None}) == {"gradient_checkpointing": True}


def _has_new_names() -> bool:
    from sft.config import _training_field_names

    return "activation_checkpointing" in _training_field_names()


@pytest.mark.skipif(not _has_new_names(), reason="this transformers has only gradient_checkpointing (5.17)")
def test_checkpointing_names_pass_through_where_transformers_has_both():
    from sft.config import _compat_training_argv, _compat_training_values

    argv = ["--activation_checkpointing", "true", "--gradient_checkpointing=false"]
    assert _compat_training_argv(argv) == argv
    assert _compat_training_values({"activation_checkpointing": True}) == {"activation_checkpointing": True}
    config = parse_config(["--activation_checkpointing", "true"], check_machine=False)
    assert config.training.activation_checkpointing is True and config.training.gradient_checkpointing is True


def test_training_arg_reads_the_new_name_on_old_and_new_arguments():
    from types import SimpleNamespace

    from sft.config import training_arg

    assert training_arg(SimpleNamespace(gradient_checkpointing=True), "activation_checkpointing") is True  # 5.17
    assert training_arg(SimpleNamespace(activation_checkpointing=False, gradient_checkpointing=True),
                        "activation_checkpointing") is False  # 5.24: the new name is the truth
    assert training_arg(SimpleNamespace(), "max_steps", 7) == 7
