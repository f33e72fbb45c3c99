from dataclasses import dataclass, field

import pytest
import torch

from sft.conversation import Conversation, Message
from sft.tokens.collate import pack_collate, packing_leak, pad_collate, padding_fraction
from sft.tokens.encoding import EncodedSample, EncodeOptions, encode_conversation

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


def test_one_packed_row_carries_the_flash_attention_boundaries():
    samples = [_sample([5, 6, 7], [M, 6, 7]), _sample([8, 9], [8, 9]), _sample([10, 11, 12, 13], [M, M, 12, 13])]
    batch = pack_collate(samples, flash_kwargs=True)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert batch[key].dtype == torch.int32 and batch[key].tolist() == [0, 3, 5, 9]
    assert (batch["max_length_q"], batch["max_length_k"]) == (4, 4)
    assert type(batch["max_length_q"]) is int and type(batch["max_length_k"]) is int
    assert "cu_seq_lens_q" not in pack_collate(samples)  # only when asked (flash attention)

    # The same keys, values and types as transformers' own flattening collator.
    from transformers import DataCollatorWithFlattening

    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": list(s.input_ids), "labels": list(s.labels)} for s in samples])
    for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        assert type(batch[key]) is type(theirs[key]), key
        if torch.is_tensor(theirs[key]):
            assert batch[key].dtype == theirs[key].dtype and torch.equal(batch[key], theirs[key]), key
        else:
            assert batch[key] == theirs[key], key
    assert torch.equal(batch["position_ids"], theirs["position_ids"].long())
    assert torch.equal(batch["labels"], theirs["labels"].long())


def test_flash_boundaries_describe_one_row_only():
    with pytest.raises(ValueError, match="flash_kwargs describe one packed row; call it with pad_id=None"):
        pack_collate([_sample([1, 2], [1, 2])], pad_id=0, flash_kwargs=True)


def test_pack_collate_rows_literal():
    samples = [_sample([1, 2, 3], [M, 2, 3]), _sample([4], [4]), _sample([5, 6], [M, 6]), _sample([7, 8], [M, 8])]
    batch = pack_collate(samples, pad_id=0)
    # Rows as long as the longest sample (3), filled longest first: [1 2 3], [5 6 4], [7 8 pad].
    assert batch["input_ids"].tolist() == [[1, 2, 3], [5, 6, 4], [7, 8, 0]]
    assert batch["labels"].tolist() == [[M, 2, 3], [M, 6, M], [M, 8, M]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0], [0, 1, 0]]  # the pad is a sequence of its own
    assert batch["padding_tokens"] == 1 and "attention_mask" not in batch and batch["use_cache"] is False
    assert padding_fraction(batch) == 1 / 9


def _three_samples(tokenizer):
    convs = [Conversation([Message("user", "Hi"), Message("assistant", "Hello!")]),
             Conversation([Message("user", "你好，北京在哪里？请介绍一下它的历史和文化。"),
                           Message("assistant", "北京在中国北方，是一座有三千多年历史的古城，也是中国的首都。" * 3)],
                          system="You are a helpful assistant."),
             Conversation([Message("user", "2+2?"), Message("assistant", "4")], system="Be brief.")]
    return [encode_conversation(c, tokenizer, EncodeOptions()) for c in convs]


def _model_inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("labels", "padding_tokens")}


@pytest.mark.parametrize("rows", ["one row", "rows"])
def test_packed_samples_do_not_see_each_other(qwen_tokenizer, rows):
    from sft.models import load_model

    model = load_model("tiny-qwen2").eval()
    samples = _three_samples(qwen_tokenizer)
    batch = pack_collate(samples, None if rows == "one row" else qwen_tokenizer.pad_token_id)
    where = {}  # sample index -> (row, start) from the position ids restarting at 0
    for r, positions in enumerate(batch["position_ids"].tolist()):
        starts = [j for j, p in enumerate(positions) if p == 0]
        for j in starts:
            match = [i for i, s in enumerate(samples) if batch["input_ids"][r, j:j + s.num_tokens].tolist() == s.input_ids]
            if match:
                where[match[0]] = (r, j)
    assert sorted(where) == [0, 1, 2] and len({r for r, _ in where.values()}) == (1 if rows == "one row" else 2)
    with torch.no_grad():
        model.train()  # as in training: a train-mode model would still build a KV cache without use_cache=False
        packed = model(**_model_inputs(batch)).logits
        model.eval()
        for i, s in enumerate(samples):
            r, start = where[i]
            alone = model(input_ids=torch.tensor([s.input_ids])).logits[0]
            torch.testing.assert_close(packed[r, start: start + s.num_tokens], alone, atol=1e-5, rtol=1e-4)


