"""Word lookahead (docs/ARCHITECTURE.md, "Word lookahead", `prep.lookahead`): the teacher's whole next
word at every response word start, so a target with another tokenizer is taught the words the
teacher means rather than the first pieces of its own segmentation.

Why: a teacher row at a word start offers first tokens (`▁`, `▁c`, `▁cat`, ...) whose meaning
depends on how the source's tokenizer goes on; the transfer rule (profuser.transfer) can only map
each one to a target token by its surface, so a Unigram source's `▁` (the start of many words)
gives all its mass to the target's bare space. Following every candidate to the end of its word
turns the row into a distribution over word texts, which any target tokenizer can spell.

Teacher side (`word_outcomes`, torch): at each response word start r (`word_starts`: a source token
of the response text whose surface starts with whitespace, or punctuation right after another token
of the text, whose row offers the next words as well), the teacher's top-k next tokens after the
context (prompt + response tokens before r) are followed to the end of their word by a beam over the
teacher's own continuations. A word-start candidate (whitespace, then word characters or nothing)
above `min_prob` starts a path (the observed token always); each step, every live path is extended
by at most `branch` word pieces (tokens whose surface is word characters only, `str.isalnum`),
`beam` paths are kept per word start, at most `steps` steps, and no path below `min_prob`. A path
whose text holds a word character yields the outcome "its text" with its probability times the
probability that the next token ends the word (a special token or one whose first character is not a
word character). A candidate that starts no word path (".", " (", "\\n\\n" ...) is an outcome of its
own surface; the source's end-of-turn token (`eot`) is the outcome EOT_OUTCOME, "the turn ends
here". The observed word (the tokens the source used) is always followed, beyond the beam's limits,
so its outcome is exact. Mass outside the top-k, the beam, the steps or the floor is lost, never
renormalized away. Compute (`_Tree`): every word start's context is a prefix of the sequence, so one
forward of the sequence gives every word start's first row and a KV cache all of them share; the
beam then runs as a token tree on that cache, every live path's newest token fed in one row per step
with its own position and a 4-D attention mask (the context up to its word start, its own earlier
tokens, itself; a sliding layer's window kept). Where the model's attention cannot be reproduced
that way (chunked attention, other layer types) each word start's context is prefilled on its own
(left padding, explicit positions) and the beam decodes one cache row per path
(Cache.reorder_cache); the outcomes are the same, the cost many times higher (docs/ARCHITECTURE.md,
"Word lookahead").

Align side (`apply_outcomes`, numpy): each outcome text is spelled with the target tokenizer
(`Speller`: the text between "Xx" and " xx", cached per text; None when the target's tokens do not
start and end at the text's bounds). Where the target's response tokens tile the observed word's
bytes exactly (the word start token through the last word piece the source used), the target
position t of the word gets P(next target token | the target's tokens of the word before t) over the
outcomes spelled with those tokens: at t = 0 the outcomes' own probabilities (not renormalized; the
rest goes to the loss's "other" bucket), at t > 0 divided by the mass of the outcomes consistent
with the prefix (conditioning, as the rule's step 1 does inside a source token). Every other
position keeps the rule's row.

The end-of-turn outcome is the target's end-of-turn token at t = 0 (the turn ends where the
word would start) and consistent with no longer prefix.

Approximations, stated: a target spells an outcome as it spells it between two words (the text
after it is not known); the end of a word is "the next token is not a word piece", so a token that
starts with a word character and goes on with others ("ing,") is lost mass; positions where the
target's tokens do not start and end at the observed word's bytes keep the rule.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

FRAME = ("Xx", " xx")  # the text a Speller spells an outcome between (a word before it, a word after it)
OUTCOMES_VERSION = 3  # bump when word_outcomes gives other outcomes (prep re-runs the lookahead; 2: EOT_OUTCOME;
# 3: a word-start candidate below min_prob starts no path)
EOT_OUTCOME = ""  # the outcome "the turn ends here": the source's end-of-turn token as a candidate (no text
# outcome is empty); the align stage gives it to the target's end-of-turn token, as the rule does


def _word(s: str) -> bool:
    return s != "" and all(c.isalnum() for c in s)


@dataclass(frozen=True)
class WordClasses:
    """Per token id of one tokenizer: its surface as text and what it does to a word."""
    text: list  # str per id, None for special tokens and surfaces that are not whole UTF-8 text
    start: np.ndarray  # bool [V]: the surface starts with whitespace (a word start)
    path: np.ndarray  # bool [V]: whitespace, then word characters or nothing: a word path starts here
    piece: np.ndarray  # bool [V]: word characters only: continues a word
    ender: np.ndarray  # bool [V]: ends a word before it (special, or its first character is no word character)
    punct: np.ndarray  # bool [V]: a text surface whose first character is no word character (".", " the", "\n")
    _masks: dict = field(default_factory=dict, compare=False, repr=False)  # (n, device) -> (piece, ender) tensors

    def masks(self, n: int, device):
        """piece and ender as bool tensors of length n (a head wider than the vocabulary pads False),
        on `device`, built once per (n, device)."""
        key = (n, str(device))
        if key not in self._masks:
            import torch

            pad = np.zeros(max(0, n - len(self.text)), dtype=bool)
            self._masks[key] = tuple(torch.tensor(np.concatenate([m[:n], pad]), device=device)
                                     for m in (self.piece, self.ender))
        return self._masks[key]


_CLASSES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def word_classes(tokenizer) -> WordClasses:
    """The tokenizer's WordClasses (cached per tokenizer; built from profuser.align.surfaces)."""
    from profuser.align import surfaces

    surf = surfaces(tokenizer)
    got = _CLASSES.get(tokenizer)
    if got is not None and len(got.text) == len(surf.surfaces):
        return got
    text: list = []
    for i, b in enumerate(surf.surfaces):
        if surf.special[i] or not b:
            text.append(None)
            continue
        try:
            text.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            text.append(None)
    n = len(text)
    start, path, piece, ender, punct = (np.zeros(n, dtype=bool) for _ in range(5))
    for i, s in enumerate(text):
        if s is None:
            ender[i] = bool(surf.special[i])
            continue
        start[i] = s[0].isspace()
        if start[i]:
            rest = s.lstrip()
            path[i] = rest == "" or _word(rest)
        piece[i] = _word(s)
        ender[i] = punct[i] = not s[0].isalnum()
    out = WordClasses(text, start, path, piece, ender, punct)
    try:
        _CLASSES[tokenizer] = out
    except TypeError:
        pass
    return out


