"""Helpers for the tests that need a server: a free port, a "scripted" model, an in-process server.

A scripted model says the same text after any chat prompt: its layers add nothing (zero output projections),
so the hidden state is the current token's embedding, and lm_head maps that token to the next one of the
script (a bigram chain: the script's tokens must be distinct). The chain starts at "\\n", the last token of
every chat prompt ("<|im_start|>assistant\\n"), and ends with eos.
"""
import socket
import threading
import time
import urllib.request

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc=None, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not come up in {timeout}s")


def scripted_model(tokenizer, script: str):
    """A tiny Qwen2 whose greedy answer to every chat prompt is `script` (then eos)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    chain = [tokenizer.encode("\n")[0], *tokenizer.encode(script), tokenizer.eos_token_id]
    if len(set(chain[:-1])) != len(chain) - 1:
        raise ValueError(f"{script!r}: a bigram script needs distinct tokens")
    width = len(chain) + len(chain) % 2  # RoPE needs an even head size
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=8,
                         num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                         head_dim=width, max_position_embeddings=8192, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        layer = model.model.layers[0]
        for norm in (model.model.norm, layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.fill_(1.0)
        for slot, (token, following) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[token, slot] = 1.0
            model.lm_head.weight[following, slot] = 5.0
    return model


class ThreadServer:
    """uvicorn serving `app` on a free port in a daemon thread (a real HTTP server, without a new process)."""

    def __init__(self, app, graceful_seconds: float | None = None):
        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # log_config=None as in serve_main: uvicorn's dictConfig would close every existing logging handler, and
        # a handler that closes its stream on close (absl's, from rouge_score) would close pytest's capture file.
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=graceful_seconds, log_config=None))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        wait_healthy(self.url, timeout=30)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve_scripted(tokenizer, script: str, name: str = "tiny", graceful_seconds: float | None = None) -> ThreadServer:
    from sft.evaluate.options import ServeOptions
    from sft.evaluate.serve import ServedModel, create_app

    model = scripted_model(tokenizer, script)
    return ThreadServer(create_app(ServedModel(name, model, tokenizer, template="qwen2.5", max_context=8192),
                                   ServeOptions(max_tokens_limit=8000)), graceful_seconds)
