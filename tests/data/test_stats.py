"""sft.data.stats: the length histogram draws --max_length (a token count) only on a token axis."""
import matplotlib

matplotlib.use("Agg")
from matplotlib.axes import Axes  # noqa: E402

from sft.conversation import Conversation, Message  # noqa: E402
from sft.data.stats import StatsCollector, record_features  # noqa: E402


def _plotted_lines(monkeypatch, tmp_path, tokenizer):
    drawn = []
    original = Axes.axvline
    monkeypatch.setattr(Axes, "axvline", lambda self, x, **kw: drawn.append((self, x)) or original(self, x, **kw))
    stats = StatsCollector(tokenizer, max_length=64)
    conv = Conversation([Message("user", "hello " * 30), Message("assistant", "world " * 40)])
    stats.add("OpenQA", "x.jsonl:1", record_features(conv), conv)
    stats.report({}, {})
    stats._plot(str(tmp_path / "lengths.png"))
    assert (tmp_path / "lengths.png").stat().st_size > 0
    return [(axes.get_title(), x) for axes, x in drawn]  # titles are set after the line


def test_without_a_tokenizer_no_token_limit_is_drawn_on_the_characters_axis(monkeypatch, tmp_path):
    assert _plotted_lines(monkeypatch, tmp_path, None) == []


def test_with_a_tokenizer_the_limit_is_on_the_token_axis(monkeypatch, tmp_path, qwen):
    assert _plotted_lines(monkeypatch, tmp_path, qwen) == [("tokens per conversation (ChatML estimate)", 64)]
