"""A corpus of malformed inputs, generated in the test's folder: every kind of bad record or bad file the
builder and training must reject with a reason and a line (issue 16), mixed with good records.

    files, kinds = write_corpus(tmp_path)
    files           # paths to pass as inputs, in order
    kinds           # [Kind(name, file, line, reason)]: where each bad record sits and the reason expected

`reason` is the builder's; training rejects the same (it shares the reader and the normalizer) except
where `training` says otherwise (training has no --max_chars and never re-dumps the record as JSON).
Nesting: a record nested past 255 levels is rejected "too_deep" (orjson writes at most 255); tools and tool
call arguments are written as JSON strings (Python's json, ~1000 levels), so 900 levels there are kept.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


@dataclass
class Kind:
    name: str
    file: str
    line: int
    reason: str | None  # None: the builder keeps the record (a hostile record that must only not crash it)
    training: str | None = "same"  # training's reason when different; None: training keeps the record


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def firefly(i: int) -> dict:
    return {"kind": "OpenQA", "input": f"question {i}?", "target": f"answer {i}."}


def sharegpt(i: int) -> dict:
    return {"conversations": [{"from": "human", "value": f"sq {i}"}, {"from": "gpt", "value": f"sa {i}"}]}


def openai(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"oq {i}"}, {"role": "assistant", "content": f"oa {i}"}]}


def alpaca(i: int) -> dict:
    return {"instruction": f"do {i}", "input": "", "output": f"done {i}"}


def prompt_completion(i: int) -> dict:
    return {"prompt": f"pq {i}", "completion": f"pc {i}"}


def text(i: int) -> dict:
    return {"text": f"plain text number {i}."}


def llamafactory_v1(i: int) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "value": f"lq {i}"}]},
                         {"role": "assistant", "content": [{"type": "text", "value": f"la {i}"}], "loss_weight": 1}]}


def _nest(levels: int) -> str:
    return "[" * levels + "]" * levels


def _sg(*turns, **extra) -> str:
    return _dumps({"conversations": [{"from": f, "value": v} for f, v in turns], **extra})


def _oa(*messages, **extra) -> str:
    return _dumps({"messages": list(messages), **extra})


# Per file: the bad lines (name, raw line, builder reason[, training reason]) written after good records;
# the file's format is detected from its first record, so the format-specific kinds live in their own file.
_READER_KINDS = [  # before any good record: reader-level faults and records no format matches
    ("not_json", "{bad", "invalid_json"),
    ("trailing_comma", '{"input": "q", "target": "a",}', "invalid_json"),
    ("single_quotes", "{'input': 'q', 'target': 'a'}", "invalid_json"),
    ("nan_literal", '{"input": NaN, "target": "a"}', "invalid_json"),
    ("lone_surrogate", '{"input": "q\\ud800", "target": "a"}', "invalid_json"),
    ("nesting_5000", '{"input": "q", "target": "a", "x": ' + _nest(5000) + "}", "invalid_json"),
    ("raw_control_char", '{"input": "q\x01", "target": "a"}', "invalid_json"),
    ("raw_tab_in_string", '{"input": "q\tq", "target": "a"}', "invalid_json"),
    ("two_objects_one_line", '{"input": "q", "target": "a"} {"input": "q2", "target": "a2"}', "invalid_json"),
    ("unterminated_string", '{"input": "q, "target": "a"}', "invalid_json"),
    ("top_level_array", "[1, 2]", "not_an_object"),
    ("top_level_string", '"hello"', "not_an_object"),
    ("top_level_number", "42", "not_an_object"),
    ("top_level_null", "null", "not_an_object"),
    ("empty_object", "{}", "unknown_format"),
    ("unknown_keys", '{"question": "q", "answer": "a"}', "unknown_format"),
]
_FIREFLY_KINDS = [
    ("firefly_target_number", _dumps({"input": "q", "target": 5}), "non_string_content"),
    ("firefly_input_empty", _dumps({"input": "  ", "target": "a"}), "empty_content"),
    ("firefly_missing_target", _dumps({"input": "q", "kind": "OpenQA"}), "missing_field"),
    ("nesting_300", '{"input": "q", "target": "a", "x": ' + _nest(300) + "}", "too_deep", None),
    ("huge_line", _dumps({"input": "q", "target": "x" * 150_000}), "too_long", None),  # training truncates it
]
_SHAREGPT_KINDS = [
    ("sharegpt_not_a_list", _dumps({"conversations": "hi"}), "bad_field_type"),
    ("sharegpt_empty", _dumps({"conversations": []}), "empty_conversation"),
    ("sharegpt_turn_not_object", _dumps({"conversations": ["hi", "there"]}), "bad_field_type"),
    ("sharegpt_unknown_role", _sg(("human", "q"), ("robot", "a")), "unknown_role"),
    ("sharegpt_value_number", _dumps({"conversations": [{"from": "human", "value": 1}, {"from": "gpt", "value": "a"}]}),
     "non_string_content"),
    ("sharegpt_empty_value", _sg(("human", "q"), ("gpt", "")), "empty_content"),
    ("sharegpt_gpt_first", _sg(("gpt", "a"), ("human", "q")), "bad_role_order"),
    ("sharegpt_two_humans", _sg(("human", "q"), ("human", "q2"), ("gpt", "a")), "bad_role_order"),
    ("sharegpt_ends_with_human", _sg(("human", "q"), ("gpt", "a"), ("human", "q2")), "no_final_assistant"),
    ("sharegpt_system_in_middle", _sg(("human", "q"), ("system", "s"), ("gpt", "a")), "misplaced_system"),
    ("sharegpt_bad_function_call", _sg(("human", "q"), ("function_call", "{not json"), ("observation", "r"),
                                       ("gpt", "a")), "bad_function_call"),
    ("sharegpt_bad_tools", _sg(("human", "q"), ("gpt", "a"), tools="[{oops"), "bad_tools"),
    ("sharegpt_no_value", _dumps({"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}),
     "missing_field"),
    ("sharegpt_missing_conversations", _dumps({"system": "s"}), "missing_field"),
    ("sharegpt_tools_nested_1020", _sg(("human", "q"), ("gpt", "a"), tools='[{"name": "f", "parameters": '
                                       + _nest(1020) + "}]"), "too_deep"),
]
_OPENAI_KINDS = [
    ("openai_not_a_list", _dumps({"messages": {"role": "user"}}), "bad_field_type"),
    ("openai_unknown_role", _oa({"role": "wizard", "content": "q"}, {"role": "assistant", "content": "a"}),
     "unknown_role"),
    ("openai_content_number", _oa({"role": "user", "content": 3}, {"role": "assistant", "content": "a"}),
     "non_string_content"),
    ("openai_assistant_first", _oa({"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}),
     "bad_role_order"),
    ("openai_empty_user", _oa({"role": "user", "content": ""}, {"role": "assistant", "content": "a"}), "empty_content"),
    ("openai_bad_tool_call", _oa({"role": "user", "content": "q"},
                                 {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": "{}"}}]},
                                 {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}),
     "bad_function_call"),
    ("openai_bad_loss_flag", _oa({"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": "yes"}),
     "bad_loss_flag"),
    ("openai_bad_tools", _oa({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, tools="nope"),
     "bad_tools"),
    ("openai_tools_nested_900", '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
     '"tools": [{"name": "f", "parameters": ' + _nest(900) + "}]}", None, "dropped"),  # training: too many tokens
    ("openai_arguments_nested_900", '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": '
     '"", "tool_calls": [{"name": "f", "arguments": {"x": ' + _nest(900) + '}}]}, {"role": "tool", "content": "r"}, '
     '{"role": "assistant", "content": "a"}]}', None, None),
    ("llamafactory_fractional_loss_weight", _dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "value": "q"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "a"}], "loss_weight": 0.5}]}), "bad_loss_flag"),
    ("llamafactory_image_part", _dumps({"messages": [
        {"role": "user", "content": [{"type": "image", "value": "x.png"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "a"}]}]}), "non_string_content"),
]
_ALPACA_KINDS = [
    ("alpaca_output_empty", _dumps({"instruction": "do", "output": ""}), "empty_content"),
    ("alpaca_instruction_list", _dumps({"instruction": ["do"], "output": "a"}), "non_string_content"),
    ("alpaca_history_not_pairs", _dumps({"instruction": "do", "output": "a", "history": ["x"]}), "bad_field_type"),
    ("alpaca_history_string", _dumps({"instruction": "do", "output": "a", "history": "x"}), "bad_field_type"),
]
_PROMPT_COMPLETION_KINDS = [
    ("completion_number", _dumps({"prompt": "q", "completion": 7}), "non_string_content"),
    ("prompt_number", _dumps({"prompt": 7, "completion": "a"}), "non_string_content"),
]
_TEXT_KINDS = [
    ("text_number", _dumps({"text": 12}), "non_string_content"),
    ("text_empty", _dumps({"text": "   "}), "empty_content"),
]


def _write_lines(path: Path, good, n_good: int, bad: list, bad_first: bool = False) -> list[Kind]:
    """Good records (and a repeat of the first, a duplicate) with the bad lines after them (or before)."""
    good_lines = [_dumps(good(i)) for i in range(n_good)] + [_dumps(good(0))]
    lines = [b[1] for b in bad] + good_lines if bad_first else good_lines + [b[1] for b in bad]
    path.write_bytes(("\n".join(lines) + "\n").encode())
    first_bad = 1 if bad_first else len(good_lines) + 1
    return [Kind(b[0], str(path), first_bad + i, b[2], b[3] if len(b) > 3 else "same") for i, b in enumerate(bad)]


def write_corpus(folder: Path) -> tuple[list[str], list[Kind]]:
    """Write every malformed kind (>= 40) into files under `folder`; returns (input files, kinds)."""
    folder.mkdir(parents=True, exist_ok=True)
    kinds: list[Kind] = []
    kinds += _write_lines(folder / "reader.jsonl", firefly, 3, _READER_KINDS, bad_first=True)
    kinds += _write_lines(folder / "firefly.jsonl", firefly, 3, _FIREFLY_KINDS)
    kinds += _write_lines(folder / "sharegpt.jsonl", sharegpt, 3, _SHAREGPT_KINDS)
    kinds += _write_lines(folder / "openai.jsonl", openai, 3, _OPENAI_KINDS)
    kinds += _write_lines(folder / "alpaca.jsonl", alpaca, 3, _ALPACA_KINDS)
    kinds += _write_lines(folder / "prompt_completion.jsonl", prompt_completion, 3, _PROMPT_COMPLETION_KINDS)
    kinds += _write_lines(folder / "text.jsonl", text, 3, _TEXT_KINDS)
    # the good plain-text records cannot share the chat output (training takes both)
    kinds += [Kind("text_record_in_chat_output", str(folder / "text.jsonl"), line, "mixed_text_and_chat", None)
              for line in range(1, 5)]
    kinds += _write_lines(folder / "llamafactory.jsonl", llamafactory_v1, 3, [])
    kinds += _byte_kinds(folder)
    kinds += _file_kinds(folder)
    files = sorted({k.file for k in kinds} | {str(folder / "llamafactory.jsonl")}, key=_order(folder))
    return files, kinds


def _order(folder: Path):
    names = ["reader.jsonl", "bytes.jsonl", "firefly.jsonl", "sharegpt.jsonl", "openai.jsonl", "llamafactory.jsonl",
             "alpaca.jsonl", "prompt_completion.jsonl", "text.jsonl"]
    return lambda path: (names.index(Path(path).name) if Path(path).name in names else len(names), path)


def _byte_kinds(folder: Path) -> list[Kind]:
    """Bytes that are not UTF-8 JSON: a GBK line, a BOM on a line, NUL bytes, a lone continuation byte."""
    path = folder / "bytes.jsonl"
    good = [_dumps(firefly(i)).encode() for i in range(10, 13)]
    bad = [("gbk_bytes", '{"input": "你好", "target": "好"}'.encode("gbk"), "invalid_utf8"),
           ("bom_inside", b"\xef\xbb\xbf" + _dumps(firefly(20)).encode(), "bom"),
           ("nul_bytes", b'{"input": "q\x00", "target": "a"}', "invalid_json"),
           ("stray_continuation_byte", b'{"input": "q\x80", "target": "a"}', "invalid_utf8")]
    path.write_bytes(b"\n".join(good + [b[1] for b in bad]) + b"\n")
    return [Kind(name, str(path), len(good) + 1 + i, reason) for i, (name, _, reason) in enumerate(bad)]


def _file_kinds(folder: Path) -> list[Kind]:
    """Whole-file faults: compressed data cut short or corrupt, a corrupt parquet page, broken JSON arrays."""
    kinds = []
    rows = [firefly(i) for i in range(100, 400)]
    data = "".join(_dumps(r) + "\n" for r in rows).encode()
    packed = gzip.compress(data)
    truncated = folder / "truncated.jsonl.gz"
    truncated.write_bytes(packed[: len(packed) // 2])
    readable = readable_gzip_lines(truncated)
    kinds.append(Kind("truncated_gz", str(truncated), readable + 1, "unreadable"))
    bad_crc = bytearray(packed)
    bad_crc[-6] ^= 0xFF  # the CRC32 in the trailer
    (folder / "bad_crc.jsonl.gz").write_bytes(bytes(bad_crc))
    kinds.append(Kind("bad_crc_gz", str(folder / "bad_crc.jsonl.gz"), len(rows) + 1, "unreadable"))
    kinds.append(Kind("corrupt_parquet_page", *corrupt_parquet(folder / "corrupt.parquet", 300, 100, 1), "unreadable"))
    array = [sharegpt(i) for i in range(500, 506)]
    stray = folder / "stray_quote.json"
    text_ = json.dumps(array, indent=2).replace('"sa 502"', '"sa 502 is 5" tall"')
    stray.write_text(text_, encoding="utf-8")
    kinds.append(Kind("array_stray_quote", str(stray), _line_of(text_, "sa 502") - 8, "invalid_json"))
    cut = folder / "cut_array.json"
    whole = "[\n" + ",\n".join(_dumps(r) for r in array) + "\n]\n"
    cut.write_text(whole[: whole.index('"sa 504"')], encoding="utf-8")
    kinds.append(Kind("array_truncated", str(cut), 6, "invalid_json"))
    doubled = folder / "double_comma.json"
    doubled.write_text("[\n" + _dumps(array[0]) + ",\n,\n" + _dumps(array[1]) + "\n]\n", encoding="utf-8")
    kinds.append(Kind("array_double_comma", str(doubled), 3, "invalid_json"))
    trailing = folder / "trailing.json"
    trailing.write_text("[\n" + _dumps(array[0]) + "\n]\n" + _dumps(array[1]) + "\n", encoding="utf-8")
    kinds.append(Kind("data_after_array", str(trailing), 4, "invalid_json"))
    return kinds


def readable_gzip_lines(path: Path) -> int:
    """Complete lines a gzip reader gets out of a truncated file before EOFError."""
    count = 0
    with gzip.open(path, "rb") as f:
        try:
            for _ in f:
                count += 1
        except EOFError:
            pass
    return count


def _line_of(text_: str, needle: str) -> int:
    return text_[: text_.index(needle)].count("\n") + 1


def corrupt_parquet(path: Path, n_rows: int, group_rows: int, bad_group: int) -> tuple[str, int]:
    """A parquet file (snappy pages) whose row group `bad_group` has garbage in the middle of its first column's
    data: (path, 1-based number of that group's first row)."""
    rows = [{"kind": "OpenQA", "input": f"parquet question {i} " + "x" * 40, "target": f"parquet answer {i}"}
            for i in range(n_rows)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=group_rows, compression="snappy")
    column = pq.ParquetFile(path).metadata.row_group(bad_group).column(1)  # "input"
    raw = bytearray(path.read_bytes())
    middle = column.data_page_offset + column.total_compressed_size // 3
    raw[middle:middle + 40] = b"\xab" * 40
    path.write_bytes(bytes(raw))
    return str(path), bad_group * group_rows + 1
