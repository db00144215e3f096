"""Source -> target vocabulary mapping and top-k re-expression (docs/ARCHITECTURE.md, "Cross-tokenizer
transfer").

A source id maps to the target id with the same surface bytes (profuser.align.token_surface:
byte-level decoded, `▁` -> space, `<0xNN>` -> the byte), so `ĠcafÃ©` and `▁café` meet as b" café".
Special tokens never match by surface; they map by role (eos -> eos, bos -> bos, unk -> unk) and by
explicit pairs such as each template's end-of-turn token. When a target surface is held by several
ids, the one the target tokenizer would produce wins: a regular vocabulary entry over a byte-fallback
piece over an added token. A source id without an identical target surface then maps, by mode:
- "prefix" (default): to the target token whose surface is the longest prefix of the source
  surface — the token a target starts that continuation with (` cats` -> ` cat` when the target has
  no ` cats`): the teacher's probability of ` cats` is probability of a continuation the target
  begins with ` cat`;
- "exact": nowhere (-1);
- "soft": to the target id at the smallest edit distance (FuseLLM's soft vocabulary alignment),
  among candidates that agree on the leading space and on the first byte after it, and have a
  similar length.
`prefix_table` extends the prefix rule to every byte offset inside a source surface (what a target
token that starts in the middle of a source token is predicted from, profuser.transfer).
`prefix_trie` holds the target vocabulary as a byte trie, for the longest target token starting a
string made of observed text plus a candidate's surface (transfer steps 3, 5, 6).

Tables are int64 with -1 for "no counterpart", computed once per (source, target) and cached as
.npy keyed by both tokenizers' fingerprints.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from profuser.align import Surfaces, edit_distance_matrix, same_tokenizer, surfaces

MAP_VERSION = 2  # bump when the mapping rules change, to invalidate caches
VOCAB_MAPPINGS = ("prefix", "exact", "soft")
PAD_ID = -1
PAD_LOGPROB = float("-inf")


def _role_pairs(src_tok, tgt_tok) -> dict[int, int]:
    pairs = {}
    for role in ("unk_token_id", "bos_token_id", "eos_token_id"):
        a, b = getattr(src_tok, role, None), getattr(tgt_tok, role, None)
        if isinstance(a, int) and isinstance(b, int):
            pairs[a] = b
    return pairs


def _target_index(t: Surfaces) -> dict[bytes, int]:
    """surface -> canonical target id (regular entry > byte-fallback piece > added token)."""
    index: dict[bytes, int] = {}
    rank: dict[bytes, int] = {}
    for i, s in enumerate(t.surfaces):
        if t.special[i] or not s:
            continue
        r = 2 if t.added[i] else 1 if t.byte_fallback[i] else 0
        if s not in index or r < rank[s]:
            index[s], rank[s] = i, r
    return index


def build_vocab_map(
    src_tok, tgt_tok, mode: str = "prefix", special_pairs: Optional[dict[int, int]] = None,
    soft_max_ratio: float = 0.5, by_byte: Optional[np.ndarray] = None,
) -> np.ndarray:
    """int64 [source vocab]: target id with the same surface, else by `mode` (see the module
    docstring), else -1.

    special_pairs: extra {source id: target id} applied last (e.g. end-of-turn tokens).
    mode "soft": unmapped non-special source ids take the nearest target surface by edit distance
    when distance <= soft_max_ratio * len(source surface).
    by_byte: prefix_table's output for this pair and mode, when already computed.
    Identical tokenizers give the identity table.
    """
    if mode not in VOCAB_MAPPINGS:
        raise ValueError(f"vocab map mode must be one of {VOCAB_MAPPINGS}, got {mode!r}")
    s, t = surfaces(src_tok), surfaces(tgt_tok)
    n_src = len(s.surfaces)
    if same_tokenizer(src_tok, tgt_tok):
        out = np.arange(n_src, dtype=np.int64)
    else:
        if by_byte is None:
            by_byte = prefix_table(src_tok, tgt_tok, exact_only=mode != "prefix")
        out = np.where(s.lengths > 0, by_byte[np.minimum(s.offsets, max(len(by_byte) - 1, 0))], -1)
        if mode == "soft":
            _soft_fill(out, s, t, soft_max_ratio)
    for a, b in {**_role_pairs(src_tok, tgt_tok), **(special_pairs or {})}.items():
        if 0 <= a < n_src and 0 <= b < len(t.surfaces):
            out[a] = b
    return out


def prefix_table(src_tok, tgt_tok, exact_only: bool = False) -> np.ndarray:
    """int64 [total surface bytes of the source vocabulary]: entry offsets[i] + d (profuser.align.
    Surfaces) is the target id for source token i's surface from byte d on: the target token whose
    surface is the longest prefix of it (identical surfaces included), or, with exact_only, the one
    whose surface equals it; -1 when none, and for every byte of special source tokens (they map by
    role, see build_vocab_map). One pass over the source vocabulary's suffixes, stopping at the first
    byte no target surface continues with."""
    s, t = surfaces(src_tok), surfaces(tgt_tok)
    index = _target_index(t)
    out = np.full(len(s.flat), -1, dtype=np.int64)
    if exact_only:
        for i, b in enumerate(s.surfaces):
            if s.special[i] or not b:
                continue
            o = int(s.offsets[i])
            for d in range(len(b)):
                out[o + d] = index.get(b[d:], -1)
        return out
    prefixes = {b[:n] for b in index for n in range(1, len(b) + 1)}
    for i, b in enumerate(s.surfaces):
        if s.special[i] or not b:
            continue
        o, n = int(s.offsets[i]), len(b)
        for d in range(n):
            best = -1
            for e in range(d + 1, n + 1):
                piece = b[d:e]
                if piece not in prefixes:
                    break
                best = index.get(piece, best)
            out[o + d] = best
    return out


@dataclass
class PrefixTrie:
    """The target vocabulary's surfaces as a byte trie (node 0 = the empty prefix), for the longest
    target token that starts a byte string built from two pieces: a stretch of observed text and a
    source candidate's surface (profuser.transfer). Built from the same canonical ids as
    prefix_table (_target_index)."""
    keys: np.ndarray  # int64, sorted: parent node * 256 + byte
    child: np.ndarray  # int64 [len(keys)]: the node that edge leads to
    edges: np.ndarray  # uint8 [nodes, 32]: bit (b & 7) of byte b >> 3 set when the node has an edge b
    term: np.ndarray  # int64 [nodes]: canonical target id whose surface is the node's prefix, -1 none
    # the walk along every target id's own surface, flat like Surfaces (entry offsets[id] + n - 1 =
    # after its first n bytes): node (-1 off the trie: special tokens), longest target surface so
    # far and its length (-1, 0 none)
    offsets: np.ndarray  # int64 [V]
    node_along: np.ndarray  # int64 [total surface bytes]
    best_along: np.ndarray  # int64
    best_len_along: np.ndarray  # int64


_TRIES: dict[str, PrefixTrie] = {}


def prefix_trie(tgt_tok) -> PrefixTrie:
    """The PrefixTrie of `tgt_tok`'s vocabulary, cached per tokenizer fingerprint in this process
    (one pass over the surfaces: 3 s for Gemma-3's 262k vocabulary, 588k nodes; its edge bits take
    32 bytes a node, 19 MB there)."""
    t = surfaces(tgt_tok)
    key = f"{t.fingerprint}:{len(t.surfaces)}"
    if key in _TRIES:
        return _TRIES[key]
    index = _target_index(t)
    node: dict[bytes, int] = {b"": 0}
    keys: list[int] = []
    for s in index:
        for n in range(1, len(s) + 1):
            p = s[:n]
            if p not in node:
                keys.append(node[p[:-1]] * 256 + p[-1])
                node[p] = len(node)
    term = np.full(len(node), -1, dtype=np.int64)
    for s, i in index.items():
        term[node[s]] = i
    k = np.asarray(keys, dtype=np.int64)
    order = np.argsort(k, kind="stable")
    along = np.full(len(t.flat), -1, dtype=np.int64)
    for i, u in enumerate(t.surfaces):
        o = int(t.offsets[i])
        for n in range(1, len(u) + 1):
            v = node.get(u[:n])
            if v is None:
                break
            along[o + n - 1] = v
    # the longest match so far: the last byte along the surface where a target surface ends (a
    # running max of its flat position, not reaching back past the surface's first byte)
    match = np.where(along >= 0, term[np.maximum(along, 0)], -1)
    starts = np.repeat(t.offsets, t.lengths)
    last = np.maximum.accumulate(np.where(match >= 0, np.arange(len(t.flat)), -1))
    last = np.where(last >= starts, last, -1)
    best = np.where(last >= 0, match[np.maximum(last, 0)], -1)
    best_len = np.where(last >= 0, last - starts + 1, 0)
    edges = np.zeros((len(node), 32), dtype=np.uint8)
    np.bitwise_or.at(edges, (k >> 8, (k & 255) >> 3), (1 << (k & 7)).astype(np.uint8))
    trie = PrefixTrie(k[order], np.arange(1, len(node), dtype=np.int64)[order], edges, term,
                      t.offsets.astype(np.int64), along, best, best_len)
    _TRIES[key] = trie
    return trie


def _has_edge(trie: PrefixTrie, node: np.ndarray, byte: np.ndarray) -> np.ndarray:
    """bool: the trie has an edge from `node` (>= 0) by `byte` (PrefixTrie.edges)."""
    return ((trie.edges.ravel()[node * 32 + (byte >> 3)] >> (byte & 7)) & 1) == 1


def trie_extends(trie: PrefixTrie, node: np.ndarray, surf: Surfaces, ids: np.ndarray, skip) -> np.ndarray:
    """bool (broadcast shape): trie_continue from `node` (-1: off the trie) with source token ids'
    surface from byte `skip` on gets past that surface's first byte. Where not, trie_continue returns
    the state's own longest match, so a caller that only wants longer matches can leave the query out."""
    node, ids, skip = np.broadcast_arrays(np.asarray(node, dtype=np.int64), np.asarray(ids, dtype=np.int64),
                                          np.asarray(skip, dtype=np.int64))
    ok = (node >= 0) & (ids >= 0) & (ids < len(surf.lengths))
    ok &= surf.lengths[np.where(ok, ids, 0)] > skip
    q = np.nonzero(ok)
    ok[q] = _has_edge(trie, node[q], surf.flat[surf.offsets[ids[q]] + skip[q]].astype(np.int64))
    return ok


