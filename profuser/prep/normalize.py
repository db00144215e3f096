"""Stage 1, normalize: user data -> canonical records, split into shards.

Rows are parsed by `profuser.data.normalize` (unusable rows are rejected with their reason). Each
record is then formatted with every source's and the target's chat template under that model's
`max_length` and `data.overlength` policy: a record that one model must reject (policy `reject`, or
a reference that alone exceeds the limit) is rejected for all, so every source sees the same
records; truncations are counted per model. The shard partition made here is the one every later
stage keeps.

Never passes on a record some model must reject (`profuser.data.length_problems`, the rule the
preflight also counts by).
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa

from profuser.prep.formats import NORMALIZE_SCHEMA
from profuser.prep.stages import Context, Stage, model_deps, sidecar_info
from profuser.prep.shards import fingerprint

def _length_models(cfg) -> list:
    """Every source and the target, once each (the target may also be a source)."""
    return list({m.name: m for m in [*cfg.sources, cfg.target]}.values())


class NormalizeStage(Stage):
    name = "normalize"

    def parts(self, cfg, plan):
        d = cfg.data
        models = {m.name: {**model_deps(m, weights=False), "max_length": m.max_length or d.max_length} for m in _length_models(cfg)}
        return {"records": {
            "data": {"path": str(Path(d.path).resolve()), "content": fingerprint(d.path, content=True),
                     "format": d.format, "limit": d.limit},
            "overlength": d.overlength, "special_tokens": d.special_tokens, "models": models,
            "shard_size": cfg.prep.shard_size,
        }}

    def _parsed(self, ctx: Context):
        if "normalized" not in ctx.cache:
            from profuser.data import normalize

            d = ctx.cfg.data
            ctx.cache["normalized"] = normalize(d.path, d.format, d.limit)
        return ctx.cache["normalized"]

    def n_shards(self, ctx: Context) -> int:
        return math.ceil(len(self._parsed(ctx).records) / ctx.cfg.prep.shard_size)

    def run(self, ctx: Context, todo: dict[str, list[int]]) -> None:
        from profuser.data import Reject, guard_special_tokens, length_problems, special_strings
        from profuser.models import load_chat_tokenizer

        cfg, size = ctx.cfg, ctx.cfg.prep.shard_size
        records = self._parsed(ctx).records
        checkers = []
        for m in _length_models(cfg):
            chat_model = load_chat_tokenizer(m)
            checkers.append((m.name, chat_model, m.max_length or cfg.data.max_length))
        specials = set().union(*(special_strings(chat_model.tokenizer) for _, chat_model, _ in checkers))
        stage_dir = ctx.stage_dir(self.name)
        for i in todo.get("records", []):
            t0 = time.time()
            batch = records[i * size:(i + 1) * size]
            keep, rejects, escaped = [], [], 0
            per_model = {name: Counter() for name, _, _ in checkers}
            for rec in batch:
                rec = {**rec, "messages": list(rec["messages"])}
                try:
                    escaped += guard_special_tokens(rec, specials, cfg.data.special_tokens)
                except Reject as e:
                    rejects.append({"id": rec["id"], "kind": e.kind, "reason": str(e)})
                    continue
                problems = length_problems(rec, checkers, cfg.data.overlength, per_model)
                if problems:
                    rejects.append({"id": rec["id"], "kind": problems[0][0], "reason": "; ".join(p[1] for p in problems)})
                else:
                    keep.append({**rec, "meta": json.dumps(rec["meta"], ensure_ascii=False, sort_keys=True)})
            table = pa.Table.from_pylist(keep, schema=NORMALIZE_SCHEMA)
            stage_dir.commit("records", i, table, sidecar_info(len(batch), len(keep), rejects, time.time() - t0,
                                                               per_model={k: dict(v) for k, v in per_model.items()},
                                                               special_tokens_escaped=escaped))

    def finalize(self, ctx, stage_dir, parts, rejects):
        res = self._parsed(ctx)
        rejects[:0] = [{"stage": self.name, "part": "records", **r} for r in res.rejects]  # parse rejects first
        per_model: dict = {}
        escaped = 0
        for i in range(len(parts["records"]["shards"])):
            side = stage_dir.sidecar("records", i)
            escaped += side.get("special_tokens_escaped", 0)
            for name, c in side.get("per_model", {}).items():
                per_model.setdefault(name, Counter()).update(c)
        c = parts["records"]["counts"]
        reasons = Counter(c["reasons"])
        reasons.update(Counter(r["kind"] for r in res.rejects))
        counts = {"rows": res.n_rows, "in": res.n_rows, "out": c["out"], "rejected": res.n_rows - c["out"],
                  "reasons": dict(reasons.most_common())}
        for name, pm in per_model.items():
            ctx.say(f"normalize: {name}: {pm.get('fits', 0)} fit, {pm.get('truncated', 0)} truncated, "
                    f"{pm.get('rejected', 0)} over length or unrenderable (max_length policy {ctx.cfg.data.overlength!r})")
        if escaped:
            ctx.say(f"normalize: {escaped} record(s) spelled a special token in their text; escaped with a "
                    "zero-width space (data.special_tokens=escape)")
        return {"counts": counts, "per_model": {k: dict(v) for k, v in per_model.items()},
                "special_tokens_escaped": escaped}
