"""`hf_sft_eval.py serve` (sft.evaluate.serve): the real server on a free port, talked to with the official
`openai` client.

One server process for the module (a tiny random untied Qwen2 with the real Qwen2.5 tokenizer, started by the
CLI exactly as a user would); the last test stops it with SIGTERM. The tool-call test needs a model that emits a
`<tool_call>` block on cue: a "bigram" model whose layers add nothing, so each token's embedding alone picks the
next token (tests/evaluate/serve_helpers.py); it is served in-process (uvicorn in a thread) to avoid a second
start-up.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")

from sft.conversation import Conversation, Message, ToolCall  # noqa: E402
from sft.evaluate import openai_api as api  # noqa: E402
from sft.evaluate.inference import GenerationOptions, generate_answers, load_for_inference, prompt_ids  # noqa: E402
from sft.tokens.encoding import EncodeOptions, encode_conversation  # noqa: E402
from serve_helpers import free_port, serve_scripted, wait_healthy  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
KEY = "test-key"
NAME = "tiny"
NEW = 8
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": {"type": "object",
                                                          "properties": {"days": {"type": "integer"}}}}}]
SCRIPT = '<tool_call>{"name":"get_weather","arguments":{"days":3}}</tool_call>'


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        return json.loads(r.read())


def post(url: str, path: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + path, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, qwen_tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(qwen_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         tie_word_embeddings=False, initializer_range=0.5,  # wide logits: no near-ties
                         eos_token_id=qwen_tokenizer.eos_token_id, pad_token_id=qwen_tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("serve-qwen2")
    Qwen2ForCausalLM(config).save_pretrained(folder)
    qwen_tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def server(model_dir):
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("SFT_SERVE_API_KEY", None)
    proc = subprocess.Popen([sys.executable, str(REPO / "hf_sft_eval.py"), "serve", "--model", model_dir,
                             "--served_name", NAME, "--port", str(port), "--api_key", KEY, "--threads", "1",
                             "--eval_dtype", "float32",  # as `local`: auto would be bf16 on a CPU with native bf16
                             "--max_request_bytes", "20000", "--max_tokens_limit", "3000",
                             "--shutdown_seconds", "20"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(model_dir):
    """The same model loaded here: what greedy decoding of one prompt alone gives."""
    model, tokenizer = load_for_inference(model_dir)

    def answer(messages: list[dict], max_tokens: int = NEW) -> tuple[str, int]:
        conv = api.chat_conversation(api.ChatRequest(model=NAME, messages=messages), 100)
        ids = prompt_ids(conv, tokenizer)
        return generate_answers(model, tokenizer, [ids], GenerationOptions(max_new_tokens=max_tokens))[0].text, len(ids)

    return answer


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------------------- no server needed


def test_served_prompt_is_the_training_prefix(qwen_tokenizer):
    """The server's path (OpenAI messages -> Conversation -> prompt_ids) gives token for token the ids that
    training puts before the answer (sft.tokens.encoding), tools and a tool round trip included."""
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather for 3 days?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"days": 3}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": '{"sky": "clear"}'},
                {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "tomorrow?"}]}]
    conv = api.chat_conversation(api.ChatRequest(model=NAME, messages=messages, tools=TOOLS), 100)
    assert conv.system == "Be brief." and conv.tools == [TOOLS[0]["function"]]
    assert conv.messages[1].tool_calls == [ToolCall("get_weather", {"days": 3})]
    served = prompt_ids(conv, qwen_tokenizer, "qwen2.5")
    answered = Conversation([*conv.messages, Message("assistant", "Sunny.")], system=conv.system, tools=conv.tools)
    sample = encode_conversation(answered, qwen_tokenizer, EncodeOptions(template="qwen2.5", max_length=None,
                                                                         last_turn_only=True))
    first_trained = next(k for k, label in enumerate(sample.labels) if label != -100)
    assert served == sample.input_ids[:first_trained]
    text = qwen_tokenizer.decode(served)
    assert text.endswith("<|im_start|>user\nAnd tomorrow?<|im_end|>\n<|im_start|>assistant\n")
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"days": 3}}\n</tool_call>' in text


def test_tool_call_blocks_become_openai_tool_calls():
    content, calls = api.parse_tool_calls('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": '
                                          '{"days": 3}}\n</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}'
                                          '\n</tool_call>')
    assert content == "Let me look."
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("function", "get_weather", {"days": 3}), ("function", "now", {})]
    assert api.parse_tool_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    assert api.parse_tool_calls("plain") == ("plain", [])


@pytest.mark.parametrize("messages, error", [
    ([{"role": "bot", "content": "hi"}], r"messages\[0\]: unknown role 'bot'"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}], r"only allowed first"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], r"only text parts"),
    ([{"role": "user", "content": 3}], r"expected a string or a list of text parts"),
    ([{"role": "system", "content": "s"}], r"no user message"),
])
def test_bad_messages_name_the_problem(messages, error):
    with pytest.raises(api.ApiError, match=error) as caught:
        api.chat_conversation(api.ChatRequest(model=NAME, messages=messages), 100)
    assert caught.value.status == 400


def test_a_full_queue_or_a_closing_server_is_503(qwen_tokenizer):
    from sft.evaluate.generation_worker import GenerationWorker

    worker = GenerationWorker(None, qwen_tokenizer, max_queue=2)
    worker.stats.waiting = 2
    with pytest.raises(api.ApiError, match=r"2 requests are already waiting .*--max_queue") as caught:
        worker.admit()
    assert (caught.value.status, caught.value.code) == (503, "queue_full")
    worker.stats.waiting = 0
    worker.close()
    with pytest.raises(api.ApiError, match="shutting down") as caught:
        worker.admit()
    assert caught.value.status == 503


class _Loaded(Exception):
    """Raised by a fake load_for_inference: serve got as far as loading, with these arguments."""


@pytest.fixture
def serve_to_load(monkeypatch):
    """serve_main(flags) up to its load_for_inference -> (what the loader was given, torch.set_num_threads values);
    available_cpus() says 3, and a CUDA device is taken as there without touching the variables."""
    from sft.evaluate import cli, serve

    seen: dict = {}
    threads: list[int] = []

    def fake(path, **kwargs):
        seen.update(path=path, **kwargs)
        raise _Loaded

    monkeypatch.setattr(serve, "load_for_inference", fake)
    monkeypatch.setattr(serve, "_use_gpu", lambda device: None)
    monkeypatch.setattr(cli, "available_cpus", lambda: 3)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)

    def run(*flags) -> tuple[dict, list[int]]:
        seen.clear()
        threads.clear()
        with pytest.raises(_Loaded):
            serve.serve_main(["--model", "some-model", *flags])
        return dict(seen), list(threads)

    return run


@pytest.mark.parametrize("flags, gpu_bf16, dtype, reason", [
    (["--eval_dtype", "bfloat16"], None, "bfloat16", "--eval_dtype"),
    (["--device", "cuda"], True, "bfloat16", "auto: the GPU has native bf16"),
    (["--device", "cuda"], False, "float16", "auto: the GPU has no native bf16"),
    (["--device", "cuda", "--eval_dtype", "float32"], True, "float32", "--eval_dtype"),
])
def test_serve_loads_the_model_in_the_eval_dtype_asked_for(serve_to_load, monkeypatch, capsys, flags, gpu_bf16,
                                                           dtype, reason):
    # Before: serve loaded every model in fp32 (on a GPU too) and left torch's default thread count.
    asked: list = []

    def bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return gpu_bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)
    seen, threads = serve_to_load(*flags)
    device = "cuda" if "cuda" in flags else "cpu"
    assert (seen["path"], seen["dtype"], seen["device"]) == ("some-model", dtype, device)
    assert threads == [3]  # available_cpus(), not torch's default
    assert asked == ([False] if reason.startswith("auto") else [])  # native bf16 only, not emulated
    assert f"hf_sft_eval.py serve: some-model in {dtype} ({reason}) on {device}, 3 CPU thread(s)" in capsys.readouterr().err


def test_serve_auto_dtype_on_the_cpu_follows_the_cpu_flags_and_threads_follow_the_flag(serve_to_load, monkeypatch,
                                                                                       tmp_path):
    from sft.evaluate import inference

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")  # says nothing about bf16
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(inference, "CPUINFO", str(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 avx512_bf16\n")
    assert serve_to_load()[0]["dtype"] == "bfloat16"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f\n")
    assert serve_to_load("--threads", "2") == ({"path": "some-model", "base_model": None, "dtype": "float32",
                                                "device": "cpu"}, [2])


def test_serve_refuses_a_bad_eval_dtype_naming_the_flag(monkeypatch, capsys):
    import hf_sft_eval

    monkeypatch.setattr(hf_sft_eval, "hide_gpus", lambda: None)  # leave this process's CUDA variables alone
    assert hf_sft_eval.main(["serve", "--model", "unused", "--eval_dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert "hf_sft_eval.py: error: invalid configuration: --eval_dtype 'float16': expected auto, float32 or bfloat16" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------- the server


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_plain_chat_is_greedy_decoding_of_the_training_prompt(client, local):
    reply = client.chat.completions.create(model=NAME, messages=user("hello there"), max_tokens=NEW, temperature=0)
    expected, prompt_tokens = local(user("hello there"))
    assert reply.choices[0].message.content.strip() == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == prompt_tokens
    assert 1 <= reply.usage.completion_tokens <= NEW


def test_stream_gives_the_same_text_in_openai_chunks(client):
    kwargs = dict(model=NAME, messages=user("tell me a story"), max_tokens=NEW, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_and_stop_sequences(client):
    full = client.completions.create(model=NAME, prompt="The weather", max_tokens=NEW, temperature=0)
    assert full.object == "text_completion" and full.usage.prompt_tokens == 2
    text = full.choices[0].text
    stop = text[len(text) // 2:][:2]
    if stop.strip():  # cut where the stop sequence first appears, without it
        cut = client.completions.create(model=NAME, prompt="The weather", max_tokens=NEW, temperature=0, stop=[stop])
        assert cut.choices[0].text == text[:text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
        streamed = list(client.completions.create(model=NAME, prompt="The weather", max_tokens=NEW, temperature=0,
                                                  stop=[stop], stream=True))
        assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text  # the stop text is never sent
        assert streamed[-1].choices[0].finish_reason == "stop"


def test_concurrent_requests_each_equal_the_prompt_alone(client, local):
    prompts = [f"question number {k}: {'why ' * k}" for k in range(6)]
    expected = [local(user(p))[0] for p in prompts]
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda p: client.chat.completions.create(
            model=NAME, messages=user(p), max_tokens=NEW, temperature=0), prompts))
    assert [r.choices[0].message.content.strip() for r in replies] == expected


def test_auth_is_required(server):
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        bad.chat.completions.create(model=NAME, messages=user("hi"), max_tokens=2)
    status, body = post(server[0], "/v1/models", b"", key=None)
    assert status in (401, 405)  # GET-only route; a POST without a key never gets past either check
    status, body = post(server[0], "/v1/chat/completions", b"{}", key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_oversized_request_is_413(client):
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=NAME, messages=user("x " * 20000), max_tokens=2)
    assert caught.value.status_code == 413
    assert "--max_request_bytes" in str(caught.value)


@pytest.mark.parametrize("body, status, message", [
    (b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
    (b'[1, 2]', 400, "send a JSON object"),
    (b'{"model": "tiny", "messages": "hi"}', 422, "messages: Input should be a valid list"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}', 422, "max_tokens"),
    (b'{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}', 404, "'gpt-4' is not served here"),
    (b'{"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}', 400, "unknown role 'robot'"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "send n=1"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}', 400,
     "--max_tokens_limit"),
])
def test_bad_requests_get_openai_errors(server, body, status, message):
    got, reply = post(server[0], "/v1/chat/completions", body)
    assert got == status, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert message in reply["error"]["message"]


def test_context_length_is_checked(server):
    long = json.dumps({"model": NAME, "messages": user("word " * 1500), "max_tokens": 2900}).encode()
    status, reply = post(server[0], "/v1/chat/completions", long)
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"


def test_client_disconnect_stops_its_generation(client, server):
    before = health(server[0])["cancelled"]
    stream = client.chat.completions.create(model=NAME, messages=user("go on forever"), max_tokens=3000,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
    for k, _chunk in enumerate(stream):
        if k == 3:
            break
    stream.close()
    deadline = time.time() + 30
    while health(server[0])["cancelled"] == before and time.time() < deadline:
        time.sleep(0.2)
    state = health(server[0])
    assert state["cancelled"] == before + 1
    assert state["cancelled_tokens"][-1] < 3000
    reply = client.chat.completions.create(model=NAME, messages=user("still there?"), max_tokens=2, temperature=0)
    assert reply.usage.completion_tokens >= 1


def test_a_non_streamed_request_is_cancelled_when_its_client_goes(server):
    url, _ = server
    before = health(url)["cancelled"]
    body = json.dumps({"model": NAME, "messages": user("long"), "max_tokens": 3000, "temperature": 0,
                       "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.time() + 30
        while health(url)["running"] == 0 and time.time() < deadline:  # generation has started
            time.sleep(0.05)
    deadline = time.time() + 30
    while health(url)["cancelled"] == before and time.time() < deadline:
        time.sleep(0.2)
    state = health(url)
    assert state["cancelled"] == before + 1 and state["cancelled_tokens"][-1] < 3000


def test_sigterm_finishes_the_request_in_flight_then_exits(client, server, model_dir):
    """Runs last: it stops the module's server."""
    url, proc = server
    chunks: list = []
    errors: list = []

    def consume():
        try:
            for chunk in client.chat.completions.create(model=NAME, messages=user("a long answer"), max_tokens=200,
                                                        temperature=0, stream=True, extra_body={"ignore_eos": True}):
                chunks.append(chunk)
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    reader = threading.Thread(target=consume)
    reader.start()
    deadline = time.time() + 60
    while len(chunks) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    reader.join(60)
    # uvicorn shuts down gracefully, then re-raises the signal so that a supervisor sees "terminated by SIGTERM"
    assert proc.wait(60) in (0, -signal.SIGTERM)
    log = proc.stdout.read()
    assert not errors, errors
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "Application shutdown complete" in log
    assert f"hf_sft_eval.py serve: {model_dir} in float32 (--eval_dtype) on cpu, 1 CPU thread(s)" in log