def word_starts(token_ids, in_text, classes: WordClasses) -> np.ndarray:
    """Response rows r where the teacher's next word may start, among those whose observed token
    encodes response text: the observed token starts with whitespace, or it follows another token of
    the text and is punctuation (a text surface whose first character is no word character: the
    "." after "sings", where the teacher's alternatives are the next words)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    ok = (ids >= 0) & (ids < len(classes.start))
    text = np.asarray(in_text, dtype=bool)
    start = np.zeros(len(ids), dtype=bool)
    start[ok] = classes.start[ids[ok]]
    punct = np.zeros(len(ids), dtype=bool)
    punct[ok] = classes.punct[ids[ok]]
    punct[0:1] = False
    punct[1:] &= text[:-1]
    return np.flatnonzero((start | punct) & text)


def observed_end(token_ids, r: int, classes: WordClasses) -> int:
    """The last row of the observed word that starts at row r: r itself, or, when r starts a word
    path, the last of the word pieces that follow it."""
    ids = np.asarray(token_ids, dtype=np.int64)
    n, V = len(ids), len(classes.piece)
    if not (0 <= ids[r] < V and classes.path[ids[r]]):
        return r
    last = r
    while last + 1 < n and 0 <= ids[last + 1] < V and classes.piece[ids[last + 1]]:
        last += 1
    return last


# --------------------------------------------------------------------------------------------
# teacher side


@dataclass
class Outcomes:
    """One sequence's word outcomes, flat: outcome o belongs to the word start at response row rows[o]."""
    rows: list = field(default_factory=list)  # int: response row of the word start
    texts: list = field(default_factory=list)  # str: the outcome's text (from the word start's first byte)
    logprobs: list = field(default_factory=list)  # float: the teacher's log-prob of it
    paths: Optional[list] = None  # per outcome, the teacher token paths behind it (with `trace`)


