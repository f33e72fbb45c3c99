"""The data builder end to end, through `main([...])` of sft_data_builder.py (in-process, offline)."""
import json
import os
import random
import sys
from collections import Counter

import pytest

import sft.data.builder as builder
import sft_data_builder
from sft.data.builder import BuildOptions, build

DATA = os.path.join(os.path.dirname(__file__), "fixtures")
MALFORMED = os.path.join(DATA, "malformed_sharegpt.jsonl")
sys.path.insert(0, DATA)
from make_fixtures import EXPECTED  # noqa: E402  (line -> "good" / "blank" / "duplicate" / reject reason)


def run(args, capsys=None):
    code = sft_data_builder.main([str(a) for a in args])
    out = capsys.readouterr() if capsys else None
    return code, out


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def summary_counts(stdout):
    line = stdout.strip().splitlines()[-1]
    return {k: int(v) for k, v in (field.split("=") for field in line.split())}


def firefly_rows(n, kinds=("Couplet", "OpenQA", "Translation", "NER"), seed=0):
    rng = random.Random(seed)
    return [{"kind": kinds[i % len(kinds)] if i % 7 else kinds[0], "input": f"问题{i}：" + "字" * rng.randint(1, 30),
             "target": f"回答{i}：" + "文" * rng.randint(1, 60)} for i in range(n)]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_malformed_corpus_each_record_accounted_for(tmp_path, capsys, workers):
    out = tmp_path / "x.jsonl"
    code, cap = run([MALFORMED, "--output", out, "--max_chars", 500, "--workers", workers], capsys)
    assert code == 0, cap.err
    rejects = read_jsonl(tmp_path / "x.rejects.jsonl")
    assert {r["line"]: r["reason"] for r in rejects} == {
        line: tag for line, tag in EXPECTED.items() if tag not in ("good", "blank", "duplicate")}
    assert len(set(EXPECTED.values()) - {"good", "blank", "duplicate"}) >= 17  # 30 kinds of damage, 17 reasons
    assert all(r["source"] == MALFORMED and r["error"] and r["raw"] for r in rejects)
    assert rejects[0]["raw"] == '{"conversations": [{"from": "human", "value": "hi"}'  # raw text as read
    dups = read_jsonl(tmp_path / "x.duplicates.jsonl")
    assert [(d["line"], d["original_line"], d["type"]) for d in dups] == [(37, 1, "exact"), (38, 1, "exact")]
    assert dups[1]["record"]["kind"] == "other"  # the duplicate's own record, as read
    written = read_jsonl(out)
    assert len(written) == sum(t == "good" for t in EXPECTED.values())
    c = summary_counts(cap.out)
    assert c["read"] == len(EXPECTED) - 1  # the blank line is not a record
    assert c["read"] == c["written"] + c["rejected"] + c["duplicates"]
    assert (c["written"], c["rejected"], c["duplicates"]) == (len(written), len(rejects), len(dups))