def _walk(trie: PrefixTrie, node: np.ndarray, done: np.ndarray, best: np.ndarray, best_len: np.ndarray,
          flat: np.ndarray, at: np.ndarray, total: np.ndarray, exact: bool):
    """The trie walk itself: query q stands at `node` after `done` bytes of its string, whose byte i
    (done <= i < total) is flat[at + i]; walks on to `total` bytes, recording the longest target
    surface met (with `exact`: only at the last byte). Returns (node, -1 once off the trie; best id;
    its length), new arrays. One step per byte for all walking queries at once, on compacted arrays
    (most walks end within a byte or two)."""
    node, best, best_len = node.copy(), best.copy(), best_len.copy()
    q = np.flatnonzero((node >= 0) & (total > done))
    p, left = at[q] + done[q], total[q] - done[q]  # where the next byte is in flat; bytes to go
    if len(q) and (p.min() < 0 or (p + left).max() > len(flat)):
        raise ValueError("trie walk: a query's bytes lie outside the given byte array")
    nd = node[q]
    while len(q):
        c = flat[p].astype(np.int64)
        found = _has_edge(trie, nd, c)  # no key search for the walks that end here
        if not found.all():
            node[q[~found]] = -1
            q, nd, c, p, left = q[found], nd[found], c[found], p[found], left[found]
        nd = trie.child[np.searchsorted(trie.keys, nd * 256 + c)]
        p, left = p + 1, left - 1
        term = trie.term[nd]
        hit = (term >= 0) & (left == 0) if exact else term >= 0
        best[q[hit]], best_len[q[hit]] = term[hit], total[q[hit]] - left[hit]
        end = left == 0
        if end.any():
            node[q[end]] = nd[end]
            go = ~end
            q, nd, p, left = q[go], nd[go], p[go], left[go]
    return node, best, best_len


