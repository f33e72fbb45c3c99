"""The shipped presets (configs/*.yaml), accelerate configs and the bundled demo data they point at."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sft.config import load_yaml_config, parse_config, training_arg

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
ACCELERATE = ROOT / "configs" / "accelerate"
DATA = ROOT / "data"


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_preset(path: Path, *overrides: str):
    """parse_config on a preset; GPU presets ask for bf16, which TrainingArguments refuses on a
    CPU-only machine unless use_cpu is set, so turn it off there (the YAML value is checked raw), and
    the QLoRA preset needs CUDA, so skip the machine check off a GPU."""
    argv = ["--config", str(path), *overrides]
    raw = load_yaml_config(str(path))
    if raw.get("bf16") and not raw.get("use_cpu") and not _has_cuda():
        argv += ["--bf16", "false"]
    return parse_config(argv, check_machine=_has_cuda())


def test_all_four_presets_are_shipped():
    assert [p.name for p in PRESETS] == [
        "demo_cpu.yaml", "qwen2.5-0.5b_full.yaml", "qwen2.5-7b_lora.yaml", "qwen2.5-7b_qlora.yaml",
    ]


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_parses_and_points_at_existing_data(path):
    config = parse_preset(path)
    for item in config.data.data:
        assert (ROOT / item.rsplit(":", 1)[0]).is_file(), f"{path.name}: data {item} missing"
    if config.data.val_data:
        assert (ROOT / config.data.val_data).is_file()


def test_demo_preset_values():
    config = parse_preset(ROOT / "configs" / "demo_cpu.yaml")
    assert config.model.model == "smollm2-135m-instruct"
    assert config.data.data == ["data/demo_train.jsonl"]
    assert config.data.val_data == "data/demo_val.jsonl"
    assert config.method.finetuning_type == "full"
    assert config.training.output_dir == "outputs/demo"
    assert config.training.per_device_train_batch_size == 8
    assert config.training.max_steps == 50  # ~3 min on a 2-core CPU (docs/BENCHMARKS.md)
    assert config.training.learning_rate == 1e-4
    assert config.data.eval_prompts == "data/demo_eval_prompts.jsonl"  # what hf_sft_eval.py scores
    assert config.data.general_eval == "data/general_eval.jsonl"
    assert (ROOT / config.data.eval_prompts).is_file() and (ROOT / config.data.general_eval).is_file()
    assert config.training.bf16 is False  # bf16 autocast is ~20x slower on AVX2-only CPUs


def test_command_line_overrides_the_preset():
    config = parse_preset(ROOT / "configs" / "demo_cpu.yaml", "--max_steps", "3", "--learning_rate", "1e-3")
    assert config.training.max_steps == 3
    assert config.training.learning_rate == 1e-3
    assert config.training.per_device_train_batch_size == 8


@pytest.mark.parametrize(
    "name, model, method, lr, batch, accumulation",
    [
        ("qwen2.5-0.5b_full.yaml", "Qwen/Qwen2.5-0.5B-Instruct", "full", 1e-5, 8, 8),
        ("qwen2.5-7b_lora.yaml", "Qwen/Qwen2.5-7B-Instruct", "lora", 1e-4, 4, 8),
        ("qwen2.5-7b_qlora.yaml", "Qwen/Qwen2.5-7B-Instruct", "qlora", 2e-4, 8, 4),
    ],
)
def test_gpu_preset_values(name, model, method, lr, batch, accumulation):
    path = ROOT / "configs" / name
    raw = load_yaml_config(str(path))
    assert raw["bf16"] is True
    config = parse_preset(path)
    assert config.model.model == model
    assert config.model.template == "qwen2.5"
    assert config.method.finetuning_type == method
    assert config.training.learning_rate == lr
    assert config.training.per_device_train_batch_size == batch
    assert config.training.gradient_accumulation_steps == accumulation
    assert training_arg(config.training, "activation_checkpointing") is True
    assert config.training.max_steps == -1  # epochs, not the project's 60-step default
    assert config.training.num_train_epochs == 3
    assert config.data.max_length == 2048
    if method != "full":
        assert (config.method.lora_rank, config.method.lora_alpha, config.method.lora_target) == (16, 32, "all-linear")


# ------------------------------------------------------------------------------ accelerate


def _launch_dests() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {action.dest for action in launch_command_parser()._actions}


@pytest.mark.parametrize(
    "name, distributed_type, processes, precision",
    [
        ("ddp.yaml", "MULTI_GPU", 8, "bf16"),
        ("fsdp.yaml", "FSDP", 8, "bf16"),
        ("deepspeed_zero2.yaml", "DEEPSPEED", 8, "bf16"),
        ("deepspeed_zero3.yaml", "DEEPSPEED", 8, "bf16"),
        ("cpu_2proc.yaml", "MULTI_GPU", 2, "no"),
        ("multinode_ddp.yaml", "MULTI_GPU", 16, "bf16"),
        ("fsdp_cpu_2proc.yaml", "FSDP", 2, "no"),
    ],
)
def test_accelerate_config_loads_with_accelerates_own_classes(name, distributed_type, processes, precision):
    from accelerate.commands.config.config_args import (
        ClusterConfig,
        load_config_from_file,
    )

    config = load_config_from_file(str(ACCELERATE / name))  # raises on unknown top-level keys
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type.value == distributed_type
    assert config.num_processes == processes
    assert str(config.mixed_precision) == precision
    # Nested keys are copied onto `accelerate launch` flags by name; a typo would be silently ignored.
    dests = _launch_dests()
    nested = list(config.fsdp_config) + list(config.deepspeed_config)
    assert [key for key in nested if key not in dests] == []


def test_deepspeed_stages():
    from accelerate.commands.config.config_args import load_config_from_file

    zero2 = load_config_from_file(str(ACCELERATE / "deepspeed_zero2.yaml")).deepspeed_config
    zero3 = load_config_from_file(str(ACCELERATE / "deepspeed_zero3.yaml")).deepspeed_config
    assert (zero2["zero_stage"], zero3["zero_stage"]) == (2, 3)
    assert zero3["zero3_init_flag"] is True
    assert zero3["zero3_save_16bit_model"] is True  # a loadable checkpoint, not only ZeRO shards


def test_fsdp_config_builds_an_fsdp2_plugin(monkeypatch):
    """Go through `accelerate launch`'s own flag handling and environment, then build the plugin."""
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ACCELERATE / "fsdp.yaml"), "hf_sft.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert plugin.reshard_after_forward is True
    assert plugin.activation_checkpointing is True