@dataclass
class _Path:
    w: int  # word start (index into the chunk)
    toks: list  # teacher tokens from the word start on
    lp: float
    parent: int  # the cache row it extends (left-padded prefill)
    forced: bool  # the observed word's path
    anc: tuple = ()  # where its tokens before the newest were fed, counted after the context (token tree)


def _logits(model, keep, **kw):
    """The model's logits at positions `keep` (an int: that many last positions; a 1-D tensor: those
    positions) through `logits_to_keep` where the model takes it, and the cache."""
    if getattr(model, "_profuser_keep_last", True):
        try:
            out = model(logits_to_keep=keep, **kw)
            return out.logits, out.past_key_values
        except TypeError:
            model._profuser_keep_last = False
    out = model(**kw)
    logits = out.logits[:, -keep:] if isinstance(keep, int) else out.logits[:, keep]
    return logits, out.past_key_values


def _last_logits(model, **kw):
    """The model's logits at the last position only, and the cache."""
    logits, cache = _logits(model, 1, **kw)
    return logits[:, -1], cache


COST_KEYS = ("sequences", "tree_sequences", "word_starts", "outcomes", "prefill_tokens", "beam_tokens", "forwards")
_MASK_4D = ("sdpa", "eager")  # attention implementations that take an explicit 4-D attention mask


def _attention(model) -> Optional[str]:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


@dataclass(frozen=True)
class _Layout:
    """How the model's layers attend, as the token tree must mask them."""
    window: Optional[int] = None  # the sliding window (keys at most window - 1 positions back), if any layer has one
    types: Optional[tuple] = None  # layer types when the model takes a mask per type ({type: mask}), else one mask
    reason: Optional[str] = None  # why the tree cannot reproduce this attention


def _layout(model) -> _Layout:
    """Full attention, a sliding window on every layer (Mistral: one mask), or full and sliding layers
    (layer_types, Gemma-2/3 and Qwen2: a mask per type). Chunked attention (Llama 4) or other layer
    types: reason."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    if cfg is None:
        return _Layout()
    if getattr(cfg, "attention_chunk_size", None) is not None:
        return _Layout(reason=f"chunked attention ({cfg.attention_chunk_size} tokens)")
    window = getattr(cfg, "sliding_window", None)
    types = tuple(getattr(cfg, "layer_types", None) or ())
    if types:
        other = sorted(set(types) - {"full_attention", "sliding_attention"})
        if other:
            return _Layout(reason=f"layer types {other}")
        if "sliding_attention" not in types:
            return _Layout()
        if window is None:
            return _Layout(reason="sliding layers without a sliding_window")
        return _Layout(window, tuple(sorted(set(types))))
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None
    return _Layout(window)


def tree_note(model) -> str:
    """What word_outcomes' compute will be on this model, for the prep log: "" where every sequence
    is a token tree on the model's own attention."""
    notes = []
    if _attention(model) not in _MASK_4D:
        notes.append(f"its {_attention(model)!r} attention takes no 4-D mask: sdpa during the lookahead")
    layout = _layout(model)
    if layout.reason:
        notes.append(f"{layout.reason}: every word start's context is prefilled on its own (the same outcomes, "
                     "many times slower)")
    elif layout.window is not None:
        notes.append(f"sliding window {layout.window}, masked in the token tree")
    return f" ({'; '.join(notes)})" if notes else ""


