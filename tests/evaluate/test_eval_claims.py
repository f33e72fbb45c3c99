"""Claims on evaluation steps (sft.evaluate.evaluator.claim_step): one evaluator per step, dead ones' claims free."""
import json
import logging
import os
import socket
import subprocess
import sys

from sft.evaluate.evaluator import claim_step


def test_a_claimed_step_is_refused_to_a_second_evaluator_until_released(tmp_path, caplog):
    first = claim_step(tmp_path, 4)
    assert first is not None
    assert json.loads(first.path.read_text()) == {"pid": os.getpid(), "host": socket.gethostname(),
                                                  "time": json.loads(first.path.read_text())["time"]}
    with caplog.at_level(logging.INFO, logger="sft.evaluate.evaluator"):
        assert claim_step(tmp_path, 4) is None  # another open file, same process: still refused
    assert f"step 4 is being evaluated by another evaluator (pid {os.getpid()} on {socket.gethostname()})" \
        in caplog.text
    other = claim_step(tmp_path, 6)  # other steps are free
    assert other is not None
    first.release(finished=True)
    assert not first.path.exists()
    again = claim_step(tmp_path, 4)
    assert again is not None
    again.release(finished=False)
    other.release(finished=False)
    assert again.path.exists()  # an unfinished step's file stays; its lock is free


def test_a_step_held_by_another_process_is_skipped(tmp_path):
    path = tmp_path / "locks" / "step-2.lock"
    path.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, b'{\"pid\": %d, \"host\": \"h\"}' % os.getpid())\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert claim_step(tmp_path, 2) is None
    finally:
        holder.kill()
        holder.wait()
    claim = claim_step(tmp_path, 2)  # its process died: the claim is free at once
    assert claim is not None
    claim.release(finished=True)


def test_the_lock_file_of_a_dead_evaluator_is_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks" / "step-8.lock").write_text(json.dumps({"pid": pid, "host": "gone", "time": 1.0}))
    with caplog.at_level(logging.INFO, logger="sft.evaluate.evaluator"):
        claim = claim_step(tmp_path, 8)
    assert claim is not None
    assert f"took over the claim on step 8 left by pid {pid} on gone (no longer running)" in caplog.text
    assert json.loads(claim.path.read_text())["pid"] == os.getpid()
    claim.release(finished=True)
