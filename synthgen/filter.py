"""`synthgen filter`: score a generated pool, keep what looks like the intended taxon, set the rest aside.

Nothing is deleted: kept chips are linked into OUT/, rejected ones into OUT/rejected/ with the reason,
and the input pool is left untouched unless an in-place move is asked for. Scoring is cached in
per-batch files under OUT/.scores/, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import ConfigDict, Field

from synthgen.config import YamlConfig
from synthgen.io_utils import atomic_write, write_json, write_jsonl
from synthgen.scoring.base import Pool, Scorer, ScoringError, batched, load_image, normalize

REASONS = ("low_score", "near_copy", "duplicate", "not_top_k")


class FilterConfig(YamlConfig):
    """Which score decides and how its threshold is set."""

    model_config = ConfigDict(extra="forbid")
    score: str = Field("p_taxon", description="score name, e.g. p_taxon, centroid_cos, text_sim")
    mode: Literal["fixed", "calibrated", "topk"] = "fixed"
    threshold: float = Field(0.5, description="fixed mode; also the fallback for taxa without real chips")
    percentile: float = Field(10.0, ge=0, le=100, description="calibrated: keep >= this percentile of real")
    top_k: int = Field(100, ge=1, description="topk: best k per taxon")
    dedup_cosine: float | None = Field(0.97, description="reject a chip this close to a better kept one")
    copy_cosine: float | None = Field(0.98, description="reject a chip this close to a training chip")
    distinct_percentile: float | None = Field(
        99.0, ge=0, le=100, description="with held-out real chips, raise both bars above to this percentile of "
        "their similarity to their nearest training chip: in a scorer's features, distinct real animals of one "
        "species often sit closer than the fixed bars, and they are neither copies nor duplicates")
    batch_size: int = Field(64, ge=1)
    link: Literal["hardlink", "symlink", "copy"] = "hardlink"



def _score_key(scorer: Scorer, name: str) -> str:
    return name if "." in name else f"{scorer.name}.{name}"


def embed_pool(scorer: Scorer, pool: Pool, rows: list[dict], cache: Path, desc: str) -> tuple[np.ndarray, dict]:
    """Embeddings and scores for `rows`, computed in batches and cached one file per batch.

    A batch file is written atomically after the batch is scored, so a kill loses at most one
    batch; a rerun loads the finished batches and scores only the rest.
    """
    from rich.progress import Progress

    cache.mkdir(parents=True, exist_ok=True)

    def key(r: dict) -> str:  # scores depend on the intended taxon, not only on the image
        return f"{r['file']}\t{r['taxon']}"

    done: dict[str, tuple[np.ndarray, dict]] = {}
    for f in sorted(cache.glob("batch_*.npz")):
        with np.load(f, allow_pickle=False) as z:
            names = [str(s) for s in z["keys"]]
            keys = [k for k in z.files if k.startswith("s:")]
            for i, n in enumerate(names):
                done[n] = (z["emb"][i], {k[2:]: float(z[k][i]) for k in keys})
    todo = [r for r in rows if key(r) not in done]
    start = len(list(cache.glob("batch_*.npz")))
    with Progress(transient=True) as bar:
        task = bar.add_task(desc, total=len(rows), completed=len(rows) - len(todo))
        for b, chunk in enumerate(batched(todo, scorer.batch_size)):
            imgs = [load_image(pool.path(r)) for r in chunk]
            emb = scorer.embed_images(imgs)
            sc = scorer.score_embeddings(emb, [r["taxon"] for r in chunk])
            arrays = {"keys": np.array([key(r) for r in chunk]), "emb": emb.astype(np.float32)}
            arrays |= {f"s:{scorer.name}.{k}": np.asarray(v, dtype=np.float32) for k, v in sc.items()}
            with atomic_write(cache / f"batch_{start + b:06d}.npz", "wb") as fh:
                np.savez(fh, **arrays)
            for i, r in enumerate(chunk):
                done[key(r)] = (emb[i], {f"{scorer.name}.{k}": float(v[i]) for k, v in sc.items()})
            bar.update(task, advance=len(chunk))
    emb = np.stack([done[key(r)][0] for r in rows]) if rows else np.zeros((0, 1), np.float32)
    return emb, {r["file"]: done[key(r)][1] for r in rows}


def cache_name(scorer: Scorer) -> str:
    """Cache folder name: scorer name + a hash of its weights identity."""
    return f"{scorer.name}-{hashlib.sha1(scorer.ident.encode()).hexdigest()[:10]}"


def _place(src: Path, dst: Path, how: str) -> None:
    """Link or copy `src` to `dst` (idempotent); hard links fall back to copies across filesystems."""
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    if how == "symlink":
        os.symlink(src.resolve(), tmp)
    elif how == "hardlink":
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
    else:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def raised(bar: float | None, distinct: float | None) -> float | None:
    """A fixed similarity bar (None: check off), raised to `distinct` where that is higher."""
    return bar if bar is None or distinct is None else max(bar, distinct)


def nearest_similarity(emb: np.ndarray, train_emb: np.ndarray) -> np.ndarray:
    """Per row, cosine similarity to its nearest training chip."""
    return (normalize(emb) @ normalize(train_emb).T).max(1)


def decide(rows: list[dict], scores: dict[str, dict], emb: np.ndarray, key: str, cfg: FilterConfig,
           thresholds: dict[str, float], train_emb: np.ndarray | None = None,
           distinct: float | None = None) -> list[str | None]:
    """Per row, None (kept) or the reject reason. Order: near copy of a training chip (memorised, whatever
    its score), score threshold, near duplicate of a better-scoring kept chip of the same taxon, top-k.
    `distinct`: a similarity distinct real animals reach, which both bars are raised to."""
    n = len(rows)
    s = np.array([scores[r["file"]].get(key, np.nan) for r in rows], dtype=np.float64)
    reason: list[str | None] = [None] * n
    e = normalize(emb) if n else emb
    copy_bar, dedup_bar = (raised(b, distinct) for b in (cfg.copy_cosine, cfg.dedup_cosine))
    if copy_bar is not None and train_emb is not None and len(train_emb) and n:
        for i in np.flatnonzero(nearest_similarity(e, train_emb) > copy_bar):
            reason[i] = "near_copy"
    if cfg.mode != "topk":
        for i, r in enumerate(rows):
            if reason[i] is None and not s[i] >= thresholds.get(r["taxon"], cfg.threshold):
                reason[i] = "low_score"
    order = np.argsort(-np.nan_to_num(s, nan=-np.inf), kind="stable")
    kept_by_taxon: dict[str, list[int]] = {}
    for i in order:
        if reason[i]:
            continue
        kept = kept_by_taxon.setdefault(rows[i]["taxon"], [])
        if dedup_bar is not None and kept and float((e[kept] @ e[i]).max()) > dedup_bar:
            reason[i] = "duplicate"
            continue
        if cfg.mode == "topk" and len(kept) >= cfg.top_k:
            reason[i] = "not_top_k"
            continue
        kept.append(i)
    return reason


def held_out_rows(reference: Pool) -> list[dict]:
    """The reference's real held-out chips (its val/valid split), or none."""
    from synthgen.scoring.judge import held_out_split

    split = held_out_split(reference.rows)
    return [r for r in reference.rows if r.get("split") == split] if split else []


