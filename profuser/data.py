"""Read instruction data into canonical records; every unusable row is kept with its reason.

Inputs: JSONL, JSON (a list of rows, or {"data": [...]}) or a directory written by
`datasets.Dataset.save_to_disk`; rows in chat `messages`, Alpaca `instruction/input/output` or
ShareGPT `conversations` format, detected per row (or forced). Output records:

    {"id": str, "messages": [prompt turns], "reference": str, "meta": {other fields}}

`reference` is the final assistant turn (the ground truth); `messages` is everything before it.
Accepted + rejected always equals the number of input rows.

Never drops a row silently: every reject keeps its row number, kind and reason.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
FORMATS = ("messages", "alpaca", "sharegpt")


class Reject(ValueError):
    """A row (or one teacher's row for a sample) cannot be used: `kind` is a short category for
    counting, `detail` the reason, str(self) both. `target_side`: the cause is the target's (its
    template, length or tokens), so no other source could do better."""

    def __init__(self, kind: str, detail: str, target_side: bool = False):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail, self.target_side = kind, detail, target_side


@dataclass
class NormalizeResult:
    records: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)  # {"row": N, "reason": str, "kind": str}
    n_rows: int = 0

    @property
    def counts(self) -> dict:
        return {"rows": self.n_rows, "accepted": len(self.records), "rejected": len(self.rejects),
                "reasons": dict(Counter(r["kind"] for r in self.rejects).most_common())}


# --------------------------------------------------------------------------------------------
# reading rows: yields (row_number, row_or_Reject); row numbers are 1-based lines for JSONL


def read_rows(path: str | Path) -> Iterator[tuple[int, object]]:
    p = Path(path)
    if p.is_dir():
        yield from _read_hf(p)
    elif p.suffix in (".jsonl", ".ndjson"):
        yield from _read_jsonl(p)
    elif p.suffix == ".json":
        yield from _read_json(p)
    else:
        raise ValueError(f"data path {str(p)!r}: expected .jsonl, .json or a saved HF dataset directory")


def _read_jsonl(p: Path):
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark (editors on Windows write one) is not row 1's text
            if not raw.strip():
                continue  # blank lines are not rows
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, Reject("invalid_utf8", f"invalid UTF-8 at byte {e.start} of the line")
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                yield n, Reject("invalid_json", f"{e.msg} at column {e.colno}")


def _read_json(p: Path):
    try:
        data = json.loads(p.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: invalid UTF-8 at byte {e.start}; a .json file must be valid UTF-8 as a whole "
                         "(use JSONL to keep the good rows)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}); use JSONL to keep the good rows") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{p}: expected a JSON list of rows (or {{'data': [...]}}), got {type(data).__name__}")
    for n, row in enumerate(data, 1):
        yield n, row


def _read_hf(p: Path):
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ValueError(f"{p}: a directory must be a dataset saved by datasets' save_to_disk "
                         f"({type(e).__name__}: {e}); or point data.path at a .jsonl or .json file") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{p}: a DatasetDict without a 'train' split ({list(ds)}); point data.path at one split")
        ds = ds["train"]
    for n, row in enumerate(ds, 1):
        yield n, row


# --------------------------------------------------------------------------------------------
# formats -> (turns, meta)


def detect_format(row: dict) -> str:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    raise Reject("missing_fields", f"no 'messages', 'conversations' or 'instruction' field (keys: {sorted(row)[:8]})")


def _str_field(row: dict, key: str, required: bool = True) -> str:
    v = row.get(key)
    if v is None:
        if required:
            raise Reject("missing_fields", f"missing field {key!r}")
        return ""
    if not isinstance(v, str):
        raise Reject("non_string_content", f"field {key!r} is {type(v).__name__}, not a string")
    return v


def _turns_messages(row: dict, key: str, role_key: str, content_key: str, role_map: Optional[dict]) -> list[dict]:
    msgs = row.get(key)
    if not isinstance(msgs, list) or not msgs:
        raise Reject("missing_fields", f"{key!r} must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            raise Reject("missing_fields", f"{key}[{i}] needs {role_key!r} and {content_key!r}")
        role, content = m[role_key], m[content_key]
        if not isinstance(content, str):
            raise Reject("non_string_content", f"{key}[{i}].{content_key} is {type(content).__name__}, not a string")
        if role_map is not None:
            if role not in role_map:
                raise Reject("bad_role", f"{key}[{i}].{role_key} {role!r} is not one of {sorted(role_map)}")
            role = role_map[role]
        out.append({"role": role, "content": content})
    return out


def to_turns(row: dict, fmt: str) -> tuple[list[dict], dict]:
    """All turns of the conversation (ending with the reference) and the row's other fields."""
    if fmt == "messages":
        turns = _turns_messages(row, "messages", "role", "content", {r: r for r in ROLES})
        used = {"messages"}
    elif fmt == "sharegpt":
        turns = _turns_messages(row, "conversations", "from", "value", _SHAREGPT_ROLES)
        used = {"conversations"}
    elif fmt == "alpaca":
        instruction = _str_field(row, "instruction")
        extra = _str_field(row, "input", required=False)
        output = _str_field(row, "output")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        used = {"instruction", "input", "output"}
    else:
        raise ValueError(f"format {fmt!r}: use one of auto, {', '.join(FORMATS)}")
    meta = {k: v for k, v in row.items() if k not in used and k != "id"}
    return turns, meta