def trie_continue(trie: PrefixTrie, node: np.ndarray, done: np.ndarray, best: np.ndarray, best_len: np.ndarray,
                  surf: Surfaces, ids: np.ndarray, skip: np.ndarray, exact: bool = False):
    """Go on from trie states (node after `done` bytes, longest match so far: PrefixTrie.node_along
    or a walk over text) with source token ids[q]'s surface from byte skip[q] on: (target id, length
    in bytes) of the longest target surface that is a prefix of the whole string — with `exact`, only
    one equal to it — else (-1, 0)."""
    ids, done = np.asarray(ids, dtype=np.int64), np.asarray(done, dtype=np.int64)
    total = done + surf.lengths[ids] - skip
    best = np.where(total == done, best, -1) if exact else np.asarray(best, dtype=np.int64)
    best_len = np.where(best >= 0, best_len, 0).astype(np.int64)
    _, best, best_len = _walk(trie, np.asarray(node, dtype=np.int64), done, best, best_len, surf.flat,
                              surf.offsets[ids] + skip - done, total, exact)
    return best, best_len


def trie_walk(trie: PrefixTrie, text: np.ndarray, start: np.ndarray, length: np.ndarray, surf: Surfaces,
              ids: np.ndarray, skip: np.ndarray, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """For every query q, the byte string text[start[q] : start[q] + length[q]] followed by source
    token ids[q]'s surface from byte skip[q] on: (target id, its length in bytes) of the longest
    target surface that is a prefix of the string — with `exact`, only one equal to the whole
    string — else (-1, 0). Vectorized over the queries, one trie step per byte: a walk over the
    text, then trie_continue (profuser.transfer starts from PrefixTrie.node_along instead, the
    recorded state inside a target token whose text is its surface)."""
    start, length = np.asarray(start, dtype=np.int64), np.asarray(length, dtype=np.int64)
    Q = len(start)
    zero = np.zeros(Q, dtype=np.int64)
    node, best, blen = _walk(trie, zero, zero, np.full(Q, -1, dtype=np.int64), zero, text, start, length, False)
    return trie_continue(trie, node, length, best, blen, surf, ids, np.asarray(skip, dtype=np.int64), exact)


def _soft_fill(out: np.ndarray, s: Surfaces, t: Surfaces, max_ratio: float, budget: int = 4_000_000) -> None:
    """Fill -1 entries of `out` (non-special sources) with the nearest target by edit distance.

    Candidates share the leading-space flag and first byte after it (a space-prefixed word never
    maps to a bare piece) and have a length within -2..+8 of the chunk's shortest source. Distances
    come from rapidfuzz (align.edit_distance_matrix); the chunks keep the sizes of the former numpy
    version (`budget` cells of a [sources, candidates, length] tensor) because they set the
    candidates' length window, so the tables stay the same (MAP_VERSION)."""
    todo = [i for i in np.flatnonzero(out < 0) if not s.special[i] and s.surfaces[i]]
    index = _target_index(t)

    def key(b: bytes) -> tuple[bool, bytes]:  # leading space?, first byte after it
        return b[:1] == b" ", b.lstrip(b" ")[:1]

    buckets: dict[tuple, list[int]] = {}
    for b, i in index.items():
        buckets.setdefault(key(b), []).append(i)
    by_first: dict[tuple, list[int]] = {}
    for i in todo:
        by_first.setdefault(key(s.surfaces[i]), []).append(i)
    for first, src_ids in by_first.items():
        cands = np.array(sorted(buckets.get(first, [])), dtype=np.int64)
        if len(cands) == 0:
            continue
        cl = t.lengths[cands]
        src_ids = sorted(src_ids, key=lambda i: len(s.surfaces[i]))
        k = 0
        while k < len(src_ids):
            lo = len(s.surfaces[src_ids[k]])
            near = cands[(cl >= lo - 2) & (cl <= lo + 8)]
            width = int(t.lengths[near].max()) + 1 if len(near) else 1
            step = max(1, min(256, budget // max(1, len(near) * width)))
            part = [i for i in src_ids[k:k + step] if len(s.surfaces[i]) <= lo + 6]
            k += len(part)
            lens = np.array([len(s.surfaces[i]) for i in part])
            near = near[(t.lengths[near] <= lens.max() + 2)]
            if len(near) == 0:
                continue
            d = edit_distance_matrix([s.surfaces[i] for i in part], [t.surfaces[j] for j in near])
            # Prefer small distance, then similar length, then the lower id.
            score = d * 1024 + np.abs(t.lengths[near][None, :] - lens[:, None])
            best = np.argmin(score, axis=1)
            dbest = d[np.arange(len(part)), best]
            ok = dbest <= max_ratio * lens
            out[np.array(part)[ok]] = near[best[ok]]


def pair_tables(src_tok, tgt_tok, mode: str = "prefix", special_pairs: Optional[dict[int, int]] = None,
                soft_max_ratio: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(whole-token map [source vocab], by-byte table [source surface bytes]) for profuser.transfer:
    build_vocab_map's table, and prefix_table (longest prefix in "prefix" mode, identical surfaces
    in "exact"/"soft" mode: soft matching is FuseLLM's rule for whole tokens only)."""
    by_byte = prefix_table(src_tok, tgt_tok, exact_only=mode != "prefix")
    return build_vocab_map(src_tok, tgt_tok, mode, special_pairs, soft_max_ratio, by_byte), by_byte


def cache_dir() -> Path:
    """Where the tables are cached: the user cache (prep.shards.user_cache_dir)/vocab_maps. Keys are
    content fingerprints of both tokenizers, so every run and the preflight share them."""
    from profuser.prep.shards import user_cache_dir

    return user_cache_dir() / "vocab_maps"


def load_pair_tables(src_tok, tgt_tok, cache_dir, mode: str = "prefix",
                     special_pairs: Optional[dict[int, int]] = None,
                     soft_max_ratio: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """pair_tables, cached as cache_dir/pair-<key>.npz (written atomically)."""
    cache_dir = Path(cache_dir)
    path = cache_dir / f"pair-{vocab_map_key(src_tok, tgt_tok, mode, special_pairs, soft_max_ratio)}.npz"
    if path.exists():
        with np.load(path) as z:
            return z["first"], z["by_byte"]
    first, by_byte = pair_tables(src_tok, tgt_tok, mode, special_pairs, soft_max_ratio)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, first=first, by_byte=by_byte)
    os.replace(tmp, path)
    return first, by_byte


def vocab_map_key(src_tok, tgt_tok, mode: str, special_pairs: Optional[dict[int, int]] = None,
                  soft_max_ratio: float = 0.5) -> str:
    h = hashlib.sha256()
    extra = {"v": MAP_VERSION, "mode": mode, "pairs": sorted((special_pairs or {}).items()),
             "roles": sorted(_role_pairs(src_tok, tgt_tok).items()),
             "soft_max_ratio": soft_max_ratio if mode == "soft" else None}
    for part in (surfaces(src_tok).fingerprint, surfaces(tgt_tok).fingerprint, json.dumps(extra)):
        h.update(part.encode())
    return h.hexdigest()[:24]


def load_or_build_vocab_map(
    src_tok, tgt_tok, cache_dir, mode: str = "prefix", special_pairs: Optional[dict[int, int]] = None,
    soft_max_ratio: float = 0.5,
) -> np.ndarray:
    """build_vocab_map, cached as cache_dir/vocab_map-<key>.npy (written atomically)."""
    cache_dir = Path(cache_dir)
    path = cache_dir / f"vocab_map-{vocab_map_key(src_tok, tgt_tok, mode, special_pairs, soft_max_ratio)}.npy"
    if path.exists():
        return np.load(path)
    table = build_vocab_map(src_tok, tgt_tok, mode, special_pairs, soft_max_ratio)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, table)
    os.replace(tmp, path)
    return table


def merge_entries(ids, lps, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: merge equal ids by log-sum-exp, drop ids < 0 and -inf entries, keep the k most
    probable, left-packed in descending order (ties: lower id first), padded with PAD_ID /
    PAD_LOGPROB. ids/lps [R, K'] -> ([R, k] int64, [R, k] float32). merge_flat on the rows' cells."""
    ids = np.asarray(ids, dtype=np.int64)
    R, W = ids.shape
    return merge_flat(np.repeat(np.arange(R), W), ids.ravel(), np.asarray(lps, dtype=np.float64).ravel(), R, k)


def merge_flat(rows, ids, lps, R: int, k: int, keep=None) -> tuple[np.ndarray, np.ndarray]:
    """merge_entries for entries given as flat (row, id, log-prob) triples, any number per row (no
    [R, widest row] padding: one row with many entries costs only its own). Equal ids of a row are
    merged by log-sum-exp in the order the entries are given. keep: optional int64 [R], an id per row
    that keeps a place among the k when the row has an entry for it (it takes the k-th place when it
    ranks lower). Returns ([R, k] int64, [R, k] float32). No Python loop over entries: two sorts of
    the entries (by row and id, to merge; then by row and probability)."""
    rows = np.asarray(rows, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    lps = np.asarray(lps, dtype=np.float64)
    out_ids = np.full((R, k), PAD_ID, dtype=np.int64)
    out_lp = np.full((R, k), PAD_LOGPROB, dtype=np.float32)
    ok = (ids >= 0) & (lps > -np.inf)
    rows, ids, lps = rows[ok], ids[ok], lps[ok]
    if R == 0 or k == 0 or not len(ids):
        return out_ids, out_lp
    span = int(ids.max()) + 1
    key = rows * span + ids
    order = np.argsort(key, kind="stable")
    key, lv = key[order], lps[order]
    run = np.ones(len(key), dtype=bool)  # a run of equal (row, id) starts here
    run[1:] = key[1:] != key[:-1]
    if not run.all():  # log-sum-exp of each run
        starts = np.flatnonzero(run)
        top = np.maximum.reduceat(lv, starts)
        lv = top + np.log(np.add.reduceat(np.exp(lv - np.repeat(top, np.diff(np.append(starts, len(lv))))), starts))
        key = key[starts]
    r, i = key // span, key % span
    # rank in the row: most probable first, ties by lower id (the entries are in id order already)
    order = np.argsort(-lv, kind="stable")
    order = order[np.argsort(r[order], kind="stable")]
    r, i, lv = r[order], i[order], lv[order]
    rank = np.arange(len(r)) - np.searchsorted(r, r)
    sel = rank < k
    if keep is not None:
        late = ~sel & (i == np.asarray(keep, dtype=np.int64)[r])  # the kept id, ranked past k
        if late.any():
            bumped = np.zeros(R, dtype=bool)
            bumped[r[late]] = True
            sel = (sel & ~(bumped[r] & (rank == k - 1))) | late
            r, i, lv = r[sel], i[sel], lv[sel]
            rank = np.arange(len(r)) - np.searchsorted(r, r)
            sel = np.ones(len(r), dtype=bool)
    out_ids[r[sel], rank[sel]] = i[sel]
    out_lp[r[sel], rank[sel]] = lv[sel]
    return out_ids, out_lp


def map_topk(topk_ids, topk_logprobs, vocab_map: Optional[np.ndarray]):
    """Re-express top-k teacher distributions in target ids, entry by entry (the 1:1 rule).

    topk_ids [R, k] int (-1 = none), topk_logprobs [R, k] float: log-probs over the teacher's full
    vocabulary. vocab_map: build_vocab_map's table, or None for identical tokenizers (copy).
    Returns (ids [R, k] int64, logprobs [R, k] float32, kept_mass [R] float64):
    - unmapped entries (-1 or out-of-table ids) are dropped; ids that collide after mapping are
      merged by log-sum-exp (merge_entries); survivors left-packed in descending log-prob order.
    - log-probs stay teacher log-probs (not renormalized).
    - kept_mass = sum exp(kept) / sum exp(original entries); 0 for a row with no entries.
    """
    ids = np.asarray(topk_ids, dtype=np.int64)
    lp = np.asarray(topk_logprobs, dtype=np.float64)
    R, k = ids.shape
    valid = ids >= 0
    if vocab_map is None:
        mapped = np.where(valid, ids, PAD_ID)
    else:
        vm = np.asarray(vocab_map, dtype=np.int64)
        inb = valid & (ids < len(vm))
        mapped = np.where(inb, vm[np.where(inb, ids, 0)], PAD_ID)
    keep = mapped >= 0
    p = np.where(valid, np.exp(lp), 0.0)
    total = p.sum(axis=1)
    kept_mass = np.divide((p * keep).sum(axis=1), total, out=np.zeros(R), where=total > 0)
    out_ids, out_lp = merge_entries(mapped, np.where(keep, lp, -np.inf), k)
    return out_ids, out_lp, kept_mass


def aligned_topk(tgt_to_src, topk_ids, topk_logprobs, vocab_map: Optional[np.ndarray]):
    """Teacher rows for each target response position: row tgt_to_src[j] of the source's top-k,
    mapped to target ids (map_topk); positions with tgt_to_src == -1 get an all-PAD_ID row.

    tgt_to_src [T] int (align_response), topk_* [R, k] (teacher stage, label-aligned).
    Returns (ids [T, k] int64, logprobs [T, k] float32, kept_mass [T]: 0 where not aligned).
    """
    idx = np.asarray(tgt_to_src, dtype=np.int64)
    ids = np.asarray(topk_ids)
    hit = idx >= 0
    rows = np.full((len(idx), ids.shape[1]), PAD_ID, dtype=np.int64)
    lps = np.full((len(idx), ids.shape[1]), PAD_LOGPROB, dtype=np.float64)
    rows[hit] = ids[idx[hit]]
    lps[hit] = np.asarray(topk_logprobs, dtype=np.float64)[idx[hit]]
    return map_topk(rows, lps, vocab_map)
