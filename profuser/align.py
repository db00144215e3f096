"""Cross-tokenizer token alignment through exact byte spans of the same text (docs/ARCHITECTURE.md,
"Cross-tokenizer transfer"). Tokenizers and text in, numpy out: it never imports torch and never
loads model weights.

Two tokenizations of one text are related through the bytes each token stands for. Every token gets
a span [start, end) of BYTES of the UTF-8 text, and a flag `exact`: the token's real surface bytes
(byte-level BPE decoded through the GPT-2 bytes-to-unicode map, SentencePiece `▁` -> space,
`<0xNN>` -> that byte, added tokens -> their content) are exactly the text's bytes in that span.
A target token receives a source token's distribution when both are exact and their spans are
equal, i.e. they cover the same text and predict it from the same text prefix.

How the awkward cases fall out of that one rule:
- Byte-level BPE offsets are character offsets into the original text and include the leading
  space of `Ġword`; `▁word` offsets include the space too. A leading space therefore belongs to the
  token that encodes it, on both sides, and `Ġcafé` pairs with `▁café`. Tokenizers whose offsets are
  trimmed (the space left out) are repaired: the span is extended back over the surface's bytes when
  the text there matches.
- Several tokens inside one character (byte pieces of `😀`, `<0xE6><0x96><0x87>`) share that
  character's offsets; such a run is split into byte sub-spans by the pieces' surface lengths, so a
  byte piece pairs only with the same byte piece on the other side (`<0xC3>` with byte-level `Ã`).
- SentencePiece's phantom prefix (`▁Hello` at text start, whose space is not in the text), `<unk>`,
  and normalizer rewrites (NFKC `ﬁ` -> `fi`) make surface != text, so the token is not exact and its
  position falls back to the one-hot label.

A vectorized MinED (FuseLLM's DTW over tokens with edit-distance cell cost) is the fallback for
tokenizers without offset mappings.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_ASCII_SPACE = np.zeros(256, dtype=bool)
_ASCII_SPACE[list(b" \t\n\r\x0b\x0c")] = True


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character standing for each byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


# ---------------------------------------------------------------------------------------------------
# Per-tokenizer facts, computed once and cached by tokenizer object.

def _backend(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(
            f"{type(tokenizer).__name__} has no Rust backend (no offset mappings); use align_mined on its "
            "token strings instead"
        )
    return backend


def _component_types(node) -> list[str]:
    """Types of a tokenizer.json component, flattening Sequence nodes."""
    if not node:
        return []
    out = [node.get("type", "")]
    for key in ("decoders", "pretokenizers", "normalizers"):
        for child in node.get(key) or []:
            out += _component_types(child)
    return out


def _fingerprint_json(tokenizer) -> dict:
    """tokenizer.json minus what cannot change ids for add_special_tokens=False text."""
    j = json.loads(_backend(tokenizer).to_str())
    for key in ("version", "truncation", "padding", "post_processor"):
        j.pop(key, None)
    return j


@dataclass
class Surfaces:
    """Every vocabulary id's real surface bytes, flat for vectorized gathers."""
    surfaces: list[bytes]  # per id
    flat: np.ndarray  # uint8, all surfaces concatenated
    offsets: np.ndarray  # int64 [V]: start of id's surface in flat
    lengths: np.ndarray  # int64 [V]
    special: np.ndarray  # bool [V]: special/control tokens (mapped by role, not surface)
    byte_fallback: np.ndarray  # bool [V]: <0xNN> pieces
    added: np.ndarray  # bool [V]: added tokens (special or not)
    fingerprint: str  # sha256 of the tokenizer's JSON (see same_tokenizer)


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def surfaces(tokenizer, need: int | None = None) -> Surfaces:
    """The cached Surfaces of `tokenizer` (built on first use: one pass over the vocabulary).

    The cache is rebuilt when tokens were added since. `need`, the largest token id the caller will
    look up, makes that check free when the table covers it: `len(tokenizer)` counts a large
    tokenizer's added tokens on every call (0.5 ms on Gemma-3's 262k vocabulary, a fifth of aligning
    one answer), while existing ids never change their surface when tokens are added. An id the table
    does not cover costs the `len` check, and a rebuild only when tokens were really added.
    """
    try:
        info = _CACHE[tokenizer]
        if need is not None and need < len(info.surfaces):
            return info
        if len(info.surfaces) >= len(tokenizer):  # nothing added since (an id past it is no token: a padded head)
            return info
    except (KeyError, TypeError):
        pass
    info = _build_surfaces(tokenizer)
    try:
        _CACHE[tokenizer] = info
    except TypeError:  # not weak-referenceable: just do not cache
        pass
    return info


