"""`hf_sft_eval.py chat` / `batch` (sft.evaluate.chat): order, resume, errors, the chat loop, streaming.

The model is a tiny random Qwen2 with untied embeddings, saved with the real Qwen2.5 tokenizer: the
built-in tiny-qwen2 ties its embeddings and so only ever repeats "\\n", which would make every answer
empty and prove nothing about order, padding or streaming.
"""
import io
import json
import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sft.conversation import Conversation, Message
from sft.evaluate import batch as batch_cli
from sft.evaluate import chat as chat_cli
from sft.evaluate.batch import batch_main
from sft.evaluate.chat import ChatSession, chat_prompt, run_chat
from sft.evaluate.inference import (
    Generated,
    GenerationOptions,
    conversation_from_prompt,
    generate_answers,
    load_for_inference,
    prompt_ids,
)

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
NEW = 8  # max_new_tokens everywhere: enough to see text, cheap on 2 cores

PROMPTS = [
    {"prompt": "hello", "id": "a", "topic": "greeting"},
    {"prompt": "Write a much longer question about the weather in Paris in spring, please.", "reference": "Mild."},
    {"prompt": "2+2?", "system": "Be brief."},
    {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}],
     "kind": "chat"},
    {"prompt": "x y z", "id": 7},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, qwen_tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(qwen_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=False, initializer_range=0.5,  # wide logits: no near-ties
                         eos_token_id=qwen_tokenizer.eos_token_id, pad_token_id=qwen_tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("untied-qwen2")
    Qwen2ForCausalLM(config).save_pretrained(folder)
    qwen_tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def loaded(model_dir):
    torch.set_num_threads(1)
    return load_for_inference(model_dir)


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def _batch(model_dir, src: Path, out: Path, *extra) -> int:
    # float32 as `loaded`: auto would be bf16 on a CPU with native bf16, and its answers could differ
    return batch_main(["--model", model_dir, "--input", str(src), "--output", str(out), "--threads", "1",
                       "--max_new_tokens", str(NEW), "--eval_dtype", "float32", *map(str, extra)])


@pytest.fixture(scope="module")
def full_run(model_dir, loaded, tmp_path_factory):
    """(input path, uninterrupted output text) with batch_size 2: three batches, left padding in each."""
    folder = tmp_path_factory.mktemp("batch")
    src, out = _write_jsonl(folder / "prompts.jsonl", PROMPTS), folder / "answers.jsonl"
    assert _batch(model_dir, src, out, "--batch_size", 2) == 0
    return src, out.read_text(encoding="utf-8")


def _direct_answers(loaded, records: list, batch_size: int) -> list[Generated]:
    model, tokenizer = loaded
    convs = [conversation_from_prompt(r, "test")[0] for r in records]
    prompts = [prompt_ids(c, tokenizer) for c in convs]
    return generate_answers(model, tokenizer, prompts, GenerationOptions(max_new_tokens=NEW, batch_size=batch_size))


# ---------------------------------------------------------------------------------------- batch


def test_batch_writes_every_record_in_order_as_direct_generation_would(full_run, loaded, model_dir, tmp_path):
    src, text = full_run
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["id"] for r in rows] == ["a", None, None, None, 7]
    assert [r["prompt"] for r in rows] == ["hello", PROMPTS[1]["prompt"], "2+2?", "你好", "x y z"]
    assert rows[1]["reference"] == "Mild." and rows[3]["reference"] == "你好！"
    assert "reference" not in rows[0] and rows[0]["topic"] == "greeting" and rows[3]["kind"] == "chat"
    assert list(rows[0])[:6] == ["index", "id", "prompt", "answer", "num_tokens", "stopped"]
    # Greedy answers do not depend on batching or padding: the same as one prompt at a time, and as all at once.
    alone = _direct_answers(loaded, PROMPTS, batch_size=1)
    assert [(r["answer"], r["num_tokens"], r["stopped"]) for r in rows] == [(a.text, a.num_tokens, a.stopped)
                                                                            for a in alone]
    assert _direct_answers(loaded, PROMPTS, batch_size=5) == alone
    assert sum(bool(a.text) for a in alone) >= 4  # real text, not a model stuck on empty answers
    out = tmp_path / "bs1.jsonl"
    assert _batch(model_dir, src, out, "--batch_size", 1) == 0
    assert out.read_text(encoding="utf-8") == text