def check_turns(turns: list[dict]) -> None:
    body = turns[1:] if turns and turns[0]["role"] == "system" else turns
    if not body:
        raise Reject("wrong_role_order", "no user/assistant turns")
    for i, t in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if t["role"] != want:
            seq = "/".join(x["role"] for x in turns)
            raise Reject("wrong_role_order", f"turn {i + len(turns) - len(body)} is {t['role']!r}, expected {want!r} "
                         f"(roles: {seq}); need optional system, then user/assistant alternating, ending with assistant")
    if body[-1]["role"] != "assistant":
        raise Reject("wrong_role_order", "the conversation must end with an assistant turn (the reference)")
    if not body[-1]["content"].strip():
        raise Reject("empty_response", "the final assistant turn is empty")
    for t in body[:-1]:
        if t["role"] == "user" and not t["content"].strip():
            raise Reject("empty_prompt", "a user turn is empty")


def content_id(messages: list[dict], reference: str) -> str:
    blob = json.dumps({"m": messages, "r": reference}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _check_encodable(obj) -> None:
    """JSON's \\ud800 escapes give strings that no file, tokenizer or Arrow column can hold."""
    try:
        json.dumps(obj, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError as e:
        raise Reject("invalid_unicode", f"a lone UTF-16 surrogate ({e.object[e.start:e.end]!r}) in the row's text; "
                     "it is not a character and cannot be encoded") from None


def normalize_row(row: object, fmt: str = "auto") -> dict:
    if isinstance(row, Reject):
        raise row
    if not isinstance(row, dict):
        raise Reject("not_an_object", f"row is {type(row).__name__}, not a JSON object")
    use = detect_format(row) if fmt == "auto" else fmt
    turns, meta = to_turns(row, use)
    check_turns(turns)
    _check_encodable(turns)
    messages, reference = turns[:-1], turns[-1]["content"]
    rid = row.get("id")
    if rid is None or rid == "":
        rid = content_id(messages, reference)
    elif not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise Reject("bad_id", f"id {rid!r} must be a string or integer")
    meta = json.loads(json.dumps(meta, default=str))  # JSON-safe (HF rows may hold numpy/datetime)
    rec = {"id": str(rid), "messages": messages, "reference": reference, "meta": meta}
    _check_encodable(rec)
    return rec


# --------------------------------------------------------------------------------------------
# special-token strings in message text


ZWSP = "\u200b"


def special_strings(tokenizer) -> set[str]:
    """The text of every special or added token of a tokenizer: the strings a tokenizer turns into a
    control token wherever they appear in the text it is given."""
    out = {t for t in getattr(tokenizer, "all_special_tokens", []) if isinstance(t, str)}
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        content = getattr(tok, "content", None)
        if content:
            out.add(content)
    return {t for t in out if len(t) > 1 and not t.isspace()}


def guard_special_tokens(rec: dict, strings: set[str], policy: str) -> bool:
    """Keep special-token strings in a record's text (prompt turns and reference) plain text: policy
    "escape" inserts a zero-width space after the first character of each occurrence (in place;
    returns True if it changed something); "reject" raises Reject("special_token")."""
    if not strings:
        return False
    pattern = re.compile("|".join(re.escape(t) for t in sorted(strings, key=len, reverse=True)))
    texts = [m["content"] for m in rec["messages"]] + [rec["reference"]]
    found = sorted({m.group(0) for t in texts for m in pattern.finditer(t)})
    if not found:
        return False
    if policy == "reject":
        raise Reject("special_token", f"the text contains the special token string(s) {found}, which the tokenizer "
                     "would read as control tokens (data.special_tokens=reject; 'escape' keeps such rows)")
    esc = lambda t: pattern.sub(lambda m: m.group(0)[0] + ZWSP + m.group(0)[1:], t)  # noqa: E731
    rec["messages"] = [{**m, "content": esc(m["content"])} for m in rec["messages"]]
    rec["reference"] = esc(rec["reference"])
    return True


def normalize(path: str | Path, fmt: str = "auto", limit: Optional[int] = None) -> NormalizeResult:
    """Read and normalize every row. Duplicate ids (given, or identical content) keep the first
    occurrence. Lengths are checked later, per model (:func:`length_problems`)."""
    res = NormalizeResult()
    seen: dict[str, int] = {}
    for n, row in read_rows(path):
        if limit is not None and res.n_rows >= limit:
            break
        res.n_rows += 1
        try:
            rec = normalize_row(row, fmt)
            if rec["id"] in seen:
                raise Reject("duplicate_id", f"id {rec['id']!r} already used by row {seen[rec['id']]}")
        except Reject as r:
            res.rejects.append({"row": n, "kind": r.kind, "reason": str(r)})
            continue
        seen[rec["id"]] = n
        res.records.append(rec)
    return res


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Atomic JSONL write (temp file then rename)."""
    import os

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, p)


def length_problems(rec: dict, models: list, overlength: str, counts: dict) -> list[tuple[str, str]]:
    """Format `rec` with every model of `models` ((name, chat model, max_length) triples) under the
    over-length policy `overlength`, counting each model's outcome in counts[name] ("fits",
    "truncated", "rejected"). Returns (kind, "name: reason") per model that cannot take the record:
    a record one model rejects is rejected for all, so every source sees the same records."""
    from profuser.chat import OverLength, encode_chat

    problems = []
    for name, chat_model, max_length in models:
        try:
            enc = encode_chat(chat_model.tokenizer, chat_model.template, rec["messages"], rec["reference"], max_length,
                              overlength)
        except OverLength as e:
            counts[name]["rejected"] += 1
            problems.append(("over_length", f"{name}: {e} (data.overlength={overlength})"))
        except Exception as e:  # noqa: BLE001 — a template that cannot render this record
            counts[name]["rejected"] += 1
            problems.append(("template_error", f"{name}: {type(e).__name__}: {e}"))
        else:
            counts[name]["truncated" if enc.truncated else "fits"] += 1
    return problems
