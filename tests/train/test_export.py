"""Merging never deletes what it did not write: the run, a folder holding it, or an unrelated folder."""
import json

import pytest

import hf_sft_eval
from sft.train.export import MERGED_MARKER, check_merge_target


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "runs" / "lora"
    (run / "checkpoint-4").mkdir(parents=True)
    (run / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny-qwen2"}))
    (run / "train_log.jsonl").write_text("{}\n")
    return run


@pytest.mark.parametrize("target", ["run", "parent", "grandparent"])
def test_the_run_and_folders_holding_it_are_refused_even_with_overwrite(run, target, capsys):
    folder = {"run": run, "parent": run.parent, "grandparent": run.parent.parent}[target]
    before = sorted(p.name for p in run.rglob("*"))
    code = hf_sft_eval.main(["--run", str(run), "--merge", "--merge_output", str(folder), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "which replacing it would delete" in err and "Traceback" not in err
    assert sorted(p.name for p in run.rglob("*")) == before


def test_an_unrelated_folder_needs_overwrite(run, tmp_path, capsys):
    other = tmp_path / "keep"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code = hf_sft_eval.main(["--run", str(run), "--merge", "--merge_output", str(other)])
    err = capsys.readouterr().err
    assert code == 2 and "was not written by a merge" in err and "--overwrite" in err
    assert (other / "notes.txt").read_text() == "mine"


def test_allowed_targets(run, tmp_path):
    check_merge_target(run / "merged", [run])  # new folder inside the run: the default
    check_merge_target(tmp_path / "empty", [run])
    earlier = tmp_path / "earlier_merge"
    earlier.mkdir()
    (earlier / MERGED_MARKER).write_text("merged from x\n")
    (earlier / "model.safetensors").write_text("")
    check_merge_target(earlier, [run])  # written by a merge: replaced
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "a").write_text("")
    check_merge_target(unrelated, [run], overwrite=True)
    with pytest.raises(ValueError, match="is a file"):
        (tmp_path / "f").write_text("")
        check_merge_target(tmp_path / "f", [run])


def test_overwrite_without_merge_is_a_flag_error(run, capsys):
    assert hf_sft_eval.main(["--run", str(run), "--overwrite"]) == 2
    assert "only apply with --merge" in capsys.readouterr().err