def test_parallel_and_in_process_builds_are_identical(tmp_path):
    rows = firefly_rows(3000) + firefly_rows(200, seed=0)  # the second batch repeats the first 200 rows
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    for w in (1, 3):
        assert run([src, "--output", tmp_path / f"w{w}.json", "--workers", w, "--stats", "--val_ratio", 0.1])[0] == 0
    for suffix in (".json", ".val.json", ".duplicates.jsonl", ".rejects.jsonl"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w3{suffix}").read_bytes(), suffix
    s1, s3 = (json.loads((tmp_path / f"w{w}.stats.json").read_text()) for w in (1, 3))
    assert s1 == s3 and s1["counts"]["duplicates"] == 200


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_outputs_load_with_json_and_datasets(tmp_path, suffix):
    import datasets

    out = tmp_path / f"x{suffix}"
    code, _ = run([MALFORMED, "--output", out, "--max_chars", 500, "--val_size", 2])
    assert code == 0
    val = tmp_path / f"x.val{suffix}"
    if suffix == ".json":
        assert isinstance(json.load(open(out, encoding="utf-8")), list)
        assert len(json.load(open(val, encoding="utf-8"))) == 2
    # one load per file: records carry only the keys they have (system, tools, train flags, meta), so
    # two files can infer different schemas
    train = datasets.load_dataset("json", data_files=str(out), cache_dir=str(tmp_path / "c1"), split="train")
    valid = datasets.load_dataset("json", data_files=str(val), cache_dir=str(tmp_path / "c2"), split="train")
    assert train.num_rows == 5 and valid.num_rows == 2
    assert train[0]["conversations"][0]["from"] == "human"


def test_empty_result_is_a_valid_json_array(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"input": "", "target": "x"}\n', encoding="utf-8")
    assert run([src, "--output", tmp_path / "x.json"])[0] == 0
    assert json.load(open(tmp_path / "x.json")) == []


def test_exact_and_near_duplicates_are_found_and_written(tmp_path, capsys):
    base = "长城是中国古代的军事防御工程，东起山海关，西至嘉峪关，全长两万多公里，是世界文化遗产之一。"
    rows = [{"kind": "OpenQA", "input": "介绍长城", "target": base},
            {"kind": "OpenQA", "input": "介绍长城", "target": base},  # exact
            {"kind": "OpenQA", "input": "介绍长城 ", "target": base.replace("两万多", "两万余")},  # near
            {"kind": "OpenQA", "input": "介绍黄河", "target": "黄河是中国第二长河，发源于青海省巴颜喀拉山脉，流经九个省区，最后注入渤海。"}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    code, cap = run([src, "--output", tmp_path / "near.jsonl", "--dedup", "near", "--near_threshold", 0.7], capsys)
    assert code == 0
    dups = read_jsonl(tmp_path / "near.duplicates.jsonl")
    assert [(d["line"], d["type"], d["original_line"]) for d in dups] == [(2, "exact", 1), (3, "near", 1)]
    assert summary_counts(cap.out)["written"] == 2
    code, cap = run([src, "--output", tmp_path / "exact.jsonl"], capsys)
    assert summary_counts(cap.out)["duplicates"] == 1
    code, cap = run([src, "--output", tmp_path / "none.jsonl", "--dedup", "none"], capsys)
    assert summary_counts(cap.out)["written"] == 4 and not (tmp_path / "none.duplicates.jsonl").exists()


def test_split_is_stratified_and_reproducible(tmp_path):
    rows = firefly_rows(700)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    kinds = Counter(r["kind"] for r in rows)

    def split(name, *extra):
        assert run([src, "--output", tmp_path / f"{name}.jsonl", *extra])[0] == 0
        return read_jsonl(tmp_path / f"{name}.jsonl"), read_jsonl(tmp_path / f"{name}.val.jsonl")

    train, val = split("a", "--val_ratio", 0.1, "--seed", 1)
    assert len(train) + len(val) == 700
    val_kinds = Counter(r["kind"] for r in val)
    for kind, n in kinds.items():
        assert abs(val_kinds[kind] - 0.1 * n) < 1, (kind, val_kinds[kind], n)
    assert split("b", "--val_ratio", 0.1, "--seed", 1) == (train, val)
    assert split("c", "--val_ratio", 0.1, "--seed", 2)[1] != val
    train, val = split("d", "--val_size", 50, "--seed", 1)
    assert len(val) == 50 and len(train) == 650
    val_kinds = Counter(r["kind"] for r in val)
    for kind, n in kinds.items():
        assert abs(val_kinds[kind] - 50 * n / 700) <= 1
    assert split("e", "--val_size", 50, "--seed", 1) == (train, val)


def test_val_size_too_big_is_a_user_error(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", firefly_rows(5))
    code, cap = run([src, "--output", tmp_path / "x.jsonl", "--val_size", 5], capsys)
    assert code == 2 and "--val_size 5" in cap.err and not (tmp_path / "x.jsonl").exists()


def test_strict_stops_at_first_bad_record(tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    code, cap = run([MALFORMED, "--output", out, "--strict"], capsys)
    assert code == 1
    assert f"{MALFORMED}:2: invalid_json" in cap.err and "Traceback" not in cap.err
    assert os.listdir(tmp_path) == []


def test_keyboard_interrupt_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    out = tmp_path / "x.json"
    out.write_text("previous run\n")
    calls = {"n": 0}
    real = builder.record_outcome

    def interrupt_later(*a, **k):
        calls["n"] += 1
        if calls["n"] == 100:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(builder, "record_outcome", interrupt_later)
    src = write_jsonl(tmp_path / "in.jsonl", firefly_rows(300))
    code, cap = run([src, "--output", out, "--workers", 1, "--stats", "--val_ratio", 0.1], capsys)
    assert code == 130 and "interrupted" in cap.err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "x.json"] and out.read_text() == "previous run\n"


def test_interrupt_with_worker_processes_and_mixing_cleans_up(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", firefly_rows(3000))
    general = write_jsonl(tmp_path / "general.jsonl", firefly_rows(500, kinds=("General",), seed=5))

    real = builder.ExactDeduper.check_hash

    def interrupt_midway(self, h, loc):
        if loc & 0xFFFF == 1500:  # line 1500 of the scenario file: workers busy, mix spool half written
            raise KeyboardInterrupt
        return real(self, h, loc)

    monkeypatch.setattr(builder.ExactDeduper, "check_hash", interrupt_midway)
    code, _ = run([src, "--output", tmp_path / "x.jsonl", "--workers", 2, "--mix", f"{general}:0.1"])
    assert code == 130
    assert sorted(os.listdir(tmp_path)) == ["general.jsonl", "in.jsonl"]


def test_an_exception_also_leaves_no_output(tmp_path, monkeypatch):
    monkeypatch.setattr(builder.StatsCollector, "write", lambda *a: 1 / 0)
    src = write_jsonl(tmp_path / "in.jsonl", firefly_rows(10))
    with pytest.raises(ZeroDivisionError):
        build(BuildOptions(inputs=[str(src)], output=str(tmp_path / "x.jsonl"), stats=True, workers=1))
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_mix_reaches_the_exact_ratio(tmp_path, capsys):
    src = write_jsonl(tmp_path / "scenario.jsonl", firefly_rows(800))
    general = write_jsonl(tmp_path / "general.jsonl", firefly_rows(1000, kinds=("General",), seed=9))
    code, cap = run([src, "--output", tmp_path / "x.jsonl", "--mix", f"{general}:0.2", "--stats"], capsys)
    assert code == 0
    rows = read_jsonl(tmp_path / "x.jsonl")
    assert len(rows) == 1000 and sum(r["kind"] == "General" for r in rows) == 200
    assert rows[:5] != read_jsonl(src)[:5]  # interleaved, not appended
    assert "general.jsonl: 200 records = 20.00% of the output (requested 20.00%)" in cap.err
    c = summary_counts(cap.out)
    assert c["mixed"] == 200 and c["read"] == c["written"] + c["rejected"] + c["duplicates"] == 1000
    mix = json.loads((tmp_path / "x.stats.json").read_text())["mix"]
    assert mix == [{"file": str(general), "requested_share": 0.2, "target": 200, "written": 200, "read": 200,
                    "repeated": 0, "achieved_share": 0.2}]


def test_mix_too_small_warns_with_both_shares_and_reports_a_table(tmp_path, capsys):
    src = write_jsonl(tmp_path / "scenario.jsonl", firefly_rows(800))
    general = write_jsonl(tmp_path / "general.jsonl", firefly_rows(50, kinds=("General",), seed=9))
    code, cap = run([src, "--output", tmp_path / "x.jsonl", "--mix", f"{general}:0.2", "--stats"], capsys)
    assert code == 0
    assert (f"warning: --mix {general}: only 50 usable records for the 200 needed: 5.88% of the output (requested "
            "20.00%); add records, lower the share, or pass --mix_oversample to repeat them up to it") in cap.err
    assert summary_counts(cap.out) == {"read": 850, "written": 850, "rejected": 0, "duplicates": 0, "train": 850,
                                       "val": 0, "mixed": 50}
    md = (tmp_path / "x.stats.md").read_text()
    assert ("| file | requested share | achieved share | needed | usable records | repeated | read | |\n"
            "|---|---:|---:|---:|---:|---:|---:|---|\n"
            f"| {general} | 20.00% | 5.88% | 200 | 50 | 0 | 50 | **short of its share** |") in md
    assert "```" not in md  # no raw JSON block any more


def test_mix_oversample_repeats_the_small_set_up_to_its_share_and_counts_the_repeats(tmp_path, capsys):
    src = write_jsonl(tmp_path / "scenario.jsonl", firefly_rows(800))
    general = write_jsonl(tmp_path / "general.jsonl", firefly_rows(70, kinds=("General",), seed=9))
    code, cap = run([src, "--output", tmp_path / "x.jsonl", "--mix", f"{general}:0.2", "--mix_oversample",
                     "--stats"], capsys)
    assert code == 0
    c = summary_counts(cap.out)
    assert c == {"read": 870, "written": 1000, "rejected": 0, "duplicates": 0, "train": 1000, "val": 0,
                 "mixed": 200, "repeated": 130}
    assert c["read"] + c["repeated"] == c["written"] + c["rejected"] + c["duplicates"]
    assert (f"mix: {general}: 70 records + 130 repeats = 20.00% of the output (requested 20.00%); "
            "--mix_oversample repeated the 70 usable records to reach the share") in cap.err
    rows = read_jsonl(tmp_path / "x.jsonl")
    times = Counter(r["conversations"][0]["value"] for r in rows if r["kind"] == "General")
    # 130 = one whole extra pass (70) + 60 chosen at random: 60 records three times, 10 twice, none dropped
    assert len(times) == 70 and sorted(Counter(times.values()).items()) == [(2, 10), (3, 60)]
    general_at = [i for i, r in enumerate(rows) if r["kind"] == "General"]
    assert general_at[-1] > 900 and general_at[0] < 100  # repeats spread over the output, not appended
    assert read_jsonl(tmp_path / "x.duplicates.jsonl") == []  # repeats are not input duplicates
    mix = json.loads((tmp_path / "x.stats.json").read_text())["mix"]
    assert mix == [{"file": str(general), "requested_share": 0.2, "target": 200, "written": 70, "read": 70,
                    "repeated": 130, "achieved_share": 0.2}]
    assert f"| {general} | 20.00% | 20.00% | 200 | 70 | 130 | 70 | repeated up to its share |" in \
        (tmp_path / "x.stats.md").read_text()


def test_limit_and_exact_shuffle(tmp_path, capsys):
    rows = firefly_rows(500)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    code, cap = run([src, "--output", tmp_path / "head.jsonl", "--limit", 50], capsys)
    assert summary_counts(cap.out)["read"] == 50
    assert [r["conversations"][0]["value"] for r in read_jsonl(tmp_path / "head.jsonl")] == \
        [r["input"] for r in rows[:50]]
    run([src, "--output", tmp_path / "s1.jsonl", "--shuffle", "--seed", 3, "--limit", 100])
    run([src, "--output", tmp_path / "s2.jsonl", "--shuffle", "--seed", 3, "--limit", 100])
    s1 = read_jsonl(tmp_path / "s1.jsonl")
    assert s1 == read_jsonl(tmp_path / "s2.jsonl") and len(s1) == 100
    lines = [int(r["conversations"][0]["value"][2:].split("：")[0]) for r in s1]
    assert lines != sorted(lines) and max(lines) > 300  # a sample of the whole file, not its head
    run([src, "--output", tmp_path / "all.jsonl", "--shuffle"])
    shuffled = [r["conversations"][0]["value"] for r in read_jsonl(tmp_path / "all.jsonl")]
    assert sorted(shuffled) == sorted(r["input"] for r in rows) and shuffled != [r["input"] for r in rows]


def test_buffer_shuffle_for_json_arrays(tmp_path, capsys):
    src = tmp_path / "in.json"
    src.write_text(json.dumps(firefly_rows(300), ensure_ascii=False), encoding="utf-8")
    code, cap = run([src, "--output", tmp_path / "x.jsonl", "--shuffle", "--shuffle_buffer", 50], capsys)
    assert code == 0 and "approximate" in cap.err
    got = [r["conversations"][0]["value"] for r in read_jsonl(tmp_path / "x.jsonl")]
    assert sorted(got) == sorted(r["input"] for r in firefly_rows(300)) and got != [r["input"] for r in firefly_rows(300)]


def test_stats_report_with_noisy_flags_and_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    rows = [{"kind": "OpenQA", "input": "什么是AI？", "target": "人工智能。"},
            {"kind": "OpenQA", "input": "复读", "target": "复读"},
            {"kind": "Couplet", "input": "上联", "target": "。。。"},
            {"kind": "Couplet", "input": "重复", "target": "哈" * 25},
            {"kind": "Program", "input": "写代码", "target": "print((1)"},
            {"kind": "Program", "input": "长", "target": "长文" * 30}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    result = build(BuildOptions(inputs=[str(src)], output=str(tmp_path / "x.jsonl"), stats=True,
                                tokenizer=tokenizer, max_length=50))
    report = json.loads((tmp_path / "x.stats.json").read_text())
    assert report["counts"] == {"read": 6, "written": 6, "rejected": 0, "duplicates": 0, "train": 6, "val": 0}
    assert report["kinds"] == {"OpenQA": 2, "Couplet": 2, "Program": 2}
    flags = {k: v["examples"] for k, v in report["noisy_answers"].items()}
    assert flags == {"empty_answer": [f"{src}:3"], "answer_equals_question": [f"{src}:2"],
                     "repeated_char_run": [f"{src}:4"], "unbalanced_brackets": [f"{src}:5"], "duplicate_keys": []}
    # tokens = characters + newline joiner + 5 per message + 5 for the system block
    assert report["tokens"]["max"] == 1 + 1 + 1 + 60 + 15
    assert report["over_max_length"] == {"max_length": 50, "unit": "tokens", "count": 1, "share": round(1 / 6, 6)}
    assert report["chars"]["answer"]["max"] == 60 and report["turns"]["messages_per_conversation"] == {"2": 6}
    md = (tmp_path / "x.stats.md").read_text()
    assert "| OpenQA | 2 |" in md and "x.stats.png" in md
    assert (tmp_path / "x.stats.png").read_bytes()[:4] == b"\x89PNG"
    assert result.paths["stats_png"].endswith("x.stats.png")


def test_plain_text_output_and_mixed_text_rejected(tmp_path, capsys):
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "第一段。"}, {"text": "第二段。"}])
    chat = write_jsonl(tmp_path / "chat.jsonl", firefly_rows(1))
    code, cap = run([text, chat, "--output", tmp_path / "x.jsonl"], capsys)
    assert code == 0
    assert read_jsonl(tmp_path / "x.jsonl") == [{"text": "第一段。"}, {"text": "第二段。"}]
    assert [r["reason"] for r in read_jsonl(tmp_path / "x.rejects.jsonl")] == ["mixed_text_and_chat"]


def test_separate_bad_files(tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    files = [os.path.join(DATA, n) for n in ("bom.jsonl", "gbk.jsonl", "truncated.json")]
    code, cap = run([*files, "--output", out], capsys)
    assert code == 0
    got = [(os.path.basename(r["source"]), r["line"], r["reason"]) for r in read_jsonl(tmp_path / "x.rejects.jsonl")]
    assert got == [("bom.jsonl", 1, "bom"), ("gbk.jsonl", 2, "invalid_utf8"), ("truncated.json", 5, "invalid_json")]
    assert summary_counts(cap.out) == {"read": 7, "written": 4, "rejected": 3, "duplicates": 0, "train": 4, "val": 0}


@pytest.mark.parametrize("args, message", [
    (["missing.jsonl", "--output", "x.jsonl"], "missing.jsonl: no such file"),
    (["{src}", "--output", "x.txt"], "must end with .json"),
    (["{src}", "--output", "x.jsonl", "--val_ratio", "1.5"], "--val_ratio 1.5"),
    (["{src}", "--output", "x.jsonl", "--mix", "general.jsonl"], "expected FILE:SHARE"),
    (["{src}", "--output", "{src}"], "is the same file as the input"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    src = write_jsonl(tmp_path / "in.jsonl", firefly_rows(3))
    code, cap = run([a.replace("{src}", str(src)) for a in args], capsys)
    assert code == 2
    assert message in cap.err and len(cap.err.strip().splitlines()) == 1 and "Traceback" not in cap.err


def test_token_stats_with_the_builtin_tokenizer_by_name(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"kind": "OpenQA", "input": "Hello", "target": "Hello Hello"}])
    code, cap = run([src, "--output", tmp_path / "x.jsonl", "--stats", "--tokenizer", "qwen2.5"], capsys)
    assert code == 0, cap.err
    report = json.loads((tmp_path / "x.stats.json").read_text())
    # "\nHello\nHello Hello": "\n", "Hello", "\n", "Hello", " Hello" = 5 tokens, + 5 per message + 5 system
    assert report["tokens"]["max"] == 5 + 15 and report["over_max_length"]["unit"] == "tokens"


def test_yaml_config_gives_defaults_and_flags_and_inputs_override_it(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", firefly_rows(6))
    other = write_jsonl(tmp_path / "other.jsonl", firefly_rows(3))
    config = tmp_path / "build.yaml"
    config.write_text(f"inputs: [{other}]\noutput: {tmp_path / 'from_yaml.jsonl'}\nval_size: 2\ndedup: none\n")
    code, cap = run([src, "--config", config, "--val_size", 1], capsys)
    assert code == 0, cap.err
    assert summary_counts(cap.out)["read"] == 6 and summary_counts(cap.out)["val"] == 1  # positional beat the YAML
    code, cap = run(["--config", config, "--inputs", src, "--", other], capsys)
    assert code == 0, cap.err
    assert summary_counts(cap.out)["read"] == 9  # --inputs and positionals together


@pytest.mark.parametrize("args, message", [
    (["{src}", "--output", "x.jsonl", "--dedupe", "near"], "unknown argument '--dedupe' (did you mean --dedup"),
    (["{src}", "--output", "x.jsonl", "--val_ratio", "half"], "argument --val_ratio/--val-ratio: invalid float"),
    (["{src}"], "missing required argument --output"),
    # a misspelled required flag is named as itself, not reported as the missing --output
    (["{src}", "--outptu", "x.jsonl"], "unknown argument '--outptu' (did you mean --output"),
])
def test_flag_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    src = write_jsonl(tmp_path / "in.jsonl", firefly_rows(3))
    code, cap = run([a.replace("{src}", str(src)) for a in args], capsys)
    assert code == 2 and message in cap.err and len(cap.err.strip().splitlines()) == 1


def test_unknown_yaml_key_names_the_file(tmp_path, capsys):
    config = tmp_path / "build.yaml"
    config.write_text("outptu: x.jsonl\n")
    code, cap = run(["--config", config], capsys)
    assert code == 2 and f"--config {config}: unknown key 'outptu' (did you mean output" in cap.err


def test_help_lists_each_flag_with_its_default_once(capsys):
    code, cap = run(["--help"], capsys)
    text = " ".join(cap.out.split())
    assert code == 0 and "(default: None)" not in text
    for flag in ("--output", "--mix FILE:SHARE", "--val_ratio", "--dedup", "--config", "INPUT"):
        assert flag in text
    assert "Rejects file (default: <output stem>.rejects.jsonl)." in text
    assert "Duplicate removal: exact|near|none. (default: exact)" in text