class _Tree:
    """The sequence's context, shared by every word start, and the beam as a token tree on it.

    One forward of the sequence up to its last word start gives every word start's first rows (the
    logits at the end of its context) and the context's cache (batch 1, every layer's keys kept in
    full). Where the model's vocabulary projection splits off its body (profuser.models.split_head,
    as the teacher stage projects), the forward keeps the word starts' hidden states and a chunk's
    rows are projected when it runs, so no [word starts, vocabulary] tensor is held (0.5 MB per word
    start for a 262k vocabulary in bf16). A chunk of word starts then decodes its paths on that
    cache as one sequence: each step feeds every live path's newest token at once (position: its
    word start's context length + its depth), each seeing, through an explicit 4-D attention mask,
    the context up to its own word start, the tokens of its own path fed before, and itself, nothing
    else (and, on a sliding layer, nothing `window` or more positions back). The cache grows by the
    chunk's fed tokens and starts again from the context for the next chunk. `reason` says why the
    model does not allow it (an attention that takes no 4-D mask; chunked attention or other layer
    types; a cache it cannot reuse), else is None."""

    def __init__(self, model, seq: list, prompt_len: int, starts: list, device):
        import torch
        from transformers import DynamicCache

        from profuser.models import split_head

        self.T = prompt_len + max(starts)
        attn, self.layout = _attention(model), _layout(model)
        checked = getattr(model, "_profuser_tree_checks", {})  # the check's verdict per attention and layout
        key = (attn, self.layout)
        self.reason = (self.layout.reason if self.layout.reason else
                       None if attn in _MASK_4D else f"attention {attn!r} takes no 4-D mask") or checked.get(key)
        if self.reason:
            return
        at = torch.tensor([prompt_len + r - 1 for r in starts], device=device)
        ids = torch.tensor([seq[:self.T]], device=device)
        parts = split_head(model, seq)
        if parts is not None:  # the body once; the word starts' rows projected per chunk (self.rows)
            out = parts[0](input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
            self.hidden, self.project, cache = out.last_hidden_state[0, at], parts[1], out.past_key_values
        else:  # the model's own forward: every word start's logits at once
            logits, cache = _logits(model, at, input_ids=ids, past_key_values=DynamicCache(),
                                    use_cache=True)  # no config: no layer drops keys
            self.hidden, self.first = None, logits[0]
        layers = getattr(cache, "layers", None)
        if not layers or any(getattr(layer, "keys", None) is None or layer.keys.shape[-2] != self.T
                             for layer in layers):
            self.reason = f"a cache this code cannot reuse ({type(cache).__name__})"
            return
        self.kv = [(layer.keys, layer.values) for layer in layers]
        self.index = {r: i for i, r in enumerate(starts)}
        self.dtype = next(model.parameters()).dtype
        self.device = device
        if key not in checked:  # once per model, attention and layout
            checked[key] = self._check(model, seq)
            try:
                model._profuser_tree_checks = checked
            except AttributeError:
                pass
        self.reason = checked[key]

    def _check(self, model, seq: list) -> Optional[str]:
        """The context's last token fed again as a one-token tree on the context before it must give the
        shared forward's row there (the last word start's first row): None, else why not."""
        import torch

        ref = self.rows([max(self.index)])[0].float().log_softmax(-1)
        _, cache = self.chunk([])
        try:
            logits, _ = _logits(model, 1, input_ids=torch.tensor([[seq[self.T - 1]]], device=self.device),
                                attention_mask=self.mask([self.T - 1], [()], 0, 1),
                                position_ids=torch.tensor([[self.T - 1]], device=self.device), past_key_values=cache,
                                use_cache=True)
        except Exception as e:  # noqa: BLE001 - any failure means: not this way on this model
            return f"the model does not take the token tree's mask ({type(e).__name__}: {e})"
        top = ref.topk(min(20, ref.numel())).indices
        diff = float((logits[0, -1].float().log_softmax(-1)[top] - ref[top]).abs().max())
        tol = 1e-3 if self.dtype == torch.float32 else 0.25
        return None if diff <= tol else (f"a token tree row differs from the model's own forward by {diff:.3g} "
                                         f"(more than {tol}) in log-probability")

    def rows(self, chunk: list):
        """The logits at the end of each word start's context in `chunk` ([len(chunk), V])."""
        idx = [self.index[r] for r in chunk]
        return self.first[idx] if self.hidden is None else self.project(self.hidden[idx])

    def chunk(self, chunk: list):
        """The chunk's first logits and a fresh cache holding the context."""
        from transformers import DynamicCache

        return self.rows(chunk), DynamicCache(ddp_cache_data=[(k, v) for k, v in self.kv])

    def _mask(self, lens: list, ancestors: list, fed: int, s: int, window: Optional[int]):
        import torch

        n, dev = len(lens), self.device
        L = torch.tensor(lens, device=dev)[:, None]
        j = torch.arange(self.T, device=dev)[None, :]
        ok = torch.zeros((n, self.T + fed + n), dtype=torch.bool, device=dev)
        ctx = j < L
        if window is not None:  # the query sits at position L + s - 1
            ctx &= j > L + s - 1 - window
        ok[:, :self.T] = ctx
        # ancestor d (0-based depth) sits at position L + d: s - 1 - d positions back
        keep = [[(i, self.T + a) for d, a in enumerate(anc) if window is None or s - 1 - d < window]
                for i, anc in enumerate(ancestors)]
        cells = [c for row in keep for c in row]
        if cells:
            rows, cols = zip(*cells)
            ok[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)] = True
        diag = torch.arange(n, device=dev)
        ok[diag, self.T + fed + diag] = True
        out = torch.zeros(ok.shape, dtype=self.dtype, device=dev).masked_fill_(~ok, torch.finfo(self.dtype).min)
        return out[None, None]

    def mask(self, lens: list, ancestors: list, fed: int, s: int):
        """The additive attention mask ([1, 1, paths, T + fed + paths]; {layer type: mask} for a model
        with full and sliding layers) of one step whose paths hold s tokens: path i sees the context
        before lens[i], the tokens fed at ancestors[i] (indices after the context) and itself."""
        if self.layout.window is None:
            return self._mask(lens, ancestors, fed, s, None)
        sliding = self._mask(lens, ancestors, fed, s, self.layout.window)
        if self.layout.types is None:
            return sliding
        full = self._mask(lens, ancestors, fed, s, None)
        return {t: sliding if t == "sliding_attention" else full for t in self.layout.types}


