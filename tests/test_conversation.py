"""sft.conversation: the one list of reject reason codes, and RecordError refusing codes outside it."""
import re
from pathlib import Path

import pytest

from sft.conversation import REASONS, RecordError

SFT = Path(__file__).resolve().parents[1] / "sft"


def test_a_reason_outside_the_list_is_a_bug_not_a_bad_record():
    assert str(RecordError("bom", "x", "a.jsonl", 3)) == "a.jsonl:3: bom: x"
    with pytest.raises(RuntimeError, match="'not_object' is not in sft.conversation.REASONS"):
        RecordError("not_object", "the record is not a JSON object")


def test_every_reason_written_in_the_code_is_in_the_list():
    written = set()
    for path in SFT.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        written |= set(re.findall(r'RecordError\(\s*"(\w+)"', text))
        written |= set(re.findall(r'_reject\([^\n]*?"(\w+)"', text))  # training's rejects (sft.tokens.stream)
    assert {"bom", "invalid_json", "not_an_object", "cannot_render"} <= written
    assert written <= set(REASONS), written - set(REASONS)