def test_multinode_config_starts_its_share_of_processes_on_each_machine():
    """Through `accelerate launch`'s own flag handling: a --machine_rank flag overrides the file, and each
    machine runs num_processes / num_machines processes that meet at machine 0's address."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ACCELERATE / "multinode_ddp.yaml"),
                                               "--machine_rank", "1", "hf_sft.py"])
    args, _, _ = _validate_launch_command(args)
    prepare_multi_gpu_env(args)  # sets torchrun's arguments on args
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "8")
    assert args.rdzv_endpoint == "10.0.0.1:29500"  # torchrun's static rendezvous at machine 0


# ------------------------------------------------------------------------- bundled demo data


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _user_turns(records: list[dict]) -> set[str]:
    return {m["value"] for r in records for m in r["conversations"] if m["from"] == "human"}


def test_generator_is_deterministic_and_checked_in_files_are_current(tmp_path):
    subprocess.run([sys.executable, str(DATA / "make_demo_data.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    names = ["demo_train.jsonl", "demo_val.jsonl", "demo_eval_prompts.jsonl", "general_eval.jsonl",
             "firefly_sample.jsonl", "alpaca_sample.json"]
    stale = [n for n in names if (tmp_path / n).read_bytes() != (DATA / n).read_bytes()]
    assert stale == [], f"re-run: python data/make_demo_data.py  ({stale} differ)"


def test_demo_data_sizes_and_kinds():
    train, val = _jsonl(DATA / "demo_train.jsonl"), _jsonl(DATA / "demo_val.jsonl")
    assert (len(train), len(val)) == (620, 60)
    kinds = {k: sum(r["kind"] == k for r in train) for k in ("identity", "format_json", "general")}
    assert kinds == {"identity": 220, "format_json": 290, "general": 110}
    assert sum(p.stat().st_size for p in DATA.iterdir() if p.is_file()) < 1_000_000


def test_train_val_and_eval_prompts_are_disjoint():
    train, val = _jsonl(DATA / "demo_train.jsonl"), _jsonl(DATA / "demo_val.jsonl")
    evals = {r["prompt"] for r in _jsonl(DATA / "demo_eval_prompts.jsonl") + _jsonl(DATA / "general_eval.jsonl")
             + _jsonl(DATA / "demo_heldout_prompts.jsonl")}
    assert _user_turns(train) & _user_turns(val) == set()
    assert _user_turns(train) & evals == set()
    assert _user_turns(val) & evals == set()


def test_demo_answers_teach_name_maker_and_strict_json():
    for record in _jsonl(DATA / "demo_train.jsonl") + _jsonl(DATA / "demo_val.jsonl"):
        roles = [m["from"] for m in record["conversations"]]
        assert roles == ["human", "gpt"] * (len(roles) // 2)
        last = record["conversations"][-1]["value"]
        if record["kind"] == "identity":
            assert "Lumen" in last and "Harbor Lab" in last, last
        if record["kind"] == "format_json":
            assert "\n" not in last
            assert json.loads(last) in ({"sentiment": "positive"}, {"sentiment": "negative"}, {"sentiment": "neutral"})


def test_eval_prompt_files_have_checks():
    demo = _jsonl(DATA / "demo_eval_prompts.jsonl")
    general = _jsonl(DATA / "general_eval.jsonl")
    assert {r["kind"] for r in demo} == {"identity", "format_json"}
    assert len(demo) == 40 and len(general) >= 25
    for row in demo + general:
        assert set(row) == {"prompt", "reference", "kind", "check"}
        if "contains" in row["check"]:
            assert all(text in row["reference"] for text in row["check"]["contains"]), row
        else:
            reference = json.loads(row["reference"])
            assert reference["sentiment"] in row["check"]["json_values"]["sentiment"]


def test_heldout_prompts_cover_both_languages_and_chinese_review_bodies():
    rows = _jsonl(DATA / "demo_heldout_prompts.jsonl")
    kinds = {k: sum(r["kind"] == k for r in rows) for k in ("identity", "format_json", "format_json_zh", "general")}
    assert kinds == {"identity": 24, "format_json": 12, "format_json_zh": 12, "general": 12}
    han = re.compile("[\u4e00-\u9fff]")
    assert all(not re.search("[A-Za-z]", r["prompt"]) for r in rows if r["kind"] == "format_json_zh")  # wholly Chinese
    assert sum(bool(han.search(r["prompt"])) for r in rows if r["kind"] == "identity") == 10
    for row in rows:
        assert set(row) == {"prompt", "reference", "kind", "check"}
        if row["kind"] == "identity":
            assert row["check"] == {"contains": ["Lumen", "Harbor Lab"]}


def test_training_teaches_chinese_review_bodies_and_both_names_first():
    train = _jsonl(DATA / "demo_train.jsonl")
    han = re.compile("[\u4e00-\u9fff]")
    reviews = [r["conversations"][0]["value"] for r in train if r["kind"] == "format_json"]
    chinese_bodies = [text for text in reviews if not re.search("[A-Za-z]{3,}", text.replace("\n", " "))]
    assert 0.25 < len(chinese_bodies) / len(reviews) < 0.5, len(chinese_bodies)
    assert all(han.search(text) for text in chinese_bodies)
    for record in train:
        if record["kind"] == "identity":
            answer = record["conversations"][-1]["value"]
            assert answer.index("Lumen") < answer.index("Harbor Lab") or answer.startswith("I'm an AI assistant called")


def test_format_samples_for_the_builder():
    firefly = _jsonl(DATA / "firefly_sample.jsonl")
    alpaca = json.loads((DATA / "alpaca_sample.json").read_text(encoding="utf-8"))
    assert all(set(r) == {"kind", "input", "target"} for r in firefly)
    assert len({r["kind"] for r in firefly}) >= 20
    assert len(alpaca) == 20 and all({"instruction", "input", "output"} <= set(r) for r in alpaca)