def test_packed_and_padded_batches_give_the_same_loss_and_gradients(qwen_tokenizer):
    """Packing changes the cost of a step, not what it learns: same samples -> same loss and gradients."""
    from sft.models import load_model

    model = load_model("tiny-qwen2")
    model.train()
    samples = _three_samples(qwen_tokenizer)
    grads = []
    for batch in (pad_collate(samples, qwen_tokenizer), pack_collate(samples, qwen_tokenizer.pad_token_id),
                  pack_collate(samples)):
        model.zero_grad()
        loss = model(**{k: v for k, v in batch.items() if k != "padding_tokens"}).loss
        loss.backward()
        grads.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    for loss, grad in grads[1:]:
        torch.testing.assert_close(loss, grads[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, grads[0][1], atol=1e-5, rtol=1e-4)


class _IgnoresPositions(torch.nn.Module):
    """A model whose attention ignores position_ids, so packed samples would see each other."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, position_ids=None, use_cache=False):
        return self.inner(input_ids=input_ids, use_cache=False)


def test_packing_isolation_check_refuses_a_model_that_leaks(qwen_tokenizer):
    from sft.config import ConfigError
    from sft.models import load_model
    from sft.train.run import check_packing_isolation

    model = load_model("tiny-qwen2").train()
    assert packing_leak(model, qwen_tokenizer.pad_token_id) < 1e-5
    assert packing_leak(model, qwen_tokenizer.pad_token_id, one_row=True) < 1e-5
    assert model.training  # the check puts the model back in train mode
    check_packing_isolation(model, qwen_tokenizer, "tiny-qwen2")  # no error
    leaky = _IgnoresPositions(model)
    assert packing_leak(leaky, qwen_tokenizer.pad_token_id) > 1e-3
    with pytest.raises(ConfigError, match="lets packed samples attend to each other .* train it with --packing false"):
        check_packing_isolation(leaky, qwen_tokenizer, "custom-model")


def test_packing_check_reads_the_vocabulary_from_the_config_not_a_partitioned_weight(qwen_tokenizer):
    """Under ZeRO-3 the embedding weight is an empty partition: its shape[0] is 0, not the vocabulary."""
    from sft.models import load_model

    model = load_model("tiny-qwen2")
    full = packing_leak(model, qwen_tokenizer.pad_token_id)
    model.get_input_embeddings().weight = torch.nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves on a rank
    model.get_input_embeddings().forward = lambda ids: model.get_output_embeddings().weight[ids]  # tied: same values
    assert packing_leak(model, qwen_tokenizer.pad_token_id) == full


@pytest.fixture
def eager_flex_attention(monkeypatch):
    """transformers compiles flex attention; torch 2.13's inductor CPU template for it does not compile here
    (g++: "'cur_qSplitSize4' was not declared in this scope"), so on CPU the model calls torch's flex_attention
    uncompiled: the same BlockMask from the same position_ids, the same masking semantics, only slower.
    Returns the BlockMasks flex attention was called with."""
    import transformers.integrations.flex_attention as integration
    from torch.nn.attention.flex_attention import flex_attention

    masks = []

    def uncompiled(query, key, value, block_mask=None, **kwargs):
        masks.append(block_mask)
        return flex_attention(query, key, value, block_mask=block_mask, **kwargs)

    monkeypatch.setattr(integration.WrappedFlexAttention, "__init__", lambda self, training: None)
    monkeypatch.setattr(integration.WrappedFlexAttention, "__call__", lambda self: uncompiled)
    return masks


def test_flex_attention_document_mask_isolates_one_packed_row(qwen_tokenizer, eager_flex_attention):
    from torch.nn.attention.flex_attention import BlockMask

    from sft.models import load_model
    from sft.train.run import check_packing_isolation

    model = load_model("tiny-qwen2", attn_implementation="flex_attention").train()
    model.config.use_cache = False
    assert packing_leak(model, qwen_tokenizer.pad_token_id, one_row=True) < 1e-5
    assert eager_flex_attention and all(isinstance(m, BlockMask) for m in eager_flex_attention)
    # The packed call's mask is block-diagonal: 22 positions, samples of 11, 6 and 5 tokens -> 11*12/2 + 6*7/2 + 5*6/2.
    mask_mod = eager_flex_attention[0].mask_mod
    zero, q, kv = torch.tensor(0), torch.arange(22)[:, None], torch.arange(22)[None, :]
    packed_mask = mask_mod(zero, zero, q, kv)
    assert int(packed_mask.sum()) == 66 + 21 + 15
    assert not packed_mask[11:17, :11].any() and not packed_mask[17:, :17].any()  # no sample sees an earlier one
    check_packing_isolation(model, qwen_tokenizer, "tiny-qwen2", one_row=True)  # no error
    assert model.training


def test_isolation_tolerance_follows_the_weight_precision(qwen_tokenizer):
    from sft.models import load_model
    from sft.tokens.collate import isolation_tolerance

    model = load_model("tiny-qwen2")
    assert isolation_tolerance(model) == 1e-3
    half = model.to(torch.bfloat16)
    assert isolation_tolerance(half) == 5e-2
    # In bf16 an isolated packing differs by rounding only (~7e-3 here), a leak by far more than the tolerance.
    assert packing_leak(half, qwen_tokenizer.pad_token_id, one_row=True) < 5e-2
    assert packing_leak(_IgnoresPositions(half), qwen_tokenizer.pad_token_id) > 0.3
