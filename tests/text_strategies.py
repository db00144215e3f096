"""Hypothesis strategies shared by the alignment and transfer tests: random Unicode text mixing the
cases tokenizers disagree on (accents, combining marks, emoji sequences, CJK, whitespace runs,
digits, compatibility characters, special-token look-alikes, byte-fallback look-alikes)."""
from hypothesis import strategies as st

FAMILIES = ("chatml_bpe", "vicuna_spm", "gemma_unigram")

PIECES = [
    "the", " cat", "café", "naïve", "Ñandú", "e\u0301", "😀", "👩‍💻", "🇫🇷", "中文", "日本語", "한국어",
    "  ", "   ", "\n", "\n\n", "\t", " \n ", "0", "42", "3.14", "1,000", "ﬁ", "Ａ", "²", "µ", "—", "“q”",
    "</s>", "<|im_end|>", "<end_of_turn>", "<0x41>", "ĠcafÃ©", "▁x",
]
texts = st.lists(
    st.one_of(st.sampled_from(PIECES), st.text(st.characters(exclude_categories=("Cs",)), max_size=4)),
    max_size=24,
).map("".join)
