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


def _array_with_a_stray_quote(path, n, bad, indent=None):
    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
            for i in range(n)]
    if indent is None:
        text = "[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n"
    else:
        text = json.dumps(rows, indent=indent) + "\n"
    good, broken = f'"value": "a{bad}"', f'"value": "a{bad} is 5" tall"'  # an unescaped quote: odd count
    assert text.count(good) == 1
    path.write_text(text.replace(good, broken), encoding="utf-8")


@pytest.mark.parametrize("indent", [None, 2])
@pytest.mark.parametrize("bad", [0, 4999, 9999])
def test_item3_an_unescaped_quote_does_not_swallow_the_rest_of_a_json_array(tmp_path, indent, bad):
    from sft.data.sources import iter_raw_records

    src = tmp_path / "a.json"
    _array_with_a_stray_quote(src, 10_000, bad, indent)
    records = list(iter_raw_records(str(src)))
    errors = [r for r in records if r.error is not None]
    assert len(records) == 10_000 and len(errors) == 1, [(r.line, r.error) for r in errors[:3]]
    assert errors[0].error.reason == "invalid_json" and "unescaped" in errors[0].error.detail
    assert f'a{bad} is 5" tall' in errors[0].raw
    result = build(BuildOptions(output=str(tmp_path / "out.jsonl"), inputs=[str(src)], workers=1))
    assert (result.read, result.written, result.rejected) == (10_000, 9_999, 1)


@pytest.mark.parametrize("bad, unread", [(0, 999), (500, 499), (999, None)])
def test_item3_a_minified_array_never_reports_a_short_read_as_success(tmp_path, bad, unread):
    # One line, no element on a line of its own: nothing to resynchronise on, and the broken element runs on to
    # the closing ']'. Before: read=bad+1, the rest silently gone, exit 0. Now: the build stops naming the line and
    # how many elements were not read (or, for the last element, it is the one reject: nothing else was lost).
    src, out = tmp_path / "min.json", tmp_path / "out.jsonl"
    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
            for i in range(1000)]
    src.write_text(json.dumps(rows).replace(f'"a{bad}"', f'"a{bad} is 5" tall"', 1), encoding="utf-8")
    if unread is None:
        result = build(BuildOptions(output=str(out), inputs=[str(src)], workers=1))
        assert (result.read, result.written, result.rejected) == (1000, 999, 1)
        return
    with pytest.raises(BuildError) as err:
        build(BuildOptions(output=str(out), inputs=[str(src)], workers=1))
    assert str(err.value).startswith(f"{src}:1: this element runs on to the file's closing ']'")
    assert f"({unread:,} later elements unread)" in str(err.value) and "fix this element" in str(err.value)
    assert not out.exists()  # nothing committed
