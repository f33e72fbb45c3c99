"""FSDP2 with two gloo processes on CPU, really sharded: same losses as one process, loadable saves, exact resume.

The launch is the documented one (accelerate launch --config_file configs/accelerate/fsdp_cpu_2proc.yaml);
each rank writes engine-rank{r}.json (sft.train.engine), so these tests fail if the run fell back to DDP.
Same global batch: with no shuffling across records (--shuffle_buffer = the batch, --group_by_length
false) rank r reads records r, r+2, ... so step k of two ranks with 2 samples each holds the 4 records
that one process with a batch of 4 reads at step k.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

from sft.train.engine import fsdp_cpu_problem
from tests.e2e.test_train_runs import REPO, _train, _write_data

pytestmark = pytest.mark.skipif(fsdp_cpu_problem(torch.__version__) is not None,
                                reason="FSDP2 on CPU processes needs torch >= 2.7")

STEPS = ["--max_steps", "4", "--save_steps", "2", "--gradient_accumulation_steps", "1", "--group_by_length", "false"]
FSDP = ["--per_device_train_batch_size", "2", "--shuffle_buffer", "2"]


def _fsdp_launcher(port: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "configs" / "accelerate" / "fsdp_cpu_2proc.yaml"), "--main_process_port", str(port)]


def _losses(output_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _ids(output_dir: Path, ranks: int) -> dict[int, set]:
    steps: dict[int, set] = {}
    for rank in range(ranks):
        for line in (output_dir / f"sample_ids-rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            steps.setdefault(record["step"], set()).update(record["ids"])
    return steps


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    _write_data(tmp / "train.jsonl", 24)
    data = ["--data", str(tmp / "train.jsonl")]
    fsdp = _train(data + STEPS + FSDP + ["--output_dir", str(tmp / "fsdp")], launcher=_fsdp_launcher(29541))
    assert fsdp.returncode == 0, fsdp.stderr[-4000:]
    single = _train(data + STEPS + ["--per_device_train_batch_size", "4", "--shuffle_buffer", "4",
                                    "--output_dir", str(tmp / "single")])
    assert single.returncode == 0, single.stderr[-3000:]
    return tmp


def test_fsdp2_is_really_sharded_and_trains_like_one_process(runs):
    for rank in (0, 1):
        engine = json.loads((runs / "fsdp" / f"engine-rank{rank}.json").read_text())
        assert (engine["distributed_type"], engine["fsdp_version"], engine["fsdp_module"]) == ("FSDP", 2, True)
        assert engine["wrapper"].startswith("FSDP") and engine["dtensor_parameters"] == engine["parameters"] > 0
        assert engine["local_numel"] < engine["global_numel"]  # each rank holds a shard, not the model
    assert _ids(runs / "fsdp", 2) == _ids(runs / "single", 1)  # the same global batches, step by step
    fsdp, single = _losses(runs / "fsdp"), _losses(runs / "single")
    assert sorted(fsdp) == sorted(single) == [1, 2, 3, 4]
    for step in fsdp:
        assert fsdp[step] == pytest.approx(single[step], rel=1e-4), step


def test_fsdp2_saves_consolidated_loadable_models_and_complete_checkpoints(runs):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = runs / "fsdp"
    end = json.loads((out / "run_end.json").read_text())
    assert (end["status"], end["final_model"], end["last_checkpoint"]) == ("finished", str(out), "checkpoint-4")
    final = AutoModelForCausalLM.from_pretrained(str(out))
    saved = load_file(str(out / "model.safetensors"))
    # The final weights are the trained ones: the engine's own copy at the last step (FSDP's
    # pytorch_model_fsdp.bin), and within float tolerance the one-process run's final model.
    engine_copy = torch.load(out / "checkpoint-4" / "pytorch_model_fsdp.bin", map_location="cpu", weights_only=True)
    reference = AutoModelForCausalLM.from_pretrained(str(runs / "single")).state_dict()
    for name, tensor in final.state_dict().items():
        assert torch.equal(tensor, engine_copy[name]), name
        torch.testing.assert_close(tensor, reference[name], rtol=1e-3, atol=1e-5)
    assert set(saved) <= set(engine_copy)
    for step in (2, 4):
        checkpoint = out / f"checkpoint-{step}"
        assert (checkpoint / "COMPLETE").exists()
        assert {"model.safetensors", "data_state-rank0.json", "data_state-rank1.json", "optimizer.bin",
                "chat_template.jinja"} <= {p.name for p in checkpoint.iterdir()}
        AutoModelForCausalLM.from_pretrained(str(checkpoint))  # loads alone


def test_the_evaluator_scores_an_fsdp_run(runs):
    sys.path.insert(0, str(REPO))
    import hf_sft_eval

    out = runs / "fsdp"
    assert hf_sft_eval.main(["--run", str(out), "--no_base", "--max_new_tokens", "4", "--threads", "1",
                             "--nice", "0"]) == 0
    records = [json.loads(line) for line in (out / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [r["checkpoint"] for r in records] == ["checkpoint-2", "checkpoint-4"]


def test_fsdp2_resume_after_sigkill_reproduces_the_uninterrupted_losses(runs):
    out = runs / "resumed"
    common = ["--data", str(runs / "train.jsonl"), *STEPS, *FSDP, "--output_dir", str(out)]
    killed = _train(common, launcher=_fsdp_launcher(29543),
                    script=[str(Path(__file__).with_name("fault_launcher.py")), "--kill_after_save", "2"])
    assert killed.returncode != 0
    assert (out / "checkpoint-2" / "COMPLETE").exists() and not (out / "checkpoint-4").exists()
    resumed = _train(common + ["--resume_from_checkpoint", "auto"], launcher=_fsdp_launcher(29545))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    straight = _losses(runs / "fsdp")
    again = _losses(out)
    assert sorted(again) == [1, 2, 3, 4]
    for step in straight:
        assert again[step] == pytest.approx(straight[step], rel=1e-4), step
    assert _ids(out, 2) == _ids(runs / "fsdp", 2)
    assert json.loads((out / "engine-rank0.json").read_text())["distributed_type"] == "FSDP"
