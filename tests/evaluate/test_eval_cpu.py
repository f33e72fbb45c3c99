"""The CPU evaluator beside a GPU run: usable CPUs (affinity, cgroup quota), native bf16, GPUs hidden."""
import os
from pathlib import Path

import pytest
import torch

import hf_sft_eval
from sft.evaluate import cli, serve
from sft.evaluate.evaluator import EvalSetup, Target, should_generate
from sft.evaluate.inference import cpu_bf16_feature, resolve_eval_dtype
from sft.evaluate.options import GenerationOptions


def _cgroup(tmp_path, proc: str, files: dict[str, str]) -> tuple[str, str]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "proc_cgroup").write_text(proc)
    return str(root), str(tmp_path / "proc_cgroup")


@pytest.mark.parametrize("proc, files, quota", [
    # cgroup v2: a container limited to 2.5 CPUs, seen at the mount's top (its own path is not mounted inside)
    ("0::/\n", {"cpu.max": "250000 100000\n"}, 2.5),
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),
    # v2, nested: the parent's limit binds below the child's
    ("0::/job/step\n", {"cpu.max": "max 100000\n", "job/cpu.max": "300000 100000\n",
                        "job/step/cpu.max": "800000 100000\n"}, 3.0),
    # cgroup v1 (cpu,cpuacct mounted together); -1: no quota
    ("4:cpu,cpuacct:/docker/abc\n1:name=systemd:/\n",
     {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "150000\n", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"},
     1.5),
    ("2:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ("0::/\n", {"cpu.max": "garbage\n"}, None),  # unreadable: no limit rather than a crash
    ("", {}, None),
])
def test_cgroup_cpu_quota_from_v1_and_v2_files(tmp_path, proc, files, quota):
    assert cli.cgroup_cpu_quota(*_cgroup(tmp_path, proc, files)) == quota


def test_available_cpus_is_the_affinity_capped_by_the_quota_not_the_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 96)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert cli.available_cpus(*_cgroup(tmp_path, "0::/\n", {})) == 6
    assert cli.available_cpus(*_cgroup(tmp_path, "0::/\n", {"cpu.max": "250000 100000"})) == 2
    assert cli.available_cpus(*_cgroup(tmp_path, "0::/\n", {"cpu.max": "50000 100000"})) == 1  # never 0


@pytest.mark.parametrize("flags, feature", [
    ("fpu sse2 avx2 avx512f avx512_bf16", "AVX512_BF16"),
    ("fpu avx512f amx_bf16 amx_tile avx512_bf16", "AMX"),
    ("fpu sse2 avx2 avx512f", None),
])
def test_native_bf16_comes_from_the_cpu_flags(tmp_path, monkeypatch, flags, feature):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")  # says nothing about bf16
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_bf16_feature(str(cpuinfo)) == feature
    dtype, reason = resolve_eval_dtype("auto", str(cpuinfo))
    assert dtype == ("bfloat16" if feature else "float32")
    assert reason == (f"auto: the CPU has native bf16 ({feature})" if feature else
                      "auto: the CPU has no native bf16 (it would be emulated, slower than fp32)")
    assert resolve_eval_dtype("float32", str(cpuinfo)) == ("float32", "--eval_dtype")


def test_eval_dtype_flag_is_checked(capsys):
    assert hf_sft_eval.main(["--run", "x", "--eval_dtype", "fp8"]) == 2
    assert "--eval_dtype 'fp8': expected auto, float32 or bfloat16" in capsys.readouterr().err


@pytest.mark.parametrize("users", [None, "0,1"])
def test_gpus_are_always_hidden_and_serve_on_cuda_gets_the_users_value_back(monkeypatch, users):
    # Before: a CUDA_VISIBLE_DEVICES set by the user (e.g. for training) was left as is: the evaluator saw the GPUs.
    for name in ("SFT_EVAL_GPUS_HIDDEN", "SFT_EVAL_CUDA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    if users is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", users)
    hf_sft_eval.hide_gpus()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    hf_sft_eval.hide_gpus()  # main() called twice in one process: the saved value stays the user's
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    serve._use_gpu("cuda")  # the one command with --device
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == users
    assert "SFT_EVAL_GPUS_HIDDEN" not in os.environ and "SFT_EVAL_CUDA_VISIBLE_DEVICES" not in os.environ


def test_the_evaluator_process_sees_no_gpu_whatever_the_variable_said(tmp_path):
    import subprocess
    import sys

    code = ("import hf_sft_eval, os\nhf_sft_eval.hide_gpus()\nimport torch\n"
            "print(repr(os.environ['CUDA_VISIBLE_DEVICES']), torch.cuda.device_count())")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(hf_sft_eval.__file__).parent, capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, CUDA_VISIBLE_DEVICES="0"))
    assert result.stdout.split() == ["''", "0"], result.stderr


@pytest.mark.parametrize("every, save_steps, expected", [
    (1, 10, {"base": True, "checkpoint-10": True, "checkpoint-20": True, "checkpoint-30": True, "final": True}),
    (3, 10, {"base": True, "checkpoint-10": False, "checkpoint-20": False, "checkpoint-30": True, "final": True}),
    (2, 10, {"base": True, "checkpoint-10": False, "checkpoint-20": True, "checkpoint-30": False, "final": True}),
    (2, 0.25, {"base": True, "checkpoint-10": True, "checkpoint-20": True, "checkpoint-30": True, "final": True}),
])
def test_generate_every_k_picks_checkpoints_by_step(every, save_steps, expected):
    setup = EvalSetup(run_dir=Path("r"), base_model="m", encode=None, val=[], prompts=[], general=[],
                      generation=GenerationOptions(), generate_every=every, save_steps=save_steps)
    targets = [Target(0, "m", "base"), *(Target(s, f"r/checkpoint-{s}", f"checkpoint-{s}") for s in (10, 20, 30)),
               Target(35, "r", "final")]
    assert {t.label: should_generate(t, setup) for t in targets} == expected
