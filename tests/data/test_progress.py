"""The data builder's progress: a tqdm bar on a terminal, a plain line every --progress_interval seconds otherwise."""
import io
import json

import sft.data.progress as progress
import sft_data_builder
from sft.data.progress import BuildProgress


class FakeClock:
    """Each reading is one second after the previous one."""

    def __init__(self):
        self.now = -1.0

    def monotonic(self):
        self.now += 1.0
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_a_plain_line_every_interval():
    out, clock = io.StringIO(), FakeClock()
    shown = BuildProgress(out, interval=10, clock=clock.monotonic)
    assert shown.bar is None  # a StringIO is not a terminal
    for read in range(25):
        shown.update(read, read // 5, read // 2)
    shown.close()
    assert out.getvalue().splitlines() == [
        "progress: 9 records read in 0:00:10 (1/s), 1 rejected, 4 duplicates",
        "progress: 19 records read in 0:00:20 (1/s), 3 rejected, 9 duplicates",
    ]


def _write_input(tmp_path):
    rows = [{"instruction": f"question {i % 40}", "output": f"answer {i % 40}"} for i in range(60)]  # 20 duplicates
    rows += [{"instruction": "", "output": "no question"}] * 3  # rejected
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_builder_prints_progress_lines_when_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "time", FakeClock())
    src = _write_input(tmp_path)
    code = sft_data_builder.main([str(src), "--output", str(tmp_path / "x.jsonl"), "--workers", "1",
                                  "--progress_interval", "30"])
    err = capsys.readouterr().err
    assert code == 0
    lines = [line for line in err.splitlines() if line.startswith("progress:")]
    assert lines == ["progress: 29 records read in 0:00:30 (1/s), 0 rejected, 0 duplicates",
                     "progress: 59 records read in 0:01:00 (1/s), 0 rejected, 19 duplicates"]
    assert "\r" not in err  # no bar redraws in a log


def test_builder_shows_a_tqdm_bar_with_rejected_and_duplicates_on_a_terminal(tmp_path, monkeypatch, capsys):
    terminal = Terminal()
    monkeypatch.setattr(sft_data_builder.sys, "stderr", terminal)
    src = _write_input(tmp_path)
    code = sft_data_builder.main([str(src), "--output", str(tmp_path / "x.jsonl"), "--workers", "1"])
    shown = terminal.getvalue()
    assert code == 0 and "progress:" not in shown
    final = shown.split("\r")[-1]  # the bar's last redraw
    assert final.startswith("reading: 63rec [") and "rec/s, rejected=3, duplicates=20]" in final, final
    assert "read=63 written=40 rejected=3 duplicates=20" in capsys.readouterr().out


def test_progress_interval_zero_prints_nothing_and_a_negative_one_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "time", FakeClock())  # with --progress_interval 1 every record would print
    src = _write_input(tmp_path)
    assert sft_data_builder.main([str(src), "--output", str(tmp_path / "x.jsonl"), "--progress_interval", "0"]) == 0
    assert "progress:" not in capsys.readouterr().err
    assert sft_data_builder.main([str(src), "--output", str(tmp_path / "y.jsonl"), "--progress_interval", "-1"]) == 2
    assert "--progress_interval -1.0: expected seconds >= 0 (0: no progress output)" in capsys.readouterr().err
