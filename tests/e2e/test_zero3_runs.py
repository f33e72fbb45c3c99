"""DeepSpeed ZeRO-3 with two gloo processes on CPU, really partitioned: same losses as one process, loadable saves, exact resume.

DeepSpeed runs on CPU through its CPU accelerator (no CUDA: `get_accelerator()` is "cpu", the
backend gloo); the launch is the documented one, `accelerate launch --config_file
configs/accelerate/deepspeed_zero3.yaml --num_processes 2 --mixed_precision no`. Each rank writes
engine-rank{r}.json (sft.train.engine): these tests fail if the run was not ZeRO stage 3 with
partitioned parameters.

Skipped where deepspeed is not importable (CI installs no deepspeed: PyPI has only its source
package, which builds compiled ops by default). To run them, build a pure-Python wheel and install it
with its runtime dependencies, in the venv or a side directory on PYTHONPATH:

    DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation deepspeed==0.19.8
    pip install --target /tmp/dssite deepspeed-0.19.8-*.whl hjson einops msgpack ninja py-cpuinfo
    PYTHONPATH=/tmp/dssite python -m pytest -q tests/e2e/test_zero3_runs.py

Same global batch as in test_fsdp_runs: rank r reads records r, r+2, ...; step k of two ranks with 2
samples each holds the 4 records one process with a batch of 4 reads at step k.
"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.e2e.test_fsdp_runs import FSDP as TWO_RANKS, STEPS, _ids, _losses
from tests.e2e.test_train_runs import REPO, _train, _write_data

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not importable; see this module's docstring to build and install it (pure Python)")


def _zero3_launcher(port: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "configs" / "accelerate" / "deepspeed_zero3.yaml"), "--num_processes", "2",
            "--mixed_precision", "no", "--main_process_port", str(port)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3")
    _write_data(tmp / "train.jsonl", 24)
    data = ["--data", str(tmp / "train.jsonl")]
    zero3 = _train(data + STEPS + TWO_RANKS + ["--output_dir", str(tmp / "zero3")], launcher=_zero3_launcher(29561))
    assert zero3.returncode == 0, zero3.stderr[-4000:]
    single = _train(data + STEPS + ["--per_device_train_batch_size", "4", "--shuffle_buffer", "4",
                                    "--output_dir", str(tmp / "single")])
    assert single.returncode == 0, single.stderr[-3000:]
    return tmp


def test_zero3_is_really_partitioned_and_trains_like_one_process(runs):
    for rank in (0, 1):
        engine = json.loads((runs / "zero3" / f"engine-rank{rank}.json").read_text())
        assert (engine["distributed_type"], engine["zero_stage"]) == ("DEEPSPEED", 3)
        assert engine["zero_parameters"] == engine["parameters"] > 0
        assert engine["local_numel"] < engine["global_numel"] / 1.9  # each rank holds about half
    assert _ids(runs / "zero3", 2) == _ids(runs / "single", 1)  # the same global batches, step by step
    zero3, single = _losses(runs / "zero3"), _losses(runs / "single")
    assert sorted(zero3) == sorted(single) == [1, 2, 3, 4]
    for step in zero3:
        assert zero3[step] == pytest.approx(single[step], rel=1e-4), step


def test_zero3_saves_consolidated_loadable_models_and_complete_checkpoints(runs):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    out = runs / "zero3"
    end = json.loads((out / "run_end.json").read_text())
    assert (end["status"], end["final_model"], end["last_checkpoint"]) == ("finished", str(out), "checkpoint-4")
    final = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    # The trained weights: the engine's own partitioned fp32 copy at the last step, consolidated
    # offline, and within float tolerance the one-process run's final model.
    engine_copy = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoint-4"))
    reference = AutoModelForCausalLM.from_pretrained(str(runs / "single")).state_dict()
    for name, tensor in final.items():
        trained = engine_copy[name] if name in engine_copy else engine_copy["model.embed_tokens.weight"]  # tied
        torch.testing.assert_close(tensor, trained.to(tensor.dtype), rtol=4e-3, atol=1e-5)  # 16-bit tolerance
        torch.testing.assert_close(tensor, reference[name], rtol=1e-3, atol=1e-5)
    for step in (2, 4):
        checkpoint = out / f"checkpoint-{step}"
        assert (checkpoint / "COMPLETE").exists()
        assert {"model.safetensors", "data_state-rank0.json", "data_state-rank1.json", "chat_template.jinja",
                f"global_step{step}"} <= {p.name for p in checkpoint.iterdir()}
        AutoModelForCausalLM.from_pretrained(str(checkpoint))  # loads alone


def test_the_evaluator_scores_a_zero3_run(runs):
    sys.path.insert(0, str(REPO))
    import hf_sft_eval

    out = runs / "zero3"
    assert hf_sft_eval.main(["--run", str(out), "--no_base", "--max_new_tokens", "4", "--threads", "1",
                             "--nice", "0"]) == 0
    records = [json.loads(line) for line in (out / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [r["checkpoint"] for r in records] == ["checkpoint-2", "checkpoint-4"]


def test_zero3_resume_after_sigkill_reproduces_the_uninterrupted_losses(runs):
    out = runs / "resumed"
    common = ["--data", str(runs / "train.jsonl"), *STEPS, *TWO_RANKS, "--output_dir", str(out)]
    killed = _train(common, launcher=_zero3_launcher(29563),
                    script=[str(Path(__file__).with_name("fault_launcher.py")), "--kill_after_save", "2"])
    assert killed.returncode != 0
    assert (out / "checkpoint-2" / "COMPLETE").exists() and not (out / "checkpoint-4").exists()
    resumed = _train(common + ["--resume_from_checkpoint", "auto"], launcher=_zero3_launcher(29565))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    straight = _losses(runs / "zero3")
    again = _losses(out)
    assert sorted(again) == [1, 2, 3, 4]
    for step in straight:
        assert again[step] == pytest.approx(straight[step], rel=1e-4), step
    assert _ids(out, 2) == _ids(runs / "zero3", 2)
    assert json.loads((out / "engine-rank0.json").read_text())["distributed_type"] == "DEEPSPEED"
