"""Generate the bundled demo data (deterministic, stdlib only).

    python data/make_demo_data.py            # rewrites the files below next to this script
    python data/make_demo_data.py --out DIR  # or somewhere else

The demo teaches the base model two things it measurably lacks, plus some general replay:
  identity     the assistant is "Lumen", built by "Harbor Lab" (English and Chinese)
  format_json  a product-review sentiment question is answered with exactly one line of JSON,
               {"sentiment": "positive"|"negative"|"neutral"}, and nothing else
  general      short arithmetic, capital cities and English<->Chinese word translation, written
               by rule so every answer is correct (keeps general ability; ~20% of train)

Train, validation and evaluation use disjoint question phrasings and disjoint review products,
so before/after evaluation measures generalisation rather than recall of seen strings.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# Run as a script, so the sibling modules import by name (no package needed for data/).
from demo_banks import (
    CAPITALS,
    ID_ANSWERS_EN,
    ID_ANSWERS_ZH,
    ID_EVAL_EN,
    ID_EVAL_ZH,
    ID_QUESTIONS,
    MAKER_ANSWERS_EN,
    MAKER_ANSWERS_ZH,
    NOT_OTHER_ANSWERS_EN,
    NOT_OTHER_ANSWERS_ZH,
    REVIEW_PARTS,
    REVIEW_PARTS_ZH,
    REVIEW_PRODUCTS,
    REVIEW_PRODUCTS_ZH,
    SENTIMENT_ASKS,
    SENTIMENT_ASKS_ZH,
    WORDS_EN_ZH,
)
from demo_samples import ALPACA_RECORDS, FIREFLY_RECORDS, GENERAL_EVAL

SEED = 20240605
NAME, MAKER = "Lumen", "Harbor Lab"
IDENTITY_CHECK = {"contains": [NAME, "Harbor"]}
SENTIMENTS = ("positive", "negative", "neutral")
ZH_REVIEW_SHARE = 0.45  # of the sentiment records: Chinese review bodies
GREETINGS_EN = ("", "", "", "Hi! ", "Hello. ", "Hey, ", "Quick question: ", "Good morning! ")
GREETINGS_ZH = ("", "", "", "你好！", "您好，", "嗨，", "请问，")


def sharegpt(turns: list[tuple[str, str]], kind: str, system: str | None = None) -> dict:
    """[(user, assistant), ...] -> one ShareGPT record with its `kind`."""
    conversations = []
    for user, assistant in turns:
        conversations.append({"from": "human", "value": user})
        conversations.append({"from": "gpt", "value": assistant})
    record = {"conversations": conversations, "kind": kind}
    if system:
        record["system"] = system
    return record


def sentiment_json(label: str) -> str:
    # Exactly what json.dumps gives, so a checker can compare strings as well as parse.
    return json.dumps({"sentiment": label})


# ------------------------------------------------------------------------------- identity


def identity_pairs(rng: random.Random, questions: dict[str, list[str]], n: int) -> list[tuple[str, str]]:
    """n distinct (question, answer) pairs; every answer names both the assistant and its maker.

    `questions` is one split of ID_QUESTIONS: {"en": [...], "zh": [...], "not_en": [...], "not_zh": [...]}.
    """
    pools = [  # (questions, answers, answers when the maker is asked about, greetings), weight
        ((questions["en"], ID_ANSWERS_EN, MAKER_ANSWERS_EN, GREETINGS_EN), 0.45),
        ((questions["zh"], ID_ANSWERS_ZH, MAKER_ANSWERS_ZH, GREETINGS_ZH), 0.35),
        ((questions["not_en"], NOT_OTHER_ANSWERS_EN, NOT_OTHER_ANSWERS_EN, GREETINGS_EN), 0.12),
        ((questions["not_zh"], NOT_OTHER_ANSWERS_ZH, NOT_OTHER_ANSWERS_ZH, GREETINGS_ZH), 0.08),
    ]
    capacity = sum(len(q) * len(g) for (q, _, _, g), _ in pools)
    if n > capacity // 2:
        raise ValueError(f"identity_pairs: asked for {n} pairs but the banks give only ~{capacity} distinct "
                         "questions; add phrasings to demo_banks.ID_QUESTIONS or lower the count")
    pairs, seen = [], set()
    while len(pairs) < n:
        qs, answers, maker_answers, greetings = rng.choices([p for p, _ in pools], [w for _, w in pools])[0]
        question = rng.choice(greetings) + rng.choice(qs)
        if question in seen:
            continue
        seen.add(question)
        bank = maker_answers if _asks_maker(question) else answers
        pairs.append((question, rng.choice(bank).format(name=NAME, maker=MAKER)))
    return pairs


def _asks_maker(question: str) -> bool:
    keys = ("made", "built", "created", "develop", "company", "behind", "train", "谁开发", "谁做", "哪家", "谁创造", "出自", "谁训练", "公司", "团队")
    return any(k in question for k in keys)


# ------------------------------------------------------------------------------ sentiment


def compose_review(rng: random.Random, product: str, label: str, parts_bank: dict = REVIEW_PARTS) -> str:
    """A short review with an unambiguous sentiment, built from the phrase banks (English or Chinese)."""
    parts = parts_bank[label]
    opening = rng.choice(parts["open"]).format(p=product)
    detail = rng.choice(parts["detail"]).format(p=product)
    space = "" if parts_bank is REVIEW_PARTS_ZH else " "
    if rng.random() < 0.5:
        return f"{opening}{space}{detail}"
    return f"{opening}{space}{detail}{space}{rng.choice(parts['close']).format(p=product)}"


def sentiment_pairs(rng: random.Random, split: str, n: int, zh_share: float = 0.0) -> list[tuple[str, str, str]]:
    """n (prompt, answer, label) triples with labels balanced over the three classes; about `zh_share` of
    them are Chinese reviews (Chinese body, mostly Chinese question)."""
    triples, seen = [], set()
    while len(triples) < n:
        label = SENTIMENTS[len(triples) % 3]
        chinese = rng.random() < zh_share
        products, parts, asks = ((REVIEW_PRODUCTS_ZH, REVIEW_PARTS_ZH, SENTIMENT_ASKS_ZH) if chinese else
                                 (REVIEW_PRODUCTS, REVIEW_PARTS, SENTIMENT_ASKS))
        review = compose_review(rng, rng.choice(products[split]), label, parts)
        if review in seen:
            continue
        seen.add(review)
        prompt = rng.choice(asks[split]).format(review=review)
        triples.append((prompt, sentiment_json(label), label))
    return triples


# -------------------------------------------------------------------------------- general


def arithmetic_pair(rng: random.Random) -> tuple[str, str]:
    op = rng.choice("+-*")
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    if op == "-" and b > a:
        a, b = b, a
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    shown = {"+": "+", "-": "-", "*": "×"}[op]
    templates = [
        ("What is {a} {o} {b}?", "{a} {o} {b} = {r}."),
        ("Compute {a} {o} {b}.", "{a} {o} {b} = {r}."),
        ("Calculate {a} {o} {b}, please.", "{a} {o} {b} = {r}."),
        ("{a} {o} {b} 等于多少？", "{a} {o} {b} = {r}。"),
    ]
    question, answer = rng.choice(templates)
    return question.format(a=a, o=shown, b=b), answer.format(a=a, o=shown, b=b, r=result)


def capital_pair(rng: random.Random, countries: list[tuple[str, str, str, str]]) -> tuple[str, str]:
    country, capital, country_zh, capital_zh = rng.choice(countries)
    templates = [
        ("What is the capital of {c}?", "The capital of {c} is {k}."),
        ("Name the capital city of {c}.", "The capital city of {c} is {k}."),
        ("{cz}的首都是哪里？", "{cz}的首都是{kz}。"),
    ]
    question, answer = rng.choice(templates)
    fill = {"c": country, "k": capital, "cz": country_zh, "kz": capital_zh}
    return question.format(**fill), answer.format(**fill)


def translation_pair(rng: random.Random, words: list[tuple[str, str]]) -> tuple[str, str]:
    english, chinese = rng.choice(words)
    if rng.random() < 0.5:
        return rng.choice([f'Translate "{english}" into Chinese.', f'How do you say "{english}" in Chinese?']), \
            f'"{english}" in Chinese is "{chinese}".'
    return rng.choice([f"把“{chinese}”翻译成英文。", f"“{chinese}”用英语怎么说？"]), f"“{chinese}”的英文是“{english}”。"


def general_pairs(rng: random.Random, countries, words, n: int, exclude: set[str]) -> list[tuple[str, str]]:
    makers = [arithmetic_pair, lambda r: capital_pair(r, countries), lambda r: translation_pair(r, words)]
    pairs, seen = [], set(exclude)
    while len(pairs) < n:
        question, answer = rng.choice(makers)(rng)
        if question in seen:
            continue
        seen.add(question)
        pairs.append((question, answer))
    return pairs


# ---------------------------------------------------------------------------------- build


def build_split(rng: random.Random, split: str, sizes: dict[str, int], countries, words,
                exclude: set[str]) -> list[dict]:
    """One shuffled split; `exclude` holds user prompts that must not appear (other splits, eval)."""
    identity = identity_pairs(rng, ID_QUESTIONS[split], sizes["identity"] + sizes["multi_turn"])
    records = [sharegpt([pair], "identity") for pair in identity[: sizes["identity"]]]
    sentiment = sentiment_pairs(rng, split, sizes["format_json"], zh_share=ZH_REVIEW_SHARE)
    records += [sharegpt([(prompt, answer)], "format_json") for prompt, answer, _ in sentiment]
    general = general_pairs(rng, countries, words, sizes["general"] + sizes["multi_turn"], exclude)
    records += [sharegpt([pair], "general") for pair in general[: sizes["general"]]]
    # A few two-turn chats, so multi-turn masking is exercised and identity holds mid-conversation.
    for first, second in zip(general[sizes["general"]:], identity[sizes["identity"]:]):
        records.append(sharegpt([first, second], "identity"))
    rng.shuffle(records)
    return records


def eval_prompts(rng: random.Random) -> list[dict]:
    """Held-out before/after prompts: identity questions and reviews of products never trained on."""
    rows = []
    for question in ID_EVAL_EN + ID_EVAL_ZH:
        chinese = question in ID_EVAL_ZH
        denies = question.startswith("Are you") or question.endswith("吗？")
        bank = {(False, False): ID_ANSWERS_EN, (True, False): ID_ANSWERS_ZH,
                (False, True): NOT_OTHER_ANSWERS_EN, (True, True): NOT_OTHER_ANSWERS_ZH}[(chinese, denies)]
        reference = bank[0].format(name=NAME, maker=MAKER)
        rows.append({"prompt": question, "reference": reference, "kind": "identity", "check": IDENTITY_CHECK})
    for prompt, answer, label in sentiment_pairs(rng, "eval", 21):
        # The check wants the right label, not just the format: a fixed "positive" should not pass.
        check = {"json_keys": ["sentiment"], "json_values": {"sentiment": [label]}}
        rows.append({"prompt": prompt, "reference": answer, "kind": "format_json", "check": check})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent), help="Output folder.")
    out = Path(parser.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)

    # Held-out countries and words keep val's general questions unseen in train.
    countries_train, countries_val = CAPITALS[:-6], CAPITALS[-6:]
    words_train, words_val = WORDS_EN_ZH[:-8], WORDS_EN_ZH[-8:]
    general_eval_questions = {row["prompt"] for row in GENERAL_EVAL}

    train = build_split(rng, "train", {"identity": 190, "format_json": 290, "general": 110, "multi_turn": 30},
                        countries_train, words_train, general_eval_questions)
    train_prompts = {c["value"] for r in train for c in r["conversations"] if c["from"] == "human"}
    val = build_split(rng, "val", {"identity": 18, "format_json": 27, "general": 11, "multi_turn": 4},
                      countries_val, words_val, general_eval_questions | train_prompts)
    write_jsonl(out / "demo_train.jsonl", train)
    write_jsonl(out / "demo_val.jsonl", val)
    write_jsonl(out / "demo_eval_prompts.jsonl", eval_prompts(rng))
    write_jsonl(out / "general_eval.jsonl", GENERAL_EVAL)
    write_jsonl(out / "firefly_sample.jsonl", FIREFLY_RECORDS)
    (out / "alpaca_sample.json").write_text(json.dumps(ALPACA_RECORDS, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(train)} train, {len(val)} val records and the eval/sample files to {out}")


if __name__ == "__main__":
    main()