def calibrate(rows: list[dict], scores: dict, key: str, percentile: float) -> dict[str, float]:
    """Per taxon, the `percentile`-th percentile of the score on real held-out chips of that taxon."""
    by_taxon: dict[str, list[float]] = {}
    for r in rows:
        by_taxon.setdefault(r["taxon"], []).append(scores[r["file"]][key])
    return {t: float(np.nanpercentile(v, percentile)) for t, v in by_taxon.items()}


def filter_pool(pool_dir: str | Path, scorer: Scorer, out: str | Path | None, cfg: FilterConfig | None = None,
                reference: str | Path | None = None, in_place: bool = False) -> dict:
    """Score a pool, keep passing chips, set rejects aside; returns a summary with per-taxon pass rates.

    `reference` is a chips folder of real instances: its train split gives the centroid score and the
    near-copy check, its val split the calibrated thresholds. With `in_place`, rejects are moved inside
    the pool (POOL/rejected/) and the pool manifest is rewritten; otherwise OUT is a new pool.
    """
    cfg = cfg or FilterConfig()
    pool = Pool.load(pool_dir)
    man = pool.root / "manifest.jsonl"
    for i, r in enumerate(pool.rows, 1):
        if r["taxon"] not in scorer.space.lineages:
            raise ScoringError(f"{man}:{i}: taxon {r['taxon']!r} is not one of the scorer's taxa {scorer.space.taxa}")
        if not pool.path(r).is_file():
            raise ScoringError(f"{man}:{i}: image {pool.path(r)} not found")
    if in_place:
        out = pool.root
    elif out is None:
        raise ScoringError("filter needs --out (or an in-place move)")
    out = Path(out)
    if not in_place and out.resolve() == pool.root.resolve():
        raise ScoringError(f"{out}: output folder is the input pool; pass another --out or ask for an in-place move")
    work = out / ".scores" / cache_name(scorer)
    key = _score_key(scorer, cfg.score)

    train_emb, val, val_emb, val_scores = None, [], None, {}
    if reference is not None:
        ref = Pool.load(reference)
        tr = [r for r in ref.rows if r.get("split", "train") == "train" and r["taxon"] in scorer.space.lineages]
        if tr:
            train_emb, _ = embed_pool(scorer, ref, tr, work / "reference_train", "embedding training chips")
            scorer.set_reference(train_emb, [r["taxon"] for r in tr])
        needed = cfg.mode == "calibrated" or (cfg.distinct_percentile is not None and train_emb is not None)
        if needed and (val := held_out_rows(ref)):  # scored after set_reference: the centroid score needs it
            val_emb, val_scores = embed_pool(scorer, ref, val, work / "reference_val", "scoring held-out real chips")
    thresholds: dict[str, float] = {}
    if cfg.mode == "calibrated":
        if not val:
            raise ScoringError("calibrated thresholds need --reference, a chips folder with held-out real chips "
                               "(a val/valid split)" + (f": {ref.root / 'manifest.jsonl'} has none" if reference else ""))
        thresholds = calibrate(val, val_scores, key, cfg.percentile)

    distinct = None
    if cfg.distinct_percentile is not None and train_emb is not None and val_emb is not None:
        distinct = float(np.percentile(nearest_similarity(val_emb, train_emb), cfg.distinct_percentile))
    emb, scores = embed_pool(scorer, pool, pool.rows, work / "pool", f"scoring {len(pool.rows)} chips")
    if pool.rows and key not in scores[pool.rows[0]["file"]]:
        raise ScoringError(f"score {cfg.score!r} not produced by {scorer.name}; it has "
                           f"{sorted(k.split('.', 1)[1] for k in scores[pool.rows[0]['file']])}")
    reasons = decide(pool.rows, scores, emb, key, cfg, thresholds, train_emb, distinct)

    kept_rows, rej_rows = [], []
    for r, why in zip(pool.rows, reasons, strict=True):
        row = dict(r) | {"scores": dict(r.get("scores", {})) | scores[r["file"]], "kept": why is None}
        if why is None:
            kept_rows.append(row)
        else:
            rej_rows.append(row | {"reject_reason": why})
    rej_dir = out / "rejected"
    for row in rej_rows:
        src, dst = pool.path(row), rej_dir / row["file"]
        if in_place:
            if src.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
        else:
            _place(src, dst, cfg.link)
    if not in_place:
        for row in kept_rows:
            _place(pool.path(row), out / row["file"], cfg.link)
    write_jsonl(rej_dir / "manifest.jsonl", rej_rows)
    write_jsonl(out / "manifest.jsonl", kept_rows)

    per_taxon: dict[str, dict] = {}
    for r, why in zip(pool.rows, reasons, strict=True):
        d = per_taxon.setdefault(r["taxon"], {"label": r["label"], "n": 0, "kept": 0} | dict.fromkeys(REASONS, 0))
        d["n"] += 1
        if why is None:
            d["kept"] += 1
        else:
            d[why] += 1
    for t, d in per_taxon.items():
        d["pass_rate"] = d["kept"] / d["n"]
        d["threshold"] = thresholds.get(t, cfg.threshold) if cfg.mode != "topk" else None
    summary = {"pool": str(pool.root), "out": str(out), "scorer": scorer.name, "score": key,
               "config": cfg.model_dump(), "copy_bar": raised(cfg.copy_cosine, distinct),
               "dedup_bar": raised(cfg.dedup_cosine, distinct), "n": len(pool.rows), "kept": len(kept_rows),
               "rejected": len(rej_rows), "per_taxon": per_taxon}
    write_json(out / "filter_summary.json", summary)
    return summary
