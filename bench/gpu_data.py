"""Synthetic ShareGPT conversations with SFT-like lengths, and the random Qwen2.5-0.5B-shaped model.

    write_conversations(path, n=4000, seed=0)     # ShareGPT JSONL, deterministic
    qwen2_config(QWEN25_05B)                      # transformers.Qwen2Config

Lengths (qwen2.5 template, Qwen2.5 tokenizer, measured on the 4,000 of seed 0): a lognormal total per
conversation, median ~570 tokens, ~93% between 200 and 1,500, <1% past 2,048 (truncated by
--max_length 2048; max ~2,300). Half the conversations are English words, half Chinese characters; 60% have one
turn, the rest 2-4; the assistant says ~80% of each turn.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

VOCAB_SIZE = 151936  # Qwen2.5's padded embedding rows
EOS_ID, PAD_ID = 151645, 151643  # <|im_end|>, <|endoftext|>

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

_WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have "
          "an they you were her she there one all we their has been would when who will more no if out so said "
          "what up its about into than them can only other new some could time these two may then do first any "
          "my now such like our over man me even most made after also did many before must through back years "
          "where much your way well down should because each just those people how too little state good very "
          "make world still own see men work long get here between both life being under never day same another "
          "know while last might us great old year off come since against go came right used take three model "
          "data train answer question value system function result error number list string table file").split()
_HANZI = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面"
          "而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把"
          "性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质")
# Text units per token, measured with the Qwen2.5 tokenizer on this generator's output.
_UNITS_PER_TOKEN = {"en": 0.96, "zh": 1.10}


def qwen2_config(dims: dict):
    """A Qwen2.5-0.5B-like config (tied embeddings, rope theta 1e6) with the given layer sizes."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=VOCAB_SIZE, max_position_embeddings=32768, tie_word_embeddings=True,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-6, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                       bos_token_id=PAD_ID, use_cache=False, **dims)


def _text(rng: random.Random, lang: str, tokens: int) -> str:
    units = max(1, round(tokens * _UNITS_PER_TOKEN[lang]))
    if lang == "zh":
        return "".join("，" if rng.random() < 0.07 else rng.choice(_HANZI) for _ in range(units))
    words = [rng.choice(_WORDS) for _ in range(units)]
    for i in range(9, len(words), rng.randint(8, 16)):
        words[i] += rng.choice((".", ",", "."))
    return " ".join(words).capitalize()


def conversation(rng: random.Random, length_scale: float = 1.0) -> dict:
    """One ShareGPT record, lognormal length (median ~570 tokens x length_scale, capped at ~2,300)."""
    total = int(min(2200, max(60, rng.lognormvariate(math.log(540), 0.55))) * length_scale)
    turns = rng.choices((1, 2, 3, 4), weights=(60, 20, 12, 8))[0]
    lang = rng.choice(("en", "zh"))
    body = max(turns * 8, total - 20 - 10 * turns)  # template overhead: system block + turn headers
    shares = [rng.uniform(0.6, 1.4) for _ in range(turns)]
    messages = []
    for share in shares:
        turn = body * share / sum(shares)
        user = max(3, int(turn * rng.uniform(0.1, 0.3)))
        messages.append({"from": "human", "value": _text(rng, lang, user)})
        messages.append({"from": "gpt", "value": _text(rng, lang, max(3, int(turn) - user))})
    record = {"conversations": messages}
    if rng.random() < 0.2:
        record["system"] = _text(rng, lang, rng.randint(8, 30))
    return record


def write_conversations(path: str | Path, n: int, seed: int = 0, length_scale: float = 1.0) -> Path:
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps(conversation(rng, length_scale), ensure_ascii=False) + "\n")
    return path