def _build_surfaces(tokenizer) -> Surfaces:
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        return _build_python_surfaces(tokenizer)
    j = _fingerprint_json(tokenizer)
    fingerprint = hashlib.sha256(json.dumps(j, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    types = set(_component_types(j.get("decoder"))) | set(_component_types(j.get("pre_tokenizer")))
    byte_level = "ByteLevel" in types
    metaspace = None
    for node in (j.get("pre_tokenizer"), j.get("decoder")):
        stack = [node] if node else []
        while stack:
            n = stack.pop()
            if n.get("type") == "Metaspace":
                metaspace = n.get("replacement", "▁")
            elif n.get("type") == "Replace" and (n.get("pattern") or {}).get("String") == "▁":
                metaspace = "▁"
            stack += n.get("decoders") or []
            stack += n.get("pretokenizers") or []
    byte_fallback_on = bool((j.get("model") or {}).get("byte_fallback"))
    vocab = _backend(tokenizer).get_vocab(with_added_tokens=True)
    return _surfaces_from_vocab(tokenizer, vocab, fingerprint, byte_level, metaspace, byte_fallback_on)


def _build_python_surfaces(tokenizer) -> Surfaces:
    """Surfaces of a tokenizer without a Rust backend (a Python `PythonBackend`, e.g. remote code):
    its token strings read with the conventions their markers reveal (`Ġ`: byte-level, `▁`: a space,
    `<0xNN>`: a byte). Used by the MinED path only (no offsets); fingerprint = class + vocabulary."""
    vocab = tokenizer.get_vocab()
    fingerprint = hashlib.sha256(json.dumps([type(tokenizer).__name__, sorted(vocab.items())],
                                            ensure_ascii=False).encode()).hexdigest()
    toks = list(vocab)
    share = lambda mark: sum(t.startswith(mark) for t in toks) / max(len(toks), 1)  # noqa: E731
    byte_level = share("Ġ") > 0.05
    metaspace = "▁" if share("▁") > 0.05 else None
    fallback = any(_BYTE_FALLBACK.match(t) for t in toks)
    return _surfaces_from_vocab(tokenizer, vocab, fingerprint, byte_level, metaspace, fallback)


def _surfaces_from_vocab(tokenizer, vocab: dict, fingerprint: str, byte_level: bool, metaspace: Optional[str],
                         byte_fallback_on: bool) -> Surfaces:
    size = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
    tokens = [""] * size
    for t, i in vocab.items():
        tokens[i] = t
    added = {i: t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    special = np.zeros(size, dtype=bool)
    for i in getattr(tokenizer, "all_special_ids", []) or []:
        if 0 <= i < size:
            special[i] = True
    for i, t in added.items():
        if getattr(t, "special", False) and 0 <= i < size:
            special[i] = True
    present = np.zeros(size, dtype=bool)
    present[list(vocab.values())] = True
    special |= ~present

    bdec = byte_decoder()
    out: list[bytes] = []
    fallback = np.zeros(size, dtype=bool)
    for i, t in enumerate(tokens):
        if i in added:
            out.append(str(added[i].content).encode("utf-8"))
            continue
        m = _BYTE_FALLBACK.match(t) if byte_fallback_on else None
        if m:
            out.append(bytes([int(m.group(1), 16)]))
            fallback[i] = True
        elif byte_level and all(c in bdec for c in t):
            out.append(bytes(bdec[c] for c in t))
        elif metaspace:
            out.append(t.replace(metaspace, " ").encode("utf-8"))
        else:
            out.append(t.encode("utf-8"))
    lengths = np.fromiter((len(b) for b in out), dtype=np.int64, count=size)
    offsets = np.zeros(size, dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    flat = np.frombuffer(b"".join(out), dtype=np.uint8)
    is_added = np.zeros(size, dtype=bool)
    is_added[[i for i in added if 0 <= i < size]] = True
    return Surfaces(out, flat, offsets, lengths, special, fallback, is_added, fingerprint)


def dropped_characters(tokenizer, chars) -> list[str]:
    """The characters of `chars` (any iterable of 1-character strings) that `tokenizer` gives to no
    token, sorted: a byte-level BPE whose vocabulary lacks a byte's symbol and has no unknown token
    (SmolLM2: 0x04, 0x06, 0x13, 0x14, 0x16, 0x1D), or a normalizer that deletes them. A model never
    sees those characters of its text. ASCII whitespace is left out (pre-tokenizers may drop it on
    purpose, and the spans leave such gaps alone). Each character is encoded between two zeros (no
    combining mark composes with a digit under NFC/NFKC) and checked against the offsets."""
    todo = [ch for ch in sorted(set(chars)) if len(ch) == 1 and not (ord(ch) < 128 and _ASCII_SPACE[ord(ch)])]
    encs = _backend(tokenizer).encode_batch(["0" + ch + "0" for ch in todo], add_special_tokens=False)
    return [ch for ch, enc in zip(todo, encs) if not any(s <= 1 < e for s, e in enc.offsets)]


def token_surface(tokenizer) -> list[bytes]:
    """Each vocabulary id's real surface bytes (what it contributes to decoded text)."""
    return surfaces(tokenizer).surfaces


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's JSON without padding/truncation/post-processor (see same_tokenizer)."""
    return surfaces(tokenizer).fingerprint


def same_tokenizer(a, b) -> bool:
    """True when a and b turn any text into the same ids: model (vocab, merges), normalizer,
    pre-tokenizer, decoder and added tokens all equal. The post-processor is ignored: it only adds
    special tokens, and we always tokenize with add_special_tokens=False."""
    if a is b:
        return True
    return tokenizer_fingerprint(a) == tokenizer_fingerprint(b)


# ---------------------------------------------------------------------------------------------------
# Spans.

@dataclass
class TokenSpans:
    """One tokenization of a text. Byte offsets refer to text.encode("utf-8")."""
    ids: np.ndarray  # int64 [n]
    starts: np.ndarray  # int64 [n] byte start
    ends: np.ndarray  # int64 [n] byte end (exclusive)
    exact: np.ndarray  # bool [n]: the token's surface bytes == text bytes[start:end]
    char_starts: np.ndarray  # int64 [n] the tokenizer's own character offsets
    char_ends: np.ndarray

    def __iter__(self):  # ids, starts, ends = token_spans(...)
        return iter((self.ids, self.starts, self.ends))

    def __len__(self) -> int:
        return len(self.ids)


def char_to_byte(text: str) -> np.ndarray:
    """int64 [len(text)+1]: byte offset in UTF-8 of each character offset."""
    if text.isascii():
        return np.arange(len(text) + 1, dtype=np.int64)
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    width = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    out = np.zeros(len(text) + 1, dtype=np.int64)
    np.cumsum(width, out=out[1:])
    return out


def clamp_index(x: np.ndarray, n: int) -> np.ndarray:
    """x clamped to [0, n - 1]: a safe gather index into an array of length n, for lookups whose result
    is masked where x was out of range (np.clip does the same with more per-call overhead)."""
    return np.minimum(np.maximum(x, 0), n - 1)


def token_spans(tokenizer, text: str) -> TokenSpans:
    """Tokenize `text` (add_special_tokens=False, as encode_chat does) and give each token its exact
    byte span; see the module docstring for the rules."""
    enc = _backend(tokenizer).encode(text, add_special_tokens=False)
    ids = np.fromiter(enc.ids, dtype=np.int64, count=len(enc.ids))
    offsets = enc.offsets  # (start, end) tuples; fromiter over the flat sequence is 2x faster than asarray
    off = np.fromiter(itertools.chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets)).reshape(-1, 2)
    return spans_from_offsets(surfaces(tokenizer, int(ids.max(initial=-1))), text, ids, off[:, 0], off[:, 1])


def token_spans_many(tokenizer, texts: list[str]) -> list[TokenSpans]:
    """[token_spans(tokenizer, t) for t in texts], the same spans, from one batch encode and one
    vectorized spans_from_offsets pass over the texts laid end to end (a token_spans call per text
    costs 0.4-1.0 ms on Gemma-3's tokenizer, about a tenth of it the encode, the rest fixed numpy
    work; 3,400 framed words: 3.55 s one call each, 0.10 s here). That pass gives every text its own
    spans where the text's tokens run from its first character to its last, the last token ending
    it: no cluster, trimmed-offset repair or gap then reaches across a seam. A text that is empty or
    whose tokens do not (a normalizer dropping an edge character, trailing whitespace left out) is
    given token_spans on its own."""
    texts = list(texts)
    encs = _backend(tokenizer).encode_batch(texts, add_special_tokens=False) if texts else []
    out: list = [None] * len(texts)
    joined, ids, cs, ce, counts, seams, where = [], [], [], [], [], [], []
    c_base = b_base = 0
    for i, (t, e) in enumerate(zip(texts, encs)):
        off = e.offsets
        flat = np.fromiter(itertools.chain.from_iterable(off), dtype=np.int64, count=2 * len(off)).reshape(-1, 2)
        if not off or flat[0, 0] != 0 or flat[-1, 1] != len(t) or flat[:, 1].max() != len(t):
            out[i] = token_spans(tokenizer, t)
            continue
        joined.append(t)
        ids.append(np.fromiter(e.ids, dtype=np.int64, count=len(e.ids)))
        cs.append(flat[:, 0] + c_base)
        ce.append(flat[:, 1] + c_base)
        counts.append(len(off))
        seams.append((c_base, b_base))
        where.append(i)
        c_base += len(t)
        b_base += len(t.encode("utf-8", "surrogatepass"))
    if where:
        all_ids = np.concatenate(ids)
        sp = spans_from_offsets(surfaces(tokenizer, int(all_ids.max(initial=-1))), "".join(joined), all_ids,
                                np.concatenate(cs), np.concatenate(ce))
        cut = np.cumsum(counts)[:-1]
        parts = [np.split(a, cut) for a in (sp.ids, sp.starts, sp.ends, sp.exact, sp.char_starts, sp.char_ends)]
        for n, (i, (c0, b0)) in enumerate(zip(where, seams)):
            t_ids, st, en, ex, c_s, c_e = (p[n] for p in parts)
            out[i] = TokenSpans(t_ids, st - b0, en - b0, ex, c_s - c0, c_e - c0)
    return out


def spans_from_offsets(surf: Surfaces, text: str, ids, char_starts, char_ends) -> TokenSpans:
    """Exact byte spans from a tokenizer's character offsets (vectorized over tokens)."""
    ids = np.asarray(ids, dtype=np.int64)
    cs, ce = np.asarray(char_starts, dtype=np.int64), np.asarray(char_ends, dtype=np.int64)
    n = len(ids)
    tb = text.encode("utf-8", "surrogatepass")
    if n == 0:
        z = np.zeros(0, dtype=np.int64)
        return TokenSpans(ids, z, z.copy(), np.zeros(0, dtype=bool), cs, ce)
    cum = char_to_byte(text)
    bs, be = cum[clamp_index(cs, len(cum))], cum[clamp_index(ce, len(cum))]
    known = (ids >= 0) & (ids < len(surf.lengths))
    L = np.where(known, surf.lengths[np.where(known, ids, 0)], 0)

    # Runs of tokens whose character spans overlap (byte pieces of one character) form a cluster;
    # when the pieces' surface lengths add up to the cluster's bytes, give each piece its own bytes.
    prev_max_end = np.maximum.accumulate(ce)
    first = np.ones(n, dtype=bool)
    first[1:] = cs[1:] >= prev_max_end[:-1]
    if not first.all():
        heads = np.flatnonzero(first)
        cid = np.cumsum(first) - 1
        size = np.diff(np.append(heads, n))
        u0 = np.minimum.reduceat(bs, heads)
        u1 = np.maximum.reduceat(be, heads)
        excl = np.cumsum(L) - L
        fits = (size > 1) & (np.add.reduceat(L, heads) == u1 - u0)
        sel = fits[cid]
        new_bs = u0[cid] + excl - excl[heads][cid]
        bs = np.where(sel, new_bs, bs)
        be = np.where(sel, new_bs + L, be)

    # Trimmed offsets (span shorter than the surface, e.g. `Ġword` reported without its space):
    # extend the start back over the surface when that does not run into the previous token.
    short = L > be - bs
    if short.any():
        prev_end = np.concatenate(([0], be[:-1]))
        cand = be - L
        ok = short & (cand >= prev_end) & (cand >= 0)
        bs = np.where(ok, cand, bs)

    # Text that no token's offsets cover (a normalizer merged or dropped characters, e.g. NFKC
    # composing "e\u0301" and pointing only at the "e") is given to the token before it (the first
    # token for a leading gap), which then is not exact. Gaps of ASCII whitespace only (pre-tokenizers
    # that drop spaces) are left alone.
    run_end = np.maximum.accumulate(be)
    gap_lo = np.concatenate(([0], run_end))
    gap_hi = np.concatenate((bs, [len(tb)]))
    has_gap = gap_hi > gap_lo
    if has_gap.any():
        nonspace = np.concatenate(([0], np.cumsum(~_ASCII_SPACE[np.frombuffer(tb, dtype=np.uint8)])))
        fill = np.flatnonzero(has_gap & (nonspace[np.maximum(gap_hi, gap_lo)] > nonspace[gap_lo]))
        if len(fill) and fill[0] == 0:
            bs[0] = 0
        k = fill[fill > 0] - 1  # gap after token k
        be[k] = gap_hi[k + 1]

    exact = known & (L > 0) & (be - bs == L) & (bs >= 0) & (be <= len(tb))
    exact &= ~_bytes_differ(surf, tb, ids, bs, L, exact)
    return TokenSpans(ids, bs, be, exact, cs, ce)


def _bytes_differ(surf: Surfaces, tb: bytes, ids, bs, L, check) -> np.ndarray:
    """bool [n]: for tokens in `check`, whether surface bytes differ from text bytes at bs."""
    k = np.flatnonzero(check)
    out = np.zeros(len(ids), dtype=bool)
    out[k] = surface_mismatch(surf, ids[k], np.frombuffer(tb, dtype=np.uint8), bs[k], L[k])
    return out


def surface_mismatch(surf: Surfaces, ids: np.ndarray, text: np.ndarray, starts: np.ndarray,
                     lengths: np.ndarray) -> np.ndarray:
    """bool [Q]: whether the first lengths[q] bytes of token ids[q]'s surface differ from
    text[starts[q] : starts[q] + lengths[q]] (uint8 text; a byte outside it differs). Every ids[q]
    must be a valid token whose surface holds at least lengths[q] bytes. One vectorized pass over
    all compared bytes, no per-token loop."""
    lk = np.asarray(lengths, dtype=np.int64)
    if len(lk) == 0:
        return np.zeros(0, dtype=bool)
    owner = np.repeat(np.arange(len(lk)), lk)
    within = np.arange(int(lk.sum())) - np.repeat(np.cumsum(lk) - lk, lk)
    pos = np.asarray(starts, dtype=np.int64)[owner] + within
    inside = (pos >= 0) & (pos < len(text))
    text_b = np.where(inside, text[clamp_index(pos, max(len(text), 1))], -1)
    surf_b = surf.flat[surf.offsets[ids][owner] + within].astype(np.int64)
    return np.bincount(owner, weights=(text_b != surf_b), minlength=len(lk)) > 0


# ---------------------------------------------------------------------------------------------------
# Alignment.

def align_spans(src_starts, src_ends, tgt_starts, tgt_ends, src_valid=None, tgt_valid=None) -> np.ndarray:
    """int64 [n_tgt]: for each target token the index of the source token with exactly the same
    (start, end) span, else -1. Tokens with valid=False never match; a span held by two valid
    source tokens is ambiguous and matches nothing. O((n+m) log n), no Python loop over tokens."""
    ss, se = np.asarray(src_starts, dtype=np.int64), np.asarray(src_ends, dtype=np.int64)
    ts, te = np.asarray(tgt_starts, dtype=np.int64), np.asarray(tgt_ends, dtype=np.int64)
    sv = np.ones(len(ss), dtype=bool) if src_valid is None else np.asarray(src_valid, dtype=bool).copy()
    tv = np.ones(len(ts), dtype=bool) if tgt_valid is None else np.asarray(tgt_valid, dtype=bool).copy()
    sv &= (ss >= 0) & (se >= ss)
    tv &= (ts >= 0) & (te >= ts)
    out = np.full(len(ts), -1, dtype=np.int64)
    src_idx = np.flatnonzero(sv)
    if len(src_idx) == 0 or not tv.any():
        return out
    keys = (ss[src_idx] << 32) | se[src_idx]
    order = np.argsort(keys, kind="stable")
    keys, src_idx = keys[order], src_idx[order]
    dup = np.zeros(len(keys), dtype=bool)
    same = keys[1:] == keys[:-1]
    dup[1:] |= same
    dup[:-1] |= same
    tkeys = (ts << 32) | te
    pos = np.searchsorted(keys, tkeys)
    posc = np.minimum(pos, len(keys) - 1)
    hit = tv & (pos < len(keys)) & (keys[posc] == tkeys) & ~dup[posc]
    out[hit] = src_idx[posc[hit]]
    return out


def _as_bytes(t) -> bytes:
    return t if isinstance(t, (bytes, bytearray)) else str(t).encode("utf-8")


def edit_distance_matrix(a: Sequence[bytes], b: Sequence[bytes]) -> np.ndarray:
    """int64 [len(a), len(b)] Levenshtein distances between byte strings (rapidfuzz's C++ cdist)."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    return cdist(list(a), list(b), scorer=Levenshtein.distance, dtype=np.int64).reshape(len(a), len(b))


def dtw_path(cost: np.ndarray) -> list[tuple[int, int]]:
    """Minimum-cost monotone path (0,0)->(n-1,m-1) over `cost` [n, m] with steps (1,1), (1,0), (0,1).

    Accumulation is row by row: x_j = c_j + min(up_j, x_{j-1}) with up_j = min(D[i-1,j], D[i-1,j-1])
    unrolls to prefix sums and a cumulative min. Backtracking (n+m steps) prefers diagonal, then up,
    then left, as FuseLLM's dtw does.
    """
    n, m = cost.shape
    c = cost.astype(np.float64)
    D = np.empty((n, m), dtype=np.float64)
    D[0] = np.cumsum(c[0])
    for i in range(1, n):
        up = D[i - 1].copy()
        up[1:] = np.minimum(up[1:], D[i - 1, :-1])
        S = np.cumsum(c[i])
        S_prev = S - c[i]
        D[i] = S + np.minimum.accumulate(up - S_prev)
    path = []
    i, j = n - 1, m - 1
    while i > 0 or j > 0:
        path.append((i, j))
        diag = D[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        upv = D[i - 1, j] if i > 0 else np.inf
        left = D[i, j - 1] if j > 0 else np.inf
        if diag <= upv and diag <= left:
            i, j = i - 1, j - 1
        elif upv <= left:
            i -= 1
        else:
            j -= 1
    path.append((0, 0))
    path.reverse()
    return path


def align_mined(src_tokens: Sequence, tgt_tokens: Sequence) -> np.ndarray:
    """int64 [n_tgt]: MinED alignment (FuseLLM) for tokenizers without offsets.

    Tokens are their real surfaces (str or bytes; see token_surface). DTW over tokens with edit
    distance as cell cost; a target token takes its source token when the path pairs them one to one
    (FuseLLM only asks that the target have one source token; asking it of the source too stops a
    repeated token such as " " from being reused far from its place) and both surfaces are equal.
    Distances are computed once per pair of distinct token strings.
    """
    a = [_as_bytes(t) for t in src_tokens]
    b = [_as_bytes(t) for t in tgt_tokens]
    out = np.full(len(b), -1, dtype=np.int64)
    if not a or not b:
        return out
    # One id per distinct token string across both sides: equal ids <=> equal surfaces.
    uniq, inv = np.unique(np.array(a + b, dtype=object), return_inverse=True)
    inv = inv.reshape(-1)
    ia, ib = inv[:len(a)], inv[len(a):]
    ua, ra = np.unique(ia, return_inverse=True)
    ub, rb = np.unique(ib, return_inverse=True)
    dist = edit_distance_matrix([uniq[u] for u in ua], [uniq[u] for u in ub])
    cost = dist[ra.reshape(-1)[:, None], rb.reshape(-1)[None, :]]
    path = np.array(dtw_path(cost), dtype=np.int64)
    si, tj = path[:, 0], path[:, 1]
    one = (np.bincount(tj, minlength=len(b))[tj] == 1) & (np.bincount(si, minlength=len(a))[si] == 1)
    sel = one & (ia[si] == ib[tj])
    out[tj[sel]] = si[sel]
    return out


# ---------------------------------------------------------------------------------------------------
# The response region of a chat rendering, and the 1:1 alignment of two of them.

@dataclass
class ResponseTokens:
    """The response-region tokens of one chat rendering, with byte spans relative to the response.

    Response tokens are those encode_chat labels: from the first token whose character span ends
    after the prompt boundary to the end of the text (end-of-turn and template tail included). A
    token straddling the boundary (Vicuna's `▁The` after "ASSISTANT:") starts before byte 0.
    """
    ids: np.ndarray  # int64 [n]
    starts: np.ndarray  # int64 [n]: byte span relative to the response's first byte in the rendering
    ends: np.ndarray  # int64 [n]
    exact: np.ndarray  # bool [n]: surface bytes == rendering bytes under the span
    text: np.ndarray  # uint8: the whole rendering, UTF-8
    base: int  # byte offset of the response's first byte in the rendering


def response_tokens(tok, text: str, resp_start: int, response: str) -> ResponseTokens:
    """Tokenize a rendering (prompt + response region, `resp_start` = len(prompt text)) with exact byte
    spans; raises ValueError when `response` is not verbatim after the prompt (a template that
    rewrites content)."""
    c = text.find(response, resp_start)
    if c < 0:
        raise ValueError("the response text does not appear verbatim after the prompt in the rendering "
                         "(does its chat template rewrite the message content, e.g. trim it?)")
    spans = token_spans(tok, text)
    first = _response_start(spans, resp_start)
    base = len(text[:c].encode("utf-8", "surrogatepass"))
    tb = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    return ResponseTokens(spans.ids[first:], spans.starts[first:] - base, spans.ends[first:] - base,
                          spans.exact[first:], tb, base)


def end_of_turn_index(rt: ResponseTokens, eot_id: Optional[int], n_resp: int) -> Optional[int]:
    """Index of the first `eot_id` token after the response text in `rt`, or None."""
    if eot_id is None:
        return None
    hit = np.flatnonzero((rt.ids == eot_id) & (rt.starts >= n_resp))
    return int(hit[0]) if len(hit) else None


@dataclass
class ResponseAlignment:
    """Target response position -> source response position (or -1), one to one."""
    tgt_to_src: np.ndarray  # int64 [n_tgt_resp]
    src_ids: np.ndarray  # int64 [n_src_resp]: the source's response ids (== teacher token_ids)
    tgt_ids: np.ndarray  # int64 [n_tgt_resp]
    method: str  # "copy" | "spans" | "mined"

    @property
    def transferred(self) -> int:
        return int((self.tgt_to_src >= 0).sum())


def _response_start(spans: TokenSpans, boundary: int) -> int:
    """Index of the first token whose character span ends after `boundary` (as encode_chat)."""
    after = np.flatnonzero(spans.char_ends > boundary)
    return int(after[0]) if len(after) else len(spans)


def align_response(
    src_tok, src_text: str, src_resp_start: int,
    tgt_tok, tgt_text: str, tgt_resp_start: int,
    response: str,
    src_eot_id: Optional[int] = None, tgt_eot_id: Optional[int] = None,
    method: str = "spans",
) -> ResponseAlignment:
    """One-to-one alignment of the response tokens of two chat renderings of the same `response`.

    src_text/tgt_text are full renderings (prompt + response region, as split_response gives them);
    *_resp_start is the character boundary len(prompt_text). Spans are compared relative to where
    `response` starts in each text, and only tokens lying wholly inside the response are matched.
    The end-of-turn tokens (*_eot_id, from profuser.chat.end_of_turn_id) are paired: the first one
    after the response on each side. Same tokenizer and same response-region ids: identity ("copy").
    method: "spans" (exact byte spans, default) or "mined" (DTW over the response tokens' surfaces).
    This is the 1:1 rule; profuser.transfer.project gives every covered position a distribution.
    """
    if method not in ("spans", "mined"):
        raise ValueError(f"method must be 'spans' or 'mined', got {method!r}")
    try:
        src = response_tokens(src_tok, src_text, src_resp_start, response)
    except ValueError as e:
        raise ValueError(f"source: {e}") from None
    try:
        tgt = response_tokens(tgt_tok, tgt_text, tgt_resp_start, response)
    except ValueError as e:
        raise ValueError(f"target: {e}") from None
    if (same_tokenizer(src_tok, tgt_tok) and src_text[src_resp_start:] == tgt_text[tgt_resp_start:]
            and np.array_equal(src.ids, tgt.ids)):
        return ResponseAlignment(np.arange(len(tgt.ids), dtype=np.int64), src.ids, tgt.ids, "copy")
    n_resp = len(response.encode("utf-8", "surrogatepass"))
    if method == "spans":
        a_ok = src.exact & (src.starts >= 0) & (src.ends <= n_resp)
        b_ok = tgt.exact & (tgt.starts >= 0) & (tgt.ends <= n_resp)
        out = align_spans(src.starts, src.ends, tgt.starts, tgt.ends, a_ok, b_ok)
    else:
        # Offsets are not trusted here: DTW over every response-region token's surface.
        sa, sb = surfaces(src_tok).surfaces, surfaces(tgt_tok).surfaces
        out = align_mined([sa[i] for i in src.ids], [sb[i] for i in tgt.ids])
    a_eot, b_eot = end_of_turn_index(src, src_eot_id, n_resp), end_of_turn_index(tgt, tgt_eot_id, n_resp)
    if a_eot is not None and b_eot is not None:
        out[b_eot] = a_eot
    return ResponseAlignment(out, src.ids, tgt.ids, method)


def align_text(src_tok, tgt_tok, text: str, method: str = "spans") -> ResponseAlignment:
    """align_response for a plain text tokenized on its own by both tokenizers."""
    return align_response(src_tok, text, 0, tgt_tok, text, 0, text, method=method)