def _padded_prefill(model, seq: list, lens: list, pad_id: int, device):
    """(last logits, cache, attention mask) of the contexts seq[:L] for L in lens, prefilled together
    with left padding and explicit positions."""
    import torch

    width = max(lens)
    ids = torch.full((len(lens), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lens), width), dtype=torch.long)
    for w, L in enumerate(lens):
        ids[w, width - L:] = torch.tensor(seq[:L])
        mask[w, width - L:] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    last, cache = _last_logits(model, input_ids=ids.to(device), attention_mask=mask.to(device),
                               position_ids=pos.to(device), use_cache=True)
    return last, cache, mask


def word_outcomes(model, seq: list[int], prompt_len: int, starts, classes: WordClasses, k: int, branch: int = 4,
                  beam: int = 32, steps: int = 8, min_prob: float = 1e-3, pad_id: int = 0,
                  batch_tokens: int = 16384, trace: bool = False, cost: Optional[dict] = None,
                  tree: Optional[bool] = None, eot: Optional[int] = None) -> Outcomes:
    """The teacher's word outcomes at response rows `starts` of `seq` (prompt + response tokens) by
    the beam in the module docstring. `eot`: the source's end-of-turn token id (profuser.chat.
    end_of_turn_id); as a candidate it is the outcome EOT_OUTCOME (None: its mass is lost).

    Compute: by default (`tree` None) one forward of the sequence shared by every word start, then
    the beam of up to batch_tokens // (beam x steps) word starts at a time as a token tree on its
    cache (`_Tree`), where the model allows it (`_Tree.reason`; a model on an attention that takes
    no 4-D mask, FlashAttention-2 say, runs on sdpa for the call and goes back after); else (or with
    `tree=False`) every word start's context prefilled on its own, batched with left padding (at
    most batch_tokens context tokens x beam per batch), and the beam decoded with one cache row per
    path. Both give the same outcomes; `tree=True` raises where the model does not allow the tree.
    `cost` (a dict) accumulates COST_KEYS: "sequences" (calls), "tree_sequences" (those computed as a
    tree), "word_starts", "outcomes", "prefill_tokens" (context tokens forwarded), "beam_tokens" (one
    per path and step) and "forwards"."""
    attn = _attention(model)
    switch = (tree is not False and len(starts) > 0 and attn not in _MASK_4D
              and hasattr(model, "set_attn_implementation"))
    if switch:
        try:
            model.set_attn_implementation("sdpa")
        except (ValueError, ImportError, NotImplementedError):  # the architecture has no sdpa: no tree
            switch = False
    try:
        return _word_outcomes(model, seq, prompt_len, starts, classes, k, branch, beam, steps, min_prob, pad_id,
                              batch_tokens, trace, cost, tree, eot)
    finally:
        if switch and _attention(model) != attn:
            model.set_attn_implementation(attn)


