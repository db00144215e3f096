"""Built-in rule scorers: plain functions `(record, response) -> float`, referenced from a config as
`scorers: [{type: rule, function: "profuser.rules:exact_match"}]`. Higher is better.

Pure functions of strings: they must never load a model or import torch (prep and eval call them
once per response)."""
from __future__ import annotations

import re
from collections import Counter

_NUM = re.compile(r"-?\d+(?:\.\d+)?")
_WORD = re.compile(r"\w+", re.UNICODE)


def final_answer(text: str) -> str:
    """The last number in `text` if it has one, else its last quoted string, else the stripped text."""
    nums = _NUM.findall(text)
    if nums:
        return nums[-1]
    quoted = re.findall(r'"([^"]*)"', text)
    if quoted:
        return quoted[-1]
    return text.strip().rstrip(".").lower()


def exact_match(record: dict, response: str) -> float:
    """1.0 when the response's final answer equals the reference's final answer."""
    return float(final_answer(response) == final_answer(record["reference"]))


def token_f1(record: dict, response: str) -> float:
    """SQuAD-style word-overlap F1 between response and reference (case-insensitive)."""
    pred = Counter(w.lower() for w in _WORD.findall(response))
    ref = Counter(w.lower() for w in _WORD.findall(record["reference"]))
    common = sum((pred & ref).values())
    if common == 0:
        return 0.0
    p, r = common / sum(pred.values()), common / sum(ref.values())
    return 2 * p * r / (p + r)