def test_batch_resumes_after_a_torn_write_without_redoing_lines(full_run, model_dir, loaded, tmp_path, monkeypatch,
                                                                capsys, caplog):
    src, text = full_run
    lines = text.splitlines(keepends=True)
    out = tmp_path / "answers.jsonl"
    out.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2], encoding="utf-8")
    asked: list[list[int]] = []

    def spy(model, tokenizer, prompts, options=None):
        asked.extend(prompts)
        return generate_answers(model, tokenizer, prompts, options)

    monkeypatch.setattr(batch_cli, "generate_answers", spy)
    with caplog.at_level(logging.WARNING, logger="sft.evaluate.batch"):
        assert _batch(model_dir, src, out, "--batch_size", 3) == 0  # other batches than the first run's
    assert out.read_text(encoding="utf-8") == text
    assert "the last line is incomplete" in caplog.text
    assert "3 answered, 2 skipped as already done" in capsys.readouterr().out
    expected = [prompt_ids(conversation_from_prompt(r, "t")[0], loaded[1]) for r in PROMPTS[2:]]
    assert asked == expected
    # A finished output is left alone: nothing generated, everything skipped.
    asked.clear()
    assert _batch(model_dir, src, out) == 0
    assert asked == [] and "0 answered, 5 skipped" in capsys.readouterr().out
    assert out.read_text(encoding="utf-8") == text


def test_a_last_line_without_its_newline_is_cut_off_even_when_it_parses(full_run, tmp_path):
    src, text = full_run
    lines = text.splitlines(keepends=True)
    out = tmp_path / "answers.jsonl"
    out.write_text(lines[0] + lines[1].rstrip("\n"), encoding="utf-8")  # appending would glue onto it
    assert batch_cli.finished_prefix(str(out), batch_cli.read_batch_input(str(src))) == 1
    assert out.read_text(encoding="utf-8") == lines[0]


def test_batch_refuses_an_output_of_another_input(full_run, model_dir, tmp_path):
    src, text = full_run
    lines = text.splitlines(keepends=True)
    out = tmp_path / "answers.jsonl"
    out.write_text(lines[0] + lines[1].replace("Paris", "Rome"), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"line 2 is not the answer to record 1 \({src}:2, prompt .*Delete {out} "
                                         "or pass another --output"):
        _batch(model_dir, src, out)
    out.write_text(text + lines[0], encoding="utf-8")
    with pytest.raises(ValueError, match=r"more lines \(6\) than the input has records \(5\)"):
        _batch(model_dir, src, out)


def test_bad_input_lines_are_named_by_file_and_line(tmp_path, capsys):
    import hf_sft_eval

    src = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "ok"}, "", "{not json", {"prompt": "b"}])
    with pytest.raises(ValueError, match=rf"{src}:3: not valid JSON .*expected one object a line"):
        _batch("unused", src, tmp_path / "out.jsonl")
    _write_jsonl(src, [{"prompt": "ok"}, {"question": "no known keys"}])
    with pytest.raises(ValueError, match=rf"{src}:2: not a prompt record"):
        _batch("unused", src, tmp_path / "out.jsonl")
    _write_jsonl(src, [["a list"]])
    assert hf_sft_eval.main(["batch", "--model", "unused", "--input", str(src), "--output", "o.jsonl"]) == 2
    assert f"{src}:1: a JSON list, expected an object" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- chat


def _fake_replies(monkeypatch) -> list[list[int]]:
    """Make stream_reply answer 'answer N' without a model; return the prompt ids it was given."""
    seen: list[list[int]] = []

    def fake(model, tokenizer, ids, options, out):
        seen.append(ids)
        out.write(f"answer {len(seen)}\n")
        return Generated(f"answer {len(seen)}", 3, True)

    monkeypatch.setattr(chat_cli, "stream_reply", fake)
    return seen


def test_chat_history_carries_answers_and_reset_clears_it(monkeypatch, qwen_tokenizer):
    seen = _fake_replies(monkeypatch)
    session, out, notes = ChatSession(qwen_tokenizer), io.StringIO(), io.StringIO()
    lines = ["hello", "", "and then?", "/reset", "hi again", "/system Be terse.", "last", "/exit", "never read"]
    assert run_chat(None, session, GenerationOptions(), lines, out, notes) == 0

    def ids(*msgs, system=None):
        return prompt_ids(Conversation([Message(r, t) for r, t in msgs]), qwen_tokenizer, system_prompt=system)

    assert seen == [ids(("user", "hello")),
                    ids(("user", "hello"), ("assistant", "answer 1"), ("user", "and then?")),
                    ids(("user", "hi again")),
                    ids(("user", "last"), system="Be terse.")]
    assert out.getvalue() == "answer 1\nanswer 2\nanswer 3\nanswer 4\n"  # scripted: answers only
    assert notes.getvalue() == "(history cleared)\n(system prompt set to 'Be terse.'; history cleared)\n"
    assert [m.content for m in session.history] == ["last", "answer 4"]