def _word_outcomes(model, seq, prompt_len, starts, classes, k, branch, beam, steps, min_prob, pad_id, batch_tokens,
                   trace, cost, tree, eot) -> Outcomes:
    import torch

    device = next(model.parameters()).device
    resp = [int(t) for t in seq[prompt_len:]]
    min_lp = math.log(min_prob) if min_prob > 0 else -math.inf
    V = len(classes.text)
    out = Outcomes(paths=[] if trace else None)
    cost = cost if cost is not None else {}
    for key in COST_KEYS:
        cost.setdefault(key, 0)
    starts = [int(r) for r in starts]
    cost["word_starts"] += len(starts)
    cost["sequences"] += 1
    shared: Optional[_Tree] = None
    if starts and tree is not False:
        with torch.inference_mode():
            shared = _Tree(model, seq, prompt_len, starts, device)
        if shared.reason is None:
            cost["prefill_tokens"] += shared.T
            cost["forwards"] += 1
            cost["tree_sequences"] += 1
        elif tree:
            raise ValueError(f"word_outcomes: tree=True, but {shared.reason}; leave tree unset to prefill each word "
                             "start's context on its own there")
        else:
            shared = None
    if shared is not None:  # a chunk's tree holds at most beam x steps fed tokens per word start
        per = max(1, batch_tokens // max(1, beam * steps))
    else:  # a chunk's cache holds beam rows per word start x the longest context
        per = max(1, batch_tokens // max(1, (prompt_len + max(starts, default=0)) * max(1, beam)))
    for c0 in range(0, len(starts), per):
        chunk = starts[c0:c0 + per]
        lens = [prompt_len + r for r in chunk]
        with torch.inference_mode():
            if shared is not None:
                last, cache = shared.chunk(chunk)
                fed = 0  # tokens fed after the context in this chunk
            else:
                last, cache, mask = _padded_prefill(model, seq, lens, pad_id, device)
                cost["prefill_tokens"] += int(mask.sum())
                cost["forwards"] += 1
            first = last.float().log_softmax(-1)
            n_v = first.shape[-1]
            piece_t, ender_t = classes.masks(n_v, device)
            found: list[dict] = [{} for _ in chunk]
            spell: list[dict] = [{} for _ in chunk]

            def add(w: int, text: str, lp: float, toks: list) -> None:
                found[w][text] = float(np.logaddexp(found[w].get(text, -np.inf), lp))
                if trace:
                    spell[w].setdefault(text, []).append(list(toks))

            paths: list[_Path] = []
            top_v, top_i = first.topk(min(k, n_v), dim=-1)
            for w, r in enumerate(chunk):
                obs = resp[r]
                cands = dict(zip(top_i[w].tolist(), top_v[w].tolist()))
                if 0 <= obs < n_v:
                    cands.setdefault(obs, float(first[w, obs]))
                for c, lp in cands.items():
                    if c < V and classes.path[c]:
                        if c == obs or lp > min_lp:  # a path below min_prob is not followed (its mass is lost)
                            paths.append(_Path(w, [c], lp, w, c == obs))
                    elif c < V and classes.text[c] is not None:
                        add(w, classes.text[c], lp, [c])
                    elif c == eot:
                        add(w, EOT_OUTCOME, lp, [c])
            for step in range(steps):
                if not paths:
                    break
                s = step + 1  # tokens in every live path; its newest is fed now, at position context + s - 1
                pos = [lens[p.w] + s - 1 for p in paths]
                newest = torch.tensor([p.toks[-1] for p in paths], device=device)
                if shared is not None:  # every path's newest token in one row of the tree
                    tree_mask = shared.mask([lens[p.w] for p in paths], [p.anc for p in paths], fed, s)
                    row, cache = _logits(model, len(paths), input_ids=newest[None], attention_mask=tree_mask,
                                         position_ids=torch.tensor([pos], device=device), past_key_values=cache,
                                         use_cache=True)
                    row = row[0]
                else:  # one cache row per path
                    cache.reorder_cache(torch.tensor([p.parent for p in paths], device=device))
                    m = torch.cat([mask[[p.w for p in paths]], torch.ones((len(paths), s), dtype=torch.long)], 1)
                    row, cache = _last_logits(model, input_ids=newest[:, None], attention_mask=m.to(device),
                                              position_ids=torch.tensor(pos, device=device)[:, None],
                                              past_key_values=cache, use_cache=True)
                row = row.float().log_softmax(-1)
                cost["forwards"] += 1
                cost["beam_tokens"] += len(paths)
                ends = row.masked_fill(~ender_t, -math.inf).logsumexp(-1).tolist()
                cv, ci = row.masked_fill(~piece_t, -math.inf).topk(min(branch, n_v), dim=-1)
                cv, ci = cv.tolist(), ci.tolist()
                grown: dict[int, list[_Path]] = {}
                forced: list[_Path] = []
                for b, p in enumerate(paths):
                    text = "".join(classes.text[t] for t in p.toks)
                    if any(ch.isalnum() for ch in text):
                        add(p.w, text, p.lp + ends[b], p.toks + ["end"])
                    nxt = None
                    if p.forced:  # the observed word goes on with the source's next token, if a word piece
                        j = chunk[p.w] + len(p.toks)
                        if j < len(resp) and 0 <= resp[j] < V and classes.piece[resp[j]]:
                            nxt = resp[j]
                    anc = p.anc + (fed + b,) if shared is not None else ()
                    for v, t in zip(cv[b], ci[b]):
                        if t == nxt or not math.isfinite(v) or p.lp + v <= min_lp:
                            continue
                        grown.setdefault(p.w, []).append(_Path(p.w, p.toks + [t], p.lp + v, b, False, anc))
                    if nxt is not None:
                        forced.append(_Path(p.w, p.toks + [nxt], p.lp + float(row[b, nxt]), b, True, anc))
                if shared is not None:
                    fed += len(paths)
                paths = [q for g in grown.values() for q in sorted(g, key=lambda q: -q.lp)[:beam]] + forced
        for w, r in enumerate(chunk):
            for text, lp in found[w].items():
                out.rows.append(r)
                out.texts.append(text)
                out.logprobs.append(lp)
                if trace:
                    out.paths.append(spell[w][text])
        del cache
    cost["outcomes"] += len(out.texts)
    return out


# --------------------------------------------------------------------------------------------
# align side


class Speller:
    """A target tokenizer's tokens for an outcome text, as it spells it between two words (FRAME),
    cached per text; None when its tokens do not start and end at the text's bounds."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, Optional[tuple]] = {}

    def __call__(self, text: str) -> Optional[tuple]:
        if text not in self.cache:
            self.prepare([text])
        return self.cache[text]

    def prepare(self, texts) -> None:
        """Spell every text of `texts` not cached yet, all at once (profuser.align.token_spans_many:
        one batch encode, one span pass: 0.16 s for 3,400 words on Gemma-3's tokenizer, where
        token_spans one text at a time took 3.55 s)."""
        from profuser.align import token_spans_many

        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        a, z = FRAME
        lo = len(a.encode())
        for text, sp in zip(todo, token_spans_many(self.tokenizer, [a + t + z for t in todo])):
            hi = lo + len(text.encode("utf-8", "surrogatepass"))
            inside = np.flatnonzero((sp.starts >= lo) & (sp.starts < hi))
            ok = (len(inside) > 0 and sp.starts[inside[0]] == lo and sp.ends[inside[-1]] == hi
                  and bool(sp.exact[inside].all()) and bool((np.diff(inside) == 1).all()))
            self.cache[text] = tuple(int(t) for t in sp.ids[inside]) if ok else None


_SPELLERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def speller(tokenizer) -> Speller:
    """The tokenizer's shared Speller (one cache per target tokenizer)."""
    try:
        return _SPELLERS.setdefault(tokenizer, Speller(tokenizer))
    except TypeError:
        return Speller(tokenizer)


def word_rows(observed: tuple, spelled: list[tuple[tuple, float]], k: int) -> list[Optional[tuple[list, list]]]:
    """Per target position t of an observed word (its target tokens `observed`): (ids, log-probs) of
    P(next target token | observed[:t]) over the outcomes `spelled` ((target tokens, log-prob)), at
    most k entries, most probable first, the observed token kept among them when it has any mass; at
    t = 0 the outcomes' own probabilities, at t > 0 divided by the mass of the outcomes whose tokens
    start with observed[:t]. None where no outcome is consistent with the prefix."""
    out: list = []
    for t in range(len(observed)):
        pre = observed[:t]
        cons = [(sq, lp) for sq, lp in spelled if sq[:t] == pre]
        if not cons:
            out.append(None)
            continue
        z = float(np.logaddexp.reduce([lp for _, lp in cons])) if t > 0 else 0.0
        by: dict[int, float] = {}
        for sq, lp in cons:
            if len(sq) > t:
                by[sq[t]] = float(np.logaddexp(by.get(sq[t], -np.inf), lp - z))
        if not by:
            out.append(None)
            continue
        top = sorted(by.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        lab = observed[t]
        if lab in by and all(i != lab for i, _ in top):
            top[-1] = (lab, by[lab])
            top.sort(key=lambda kv: (-kv[1], kv[0]))
        out.append(([i for i, _ in top], [min(v, 0.0) for _, v in top]))
    return out


def apply_outcomes(src, tgt, ids: np.ndarray, logprobs: np.ndarray, kept: np.ndarray, covered: np.ndarray,
                   rows, texts, outcome_logprobs, spell: Callable[[str], Optional[tuple]], classes: WordClasses,
                   eot: Optional[int] = None) -> int:
    """Replace the rule's rows (ids/logprobs [m, k], kept [m], covered [m], over the target response
    tokens `tgt`, in place) at the positions of every observed word that has outcomes and whose bytes
    the target's tokens tile exactly (src/tgt: profuser.align.ResponseTokens of the two renderings).
    `eot`: the target token an EOT_OUTCOME is taught as (the target's end of turn, as the rule maps
    the source's; None: that outcome's mass is lost). Returns the number of positions replaced."""
    from profuser.vocab_map import PAD_ID

    k = ids.shape[1]

    def spelled_as(text: str) -> Optional[tuple]:
        if text == EOT_OUTCOME:
            return None if eot is None else (int(eot),)
        return spell(text)

    by_row: dict[int, list[tuple[str, float]]] = {}
    for r, t, lp in zip(rows, texts, outcome_logprobs):
        by_row.setdefault(int(r), []).append((t, float(lp)))
    n = 0
    for r, outs in by_row.items():
        if not 0 <= r < len(src.ids):
            continue
        last = observed_end(src.ids, r, classes)
        lo, hi = int(src.starts[r]), int(src.ends[last])
        if lo < 0 or not src.exact[r:last + 1].all():
            continue
        J = np.flatnonzero((tgt.starts >= lo) & (tgt.starts < hi))
        if (len(J) == 0 or tgt.starts[J[0]] != lo or tgt.ends[J[-1]] != hi or not (np.diff(J) == 1).all()
                or not tgt.exact[J].all()):
            continue
        spelled = [(sq, lp) for sq, lp in ((spelled_as(t), lp) for t, lp in outs) if sq]
        if not spelled:
            continue
        for j, got in zip(J, word_rows(tuple(int(x) for x in tgt.ids[J]), spelled, k)):
            if got is None:
                continue
            e_ids, e_lps = got
            ids[j] = PAD_ID
            logprobs[j] = -np.inf
            ids[j, :len(e_ids)] = e_ids
            logprobs[j, :len(e_lps)] = e_lps
            covered[j] = True
            kept[j] = min(1.0, float(np.exp(np.asarray(e_lps, dtype=np.float64)).sum()))
            n += 1
    return n