# --------------------------------------------------------------------------------------- tool calls


@pytest.fixture(scope="module")
def tool_server(qwen_tokenizer):
    """A model that answers every chat with SCRIPT, served in-process on a free port."""
    with serve_scripted(qwen_tokenizer, SCRIPT, NAME) as running:
        yield openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_tool_call_comes_back_as_openai_tool_calls(tool_server):
    reply = tool_server.chat.completions.create(model=NAME, messages=user("Weather for 3 days?"), tools=TOOLS,
                                                max_tokens=30, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"days": 3}

    chunks = list(tool_server.chat.completions.create(model=NAME, messages=user("Weather?"), tools=TOOLS,
                                                      max_tokens=30, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""  # the block is not streamed as text
    (streamed,) = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert streamed.function.name == "get_weather" and json.loads(streamed.function.arguments) == {"days": 3}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    plain = tool_server.chat.completions.create(model=NAME, messages=user("Weather?"), max_tokens=30, temperature=0)
    assert plain.choices[0].message.content == SCRIPT  # without `tools` the text is returned as written


def test_shutdown_cancels_a_generation_that_outlasts_the_grace_period(qwen_tokenizer):
    """What SIGTERM does after --shutdown_seconds (uvicorn's handler sets should_exit): the request in flight is
    cancelled between tokens, the worker stops, the server thread ends."""
    running = serve_scripted(qwen_tokenizer, SCRIPT, NAME, graceful_seconds=0.2)
    with running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = client.chat.completions.create(model=NAME, messages=user("hi"), max_tokens=6000, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        worker = running.app.state.worker
        started = time.time()
        running.server.should_exit = True
        running.thread.join(30)
        assert not running.thread.is_alive() and time.time() - started < 30
        assert worker.closing and worker.stats.cancelled == 1 and worker.stats.running == 0
        assert worker.stats.cancelled_tokens[-1] < 6000