def test_chat_drops_the_oldest_turns_once_the_context_is_full(qwen_tokenizer, caplog):
    turns = [Message(role, f"{role} turn {i} " + "word " * 20) for i in range(3) for role in ("user", "assistant")]
    last_two = prompt_ids(Conversation([*turns[4:], Message("user", "new")]), qwen_tokenizer)
    session = ChatSession(qwen_tokenizer, max_positions=len(last_two) + 10, max_new_tokens=10, history=list(turns))
    with caplog.at_level(logging.WARNING, logger="sft.evaluate.chat"):
        assert chat_prompt(session, "new") == (last_two, 10)
        assert session.history == turns[4:] and session.dropped_turns == 2
        session.history += [Message("user", "new"), Message("assistant", "ok")]
        chat_prompt(session, "more")
    assert caplog.text.count("dropping the oldest turns") == 1  # said once
    alone = prompt_ids(Conversation([Message("user", "long " * 30)]), qwen_tokenizer)
    short_of_room = ChatSession(qwen_tokenizer, max_positions=len(alone) + 3, max_new_tokens=10)
    assert chat_prompt(short_of_room, "long " * 30) == (alone, 3)  # alone too long for 10 new tokens: fewer
    with pytest.raises(ValueError, match="that message is .* tokens .*send a shorter one"):
        chat_prompt(short_of_room, "long " * 40)


def test_chat_streams_the_greedy_answer(loaded, qwen_tokenizer):
    model, tokenizer = loaded
    session, out, notes = ChatSession(tokenizer, max_new_tokens=NEW), io.StringIO(), io.StringIO()
    run_chat(model, session, GenerationOptions(max_new_tokens=NEW), ["hello"], out, notes)
    (expected,) = _direct_answers(loaded, [{"prompt": "hello"}], batch_size=1)
    assert expected.text and out.getvalue().strip() == expected.text
    assert [m.content for m in session.history] == ["hello", expected.text]


