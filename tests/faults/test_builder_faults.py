"""Faults of issue 16 in the data builder: each test is named after the numbered item it reproduces."""
import json
import os

import pytest

from sft.data.builder import BuildError, BuildOptions, build


def _write_rows(path, n=20):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"q{i}"},
                                                  {"from": "gpt", "value": f"a{i}"}]}) + "\n")
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("case", ["symlink", "double_slash", "rejects", "duplicates", "val_output",
                                  "default_val_name", "default_rejects_name", "hardlink"])
def test_item2_output_never_overwrites_an_input(tmp_path, case):
    src = tmp_path / "v.jsonl"
    out = str(tmp_path / "out.jsonl")
    extra = {}
    if case == "symlink":
        os.symlink(tmp_path / "v.jsonl", tmp_path / "link.jsonl")
        out = str(tmp_path / "link.jsonl")
    elif case == "double_slash":
        out = "/" + str(src)
    elif case in ("rejects", "duplicates", "val_output"):
        extra = {case: str(src)}
        if case == "val_output":
            extra["val_ratio"] = 0.1
    elif case == "default_val_name":
        src = tmp_path / "v.val.jsonl"
        out = str(tmp_path / "v.jsonl")
        extra = {"val_ratio": 0.1}
    elif case == "default_rejects_name":
        src = tmp_path / "v.rejects.jsonl"
        out = str(tmp_path / "v.jsonl")
    elif case == "hardlink":
        out = str(tmp_path / "hard.jsonl")
    before = _write_rows(src)
    if case == "hardlink":
        os.link(src, out)
    with pytest.raises(BuildError, match=r"is the same file as the input") as err:
        build(BuildOptions(output=out, inputs=[str(src)], workers=1, **extra))
    assert str(src) in str(err.value)
    assert open(src, "rb").read() == before


def test_item2_two_outputs_never_share_a_file(tmp_path):
    src = tmp_path / "in.jsonl"
    _write_rows(src)
    out = str(tmp_path / "out.jsonl")
    with pytest.raises(BuildError, match=r"--rejects .* is the same file as --output"):
        build(BuildOptions(output=out, inputs=[str(src)], rejects=out, workers=1))
