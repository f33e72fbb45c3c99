"""bench/gpu_check.py --dry_run: every case that does not need CUDA runs on the CPU with a tiny model, so the
GPU run (one call on a lent machine) meets no untested code path."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_check_dry_run_passes_every_case_it_can_run_on_a_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry_run", "--budget_s", "1200"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    cases = {case["case"]: case for case in summary["cases"]}
    optional = {"hf_zero3": "deepspeed", "trl": "trl"}  # skipped where the package is not installed
    for name, case in cases.items():
        expected = "skipped" if name in optional and importlib.util.find_spec(optional[name]) is None else "pass"
        assert case["status"] == expected, (name, case.get("note"), case.get("stderr_tail"))
    for name in ("hf_full", "hf_packing", "hf_lora", "hf_fsdp"):
        case = cases[name]
        assert case["fused_loss"] == "chunked" and case["loss_kernel_logged"], name  # no CUDA: the fallback, logged
        assert 0.0 <= case["data_wait_share"] <= 1.0 and "--prefetch_batches 4" in case["command"], name
        assert case["loss_falling"] and case["checkpoint_complete"], name
    assert cases["hf_packing"]["isolation_checked"] and cases["hf_packing"]["attn_implementation"] == "sdpa"
    assert cases["packed_vs_padded"]["relative_difference"] <= 1e-4
    assert cases["reload"]["checked"]["hf_full"]["logits_finite"]
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| data wait |" in table and "| hf_packing | pass |" in table