def test_chat_through_a_pipe(model_dir, loaded):
    result = subprocess.run([sys.executable, "hf_sft_eval.py", "chat", "--model", model_dir, "--max_new_tokens",
                             str(NEW), "--threads", "1", "--eval_dtype", "float32"],
                            input="hello\n/reset\nhi again\n/exit\n", cwd=REPO,
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    first, second = (a.text for a in _direct_answers(loaded, [{"prompt": "hello"}, {"prompt": "hi again"}], 1))
    assert first in result.stdout and second in result.stdout.split(first, 1)[1]
    assert result.stdout.split() == (first + "\n" + second).split()  # scripted: the answers and nothing else
    assert "(history cleared)" in result.stderr
    assert f"hf_sft_eval.py chat: {model_dir} in float32 (--eval_dtype) on cpu, 1 CPU thread(s)" in result.stderr


def test_chat_on_a_terminal_prompts_for_input(model_dir):
    try:
        import pty

        leader, follower = pty.openpty()
    except (ImportError, OSError) as err:
        pytest.skip(f"no pseudo-terminal here: {err}")
    chat = subprocess.Popen([sys.executable, "hf_sft_eval.py", "chat", "--model", model_dir, "--max_new_tokens",
                             str(NEW), "--threads", "1"], stdin=follower, stdout=follower, stderr=follower,
                            cwd=REPO, env=ENV)
    os.close(follower)
    seen = b""

    def read_until(marker: bytes, count: int) -> None:
        nonlocal seen
        deadline = time.monotonic() + 90
        while seen.count(marker) < count and time.monotonic() < deadline:
            if select.select([leader], [], [], 1)[0]:
                try:
                    seen += os.read(leader, 4096)
                except OSError:  # the child closed the terminal
                    break
        assert seen.count(marker) >= count, seen.decode(errors="replace")

    try:
        read_until(b"User: ", 1)
        os.write(leader, b"hello\n")
        read_until(b"User: ", 2)
        os.write(leader, b"/exit\n")
        assert chat.wait(timeout=30) == 0
    finally:
        chat.kill()
        os.close(leader)
    assert b"/reset clears the history" in seen and b"Assistant: " in seen


@pytest.mark.parametrize("stdin", ["empty", "closed"])
def test_chat_with_no_input_ends_cleanly_and_says_why(model_dir, stdin):
    # `</dev/null` ran to exit 0 in silence; `<&-` (no stdin at all) was an AttributeError traceback.
    command = [sys.executable, "hf_sft_eval.py", "chat", "--model", model_dir, "--threads", "1"]
    if stdin == "empty":
        result = subprocess.run(command, stdin=subprocess.DEVNULL, cwd=REPO, env=ENV, capture_output=True,
                                text=True, timeout=120)
    else:
        result = subprocess.run(["bash", "-c", 'exec "$@" <&-', "chat", *command], cwd=REPO, env=ENV,
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no input on stdin (it is empty or closed): nothing to answer" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_batch_refuses_to_resume_with_other_generation_settings(full_run, model_dir, tmp_path, capsys):
    # Before: a resume with another --max_new_tokens appended answers of other settings to the same file.
    src, text = full_run
    first_two = "".join(text.splitlines(keepends=True)[:2])
    out = tmp_path / "answers.jsonl"
    out.write_text(first_two, encoding="utf-8")
    settings = tmp_path / "answers.jsonl.settings.json"
    settings.write_text(json.dumps(batch_cli.batch_settings(
        batch_cli.ModelChoice(model=model_dir), GenerationOptions(max_new_tokens=NEW))), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"--output {out} was made with other settings, so resuming would mix "
                                         rf"answers: --max_new_tokens 4 \(the output was made with {NEW}\)\. Rerun "
                                         rf"with the settings it was made with \(they are in {settings}\), or pass "
                                         "a new --output"):
        batch_main(["--model", model_dir, "--input", str(src), "--output", str(out), "--threads", "1",
                    "--max_new_tokens", "4", "--eval_dtype", "float32"])
    with pytest.raises(ValueError, match=r"--do_sample true \(the output was made with false\); --seed 0 \(the "
                                         r"output was made with \(not set\)\); --temperature 0\.7 .*--top_p 0\.9"):
        _batch(model_dir, src, out, "--do_sample")
    assert out.read_text(encoding="utf-8") == first_two  # nothing appended
    # The same settings (another batch size, the model folder spelled differently) resume it.
    assert batch_main(["--model", model_dir + "/", "--input", str(src), "--output", str(out), "--threads", "1",
                       "--max_new_tokens", str(NEW), "--batch_size", "3", "--eval_dtype", "float32"]) == 0
    assert out.read_text(encoding="utf-8") == text
    assert "3 answered, 2 skipped" in capsys.readouterr().out


def test_a_new_batch_output_records_its_settings(full_run, model_dir, tmp_path):
    src, _ = full_run
    out = tmp_path / "sub" / "answers.jsonl"
    assert _batch(model_dir, src, out, "--batch_size", 5) == 0
    stored = json.loads((tmp_path / "sub" / "answers.jsonl.settings.json").read_text())
    assert stored == {"model": os.path.realpath(model_dir), "base_model": None, "eval_dtype": "float32",
                      "template": "auto",
                      "system_prompt": None, "max_new_tokens": NEW, "do_sample": False}


# ----------------------------------------------------------------------------- dtype and threads
# Before: chat and batch loaded every model in fp32 and left torch's default thread count.


class _Loaded(Exception):
    """Raised by a fake load_for_inference: the command got as far as loading, with these arguments."""


def _stop_at_load(monkeypatch, module) -> dict:
    """Make `module`'s load_for_inference record its arguments and stop the command there."""
    seen: dict = {}

    def fake(path, **kwargs):
        seen.update(path=path, **kwargs)
        raise _Loaded

    monkeypatch.setattr(module, "load_for_inference", fake)
    return seen


def _record_threads(monkeypatch, cpus: int) -> list[int]:
    """available_cpus() says `cpus`; return the list of values torch.set_num_threads gets (and is not applied)."""
    from sft.evaluate import cli

    monkeypatch.setattr(cli, "available_cpus", lambda: cpus)
    threads: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    return threads


def _run_to_load(command: str, monkeypatch, tmp_path, *flags) -> dict:
    """Run chat or batch until it loads its model; return what load_for_inference was given."""
    if command == "chat":
        monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # readable: chat goes on to load the model
        seen = _stop_at_load(monkeypatch, chat_cli)
        with pytest.raises(_Loaded):
            chat_cli.chat_main(["--model", "some-model", *flags])
    else:
        src = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
        seen = _stop_at_load(monkeypatch, batch_cli)
        with pytest.raises(_Loaded):
            batch_main(["--model", "some-model", "--input", str(src), "--output", str(tmp_path / "out.jsonl"), *flags])
    return seen


@pytest.mark.parametrize("command", ["chat", "batch"])
def test_the_model_is_loaded_in_the_eval_dtype_asked_for(command, monkeypatch, tmp_path, capsys):
    _record_threads(monkeypatch, 1)
    seen = _run_to_load(command, monkeypatch, tmp_path, "--eval_dtype", "bfloat16")
    assert seen["path"] == "some-model" and seen["dtype"] == "bfloat16"
    assert (f"hf_sft_eval.py {command}: some-model in bfloat16 (--eval_dtype) on cpu, 1 CPU thread(s)"
            in capsys.readouterr().err)


@pytest.mark.parametrize("command", ["chat", "batch"])
@pytest.mark.parametrize("flags, dtype, reason", [
    ("fpu sse2 avx2 avx512f avx512_bf16", "bfloat16", "auto: the CPU has native bf16 (AVX512_BF16)"),
    ("fpu sse2 avx2 avx512f", "float32", "auto: the CPU has no native bf16 (it would be emulated, slower than fp32)"),
])
def test_auto_eval_dtype_follows_the_cpu_flags(command, flags, dtype, reason, monkeypatch, tmp_path, capsys):
    from sft.evaluate import inference

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")  # says nothing about bf16
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(inference, "CPUINFO", str(cpuinfo))
    _record_threads(monkeypatch, 1)
    assert _run_to_load(command, monkeypatch, tmp_path)["dtype"] == dtype  # no --eval_dtype: auto
    assert f"some-model in {dtype} ({reason})" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["chat", "batch"])
def test_threads_default_to_the_usable_cpus(command, monkeypatch, tmp_path):
    threads = _record_threads(monkeypatch, 3)
    _run_to_load(command, monkeypatch, tmp_path, "--eval_dtype", "float32")
    assert threads == [3]  # available_cpus(), not torch's default
    threads.clear()
    _run_to_load(command, monkeypatch, tmp_path, "--eval_dtype", "float32", "--threads", "2")
    assert threads == [2]


@pytest.mark.parametrize("command", ["chat", "batch"])
def test_a_bad_eval_dtype_is_a_clear_error(command, tmp_path, capsys, monkeypatch):
    import hf_sft_eval

    monkeypatch.setattr(hf_sft_eval, "hide_gpus", lambda: None)  # leave this process's CUDA variables alone
    flags = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl")] if command == "batch" else []
    assert hf_sft_eval.main([command, "--model", "unused", *flags, "--eval_dtype", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "hf_sft_eval.py: error: invalid configuration: --eval_dtype 'fp16': expected auto, float32 or bfloat16" in err
    assert "Traceback" not in err


def test_batch_answers_with_a_bf16_model_and_records_the_dtype(model_dir, tmp_path, monkeypatch, capsys):
    dtypes: list[torch.dtype] = []

    def spy(*args, **kwargs):
        model, tokenizer = load_for_inference(*args, **kwargs)
        dtypes.append(next(model.parameters()).dtype)
        return model, tokenizer

    monkeypatch.setattr(batch_cli, "load_for_inference", spy)
    src, out = _write_jsonl(tmp_path / "in.jsonl", PROMPTS[:2]), tmp_path / "answers.jsonl"
    assert _batch(model_dir, src, out, "--eval_dtype", "bfloat16") == 0  # the last --eval_dtype wins
    assert dtypes == [torch.bfloat16]
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2
    settings = tmp_path / "answers.jsonl.settings.json"
    assert json.loads(settings.read_text())["eval_dtype"] == "bfloat16"
    assert "in bfloat16 (--eval_dtype)" in capsys.readouterr().err
    out.write_text(out.read_text(encoding="utf-8").splitlines(keepends=True)[0], encoding="utf-8")
    with pytest.raises(ValueError, match=r"--eval_dtype \"float32\" \(the output was made with \"bfloat16\"\)"):
        _batch(model_dir, src, out)  # fp32 answers would be mixed into bf16 ones
    # A settings file from before --eval_dtype was recorded: its answers were made in fp32.
    stored = json.loads(settings.read_text())
    del stored["eval_dtype"]
    settings.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=r"--eval_dtype \"bfloat16\" \(the output was made with \"float32\"\)"):
        _batch(model_dir, src, out, "--eval_dtype", "bfloat16")
    assert _batch(model_dir, src, out) == 0
    assert dtypes[-1] == torch.float32 and "1 answered, 1 skipped" in capsys.readouterr().out
    settings.write_text("[1, 2]")  # valid JSON, but not the settings object: a clear error, not an AttributeError
    with pytest.raises(ValueError, match=r"settings\.json: expected a JSON object of settings, found list; .*"
                                         r"Delete both files to start afresh"):
        _batch(model_dir, src, out)
