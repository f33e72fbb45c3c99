"""sft.train.checkpoints topology: what a data position depends on, and the refusal that says what to do."""
import pytest

from sft.train.checkpoints import (
    check_output_dir_shared,
    check_resume_topology,
    run_topology,
    saved_topology,
    write_data_state,
)


def _checkpoint(tmp_path, topology: dict, name: str = "checkpoint-3"):
    folder = tmp_path / name
    for rank in range(topology["world_size"]):
        write_data_state(folder, {"world_size": topology["world_size"], "rank": rank, "topology": topology},
                         rank, topology["world_size"])
    return folder


def test_run_topology_reads_the_machine_split_from_the_launcher(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert run_topology(8, 2, 16) == {"world_size": 8, "num_machines": 2, "processes_per_machine": 4,
                                      "per_device_train_batch_size": 2, "gradient_accumulation_steps": 16}
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # python hf_sft.py: one process on one machine
    assert run_topology(1, 2, 16)["num_machines"] == 1


def test_saved_topology_of_an_older_checkpoint_is_its_world_size(tmp_path):
    write_data_state(tmp_path / "old", {"world_size": 2, "rank": 0}, 0, 2)
    assert saved_topology(tmp_path / "old") == {"world_size": 2}
    assert saved_topology(tmp_path) is None  # no data state: read_data_state explains


def test_another_world_size_is_refused_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    folder = _checkpoint(tmp_path, {"world_size": 2, "num_machines": 2, "processes_per_machine": 1,
                                    "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1})
    with pytest.raises(ValueError, match=r"written by 2 processes \(2 machines x 1\), this run has 1 process "
                                         r"\(1 machine x 1\).*--num_processes 2.*"
                                         rf"start a new run with --model {folder}, a new --output_dir"):
        check_resume_topology(folder, run_topology(1, 2, 1))


def test_an_adapter_checkpoint_is_merged_before_a_new_run(tmp_path):
    folder = _checkpoint(tmp_path, {"world_size": 2})
    with pytest.raises(ValueError, match=rf"--merge --merge_from {folder} --merge_output {folder}-merged\) and "
                                         rf"start a new run with --model {folder}-merged"):
        check_resume_topology(folder, run_topology(4, 2, 1), adapter=True)


def test_another_batch_layout_is_refused_naming_the_flags(tmp_path):
    folder = _checkpoint(tmp_path, run_topology(2, 2, 4))
    with pytest.raises(ValueError, match=r"resume with --per_device_train_batch_size 2 \(now 4\) and "
                                         r"--gradient_accumulation_steps 4 \(now 2\)"):
        check_resume_topology(folder, run_topology(2, 4, 2))


def test_the_same_processes_on_another_machine_split_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    folder = _checkpoint(tmp_path, run_topology(2, 2, 1))  # 2 machines x 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    check_resume_topology(folder, run_topology(2, 2, 1))  # 1 machine x 2: data belongs to global ranks


def test_one_process_needs_no_shared_output_dir_check(tmp_path):
    check_output_dir_shared(tmp_path / "out", rank=0, world_size=1)
    assert not (tmp_path / "out").exists()
