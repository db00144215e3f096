"""Synthetic skills for the CPU demo, and the short pre-training that makes each tiny source a
specialist in one of them. The data come from seeded generators: this module never reads a file or
the network, and imports torch only inside `pretrain`.

Three skills, one per source family, each with a rule a scorer can check exactly:

| skill      | prompt                               | answer                               |
|------------|--------------------------------------|--------------------------------------|
| arithmetic | What is 3 plus 8?                    | 3 plus 8 is 11.                      |
| spelling   | Spell "cat" backwards.               | "cat" backwards is "tac".            |
| capitals   | What is the capital of Peru?         | The capital of Peru is Lima.         |
"""
from __future__ import annotations

import random
from typing import Optional

SKILLS = ("arithmetic", "spelling", "capitals")

# Each skill's space is several times larger than what a fusion set of a few examples per skill
# covers, so a specialist pre-trained on the whole space knows more than the fusion set teaches.
_WORDS = ["cat", "dog", "sun", "map", "pen", "cup", "box", "hat", "net", "jam", "log", "fig",
          "owl", "ant", "bus", "car", "egg", "ink", "key", "leg", "mud", "nut", "oak", "pig",
          "bed", "cow", "fox", "gem", "hen", "ice", "jar", "kit", "lid", "mop", "nap", "oar",
          "pot", "rag", "sea", "tub", "urn", "van", "web", "yak", "zip", "arm", "bat", "cab",
          "den", "elf", "fan", "gum", "hut", "ivy", "jet", "kid", "lamp", "milk", "nest", "pond",
          "rope", "sock", "tent", "wolf"]
_CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Peru": "Lima", "Egypt": "Cairo",
    "Spain": "Madrid", "Chile": "Santiago", "Kenya": "Nairobi", "Cuba": "Havana", "Iran": "Tehran",
    "Mali": "Bamako", "Fiji": "Suva", "Laos": "Vientiane", "Oman": "Muscat", "Chad": "Ndjamena",
    "Togo": "Lome", "Germany": "Berlin", "Russia": "Moscow", "China": "Beijing", "Canada": "Ottawa",
    "Brazil": "Brasilia", "Greece": "Athens", "Turkey": "Ankara", "Poland": "Warsaw", "Austria": "Vienna",
    "Sweden": "Stockholm", "Norway": "Oslo", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Ireland": "Dublin", "Portugal": "Lisbon", "Hungary": "Budapest", "Romania": "Bucharest",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Nepal": "Kathmandu", "Ghana": "Accra", "Nigeria": "Abuja",
    "Morocco": "Rabat", "Iraq": "Baghdad", "Syria": "Damascus", "Jordan": "Amman", "Qatar": "Doha",
    "Ecuador": "Quito", "Colombia": "Bogota", "Venezuela": "Caracas", "Uruguay": "Montevideo",
    "Senegal": "Dakar",
}
SPACE = {"arithmetic": 100, "spelling": len(_WORDS), "capitals": len(_CAPITALS)}  # distinct prompts per skill


def make_example(skill: str, rng: random.Random) -> tuple[str, str]:
    if skill == "arithmetic":
        a, b = rng.randint(0, 9), rng.randint(0, 9)  # a table a 2-layer model can learn in seconds
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if skill == "spelling":
        w = rng.choice(_WORDS)
        return f'Spell "{w}" backwards.', f'"{w}" backwards is "{w[::-1]}".'
    if skill == "capitals":
        c = rng.choice(sorted(_CAPITALS))
        return f"What is the capital of {c}?", f"The capital of {c} is {_CAPITALS[c]}."
    raise ValueError(f"unknown skill {skill!r}; use one of {SKILLS}")


def make_records(n_per_skill: int, seed: int, prefix: str, skills=SKILLS) -> list[dict]:
    """Chat-format rows with a `skill` field (kept as record meta by the normalizer)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_per_skill):
        for skill in skills:
            q, a = make_example(skill, rng)
            rows.append({"id": f"{prefix}-{skill}-{i:04d}", "skill": skill,
                         "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return rows


def pretrain(model, tokenizer, template: str, rows: list[dict], steps: int, lr: float = 3e-3,
             batch_size: int = 16, seed: int = 0, desc: Optional[str] = None) -> list[float]:
    """Plain supervised training on `rows` with the model's own chat template; returns the losses.

    Deliberately simple (full-batch AdamW over padded response-masked batches): it only has to turn a
    random tiny model into a specialist in a few seconds on a CPU.
    """
    import torch
    from tqdm.auto import tqdm

    from profuser.chat import encode_chat
    from profuser.constants import IGNORE_INDEX

    enc = [encode_chat(tokenizer, template, r["messages"][:-1], r["messages"][-1]["content"]) for r in rows]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    pad = tokenizer.pad_token_id
    for _ in tqdm(range(steps), desc=desc or "pretrain", leave=False):
        idx = torch.randint(len(enc), (min(batch_size, len(enc)),), generator=gen).tolist()
        width = max(len(enc[i].input_ids) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        labels = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(enc[i].input_ids)
            ids[row, :n] = torch.tensor(enc[i].input_ids)
            labels[row, :n] = torch.tensor(enc[i].labels)
            mask[row, :n] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses
