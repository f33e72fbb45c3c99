from dataclasses import dataclass, field

import pytest
import torch

from sft.batching import pack_collate, pad_collate, padding_fraction
from sft.conversation import Conversation, Message
from sft.encoding import EncodedSample, EncodeOptions, encode_conversation

M = -100


@dataclass
class FakeTokenizer:
    """Just what the collator reads: pad/eos ids and the added vocabulary."""

    pad_token_id: int | None = 0
    eos_token_id: int = 2
    pad_token: str = "<pad>"
    added: dict = field(default_factory=lambda: {"<pad>": 0, "<|im_start|>": 1, "<|im_end|>": 2})

    def get_added_vocab(self):
        return self.added

    def convert_tokens_to_ids(self, token):
        return self.added[token]


def _sample(ids, labels):
    return EncodedSample(ids, labels, sum(x != M for x in labels[1:]))


def test_pad_collate_literal():
    batch = pad_collate([_sample([5, 6, 7], [M, 6, 7]), {"input_ids": [8], "labels": [M]}], FakeTokenizer())
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[M, 6, 7], [M, M, M]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert batch["input_ids"].dtype == torch.long
    assert padding_fraction(batch) == pytest.approx(2 / 6)


def test_pad_collate_to_a_multiple():
    batch = pad_collate([_sample([5, 6, 7], [M, 6, 7]), _sample([8, 9], [M, 9])], FakeTokenizer(),
                        pad_to_multiple_of=4)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[M, 6, 7, M], [M, 9, M, M]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]))


def test_pad_equal_to_the_turn_end_is_refused():
    with pytest.raises(ValueError, match=r"pads with id 2 .*never learn to stop"):
        pad_collate([_sample([5, 2], [M, 2])], FakeTokenizer(pad_token_id=2, pad_token="<|im_end|>"))
    with pytest.raises(ValueError, match="no pad token"):
        pad_collate([_sample([5, 2], [M, 2])], FakeTokenizer(pad_token_id=None))
    with pytest.raises(ValueError, match="sample 0 of the batch trains the pad token id 0"):
        pad_collate([_sample([5, 0], [M, 0])], FakeTokenizer())


def test_real_tokenizers_pad_safely(qwen_tokenizer):
    batch = pad_collate([_sample([1, 2, 3], [M, 2, 3]), _sample([4], [M])], qwen_tokenizer)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 151643, 151643]]


def test_pack_collate_literal():
    batch = pack_collate([_sample([5, 6, 7], [M, 6, 7]), {"input_ids": [8, 9], "labels": [8, 9]}])
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7, 8, 9]]))
    # The second sample's first label is masked: predicting it would read the first sample.
    assert torch.equal(batch["labels"], torch.tensor([[M, 6, 7, M, 9]]))
    assert torch.equal(batch["position_ids"], torch.tensor([[0, 1, 2, 0, 1]]))
    assert batch["use_cache"] is False and "attention_mask" not in batch
    assert padding_fraction(batch) == 0.0


def test_packed_samples_do_not_see_each_other(qwen_tokenizer):
    from sft.models import load_model

    tokenizer = qwen_tokenizer
    model = load_model("tiny-qwen2").eval()
    convs = [Conversation([Message("user", "Hi"), Message("assistant", "Hello!")]),
             Conversation([Message("user", "你好，北京在哪里？"), Message("assistant", "北京在中国北方。")], system="s"),
             Conversation([Message("user", "2+2?"), Message("assistant", "4")], system="Be brief.")]
    samples = [encode_conversation(c, tokenizer, EncodeOptions()) for c in convs]
    batch = pack_collate(samples)
    with torch.no_grad():
        model.train()  # as in training: a train-mode model would still build a KV cache without use_cache=False
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        model.eval()
        start = 0
        for s in samples:
            alone = model(input_ids=torch.tensor([s.input_ids])).logits[0]
            torch.testing.assert_close(packed[start: start + s.num_tokens], alone, atol=1e-5, rtol=1e-4)
            start += s.num_tokens
        # The loss runs on the packed labels as given (the model shifts them itself).
        assert torch.isfinite(model(**batch).loss)
