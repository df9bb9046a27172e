"""Does the filter reject wrong-taxon chips? Real held-out chips fed in twice: once with their own
label, once claimed as another taxon (the next label in a fixed cycle, e.g. jellyfish -> penguin).
Reports the judge's per-rank accuracy on the same held-out chips and reject rates per (true, claimed).

    python benchmarks/filter_wrong_taxon.py --chips /work/runs/judge_aquarium/chips \
        --judge /work/runs/judge_aquarium/judge --out benchmarks/results/judge_aquarium
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from synthgen.filter import FilterConfig, filter_pool
from synthgen.io_utils import atomic_write, write_json
from synthgen.scoring import JudgeScorer, Pool
from synthgen.scoring.judge import held_out_split


def build_pool(chips: Path, work: Path) -> Path:
    """Right- and wrong-labelled copies (hard links) of the held-out chips; the chips stay untouched."""
    src = Pool.load(chips)
    split = held_out_split(src.rows)
    rows = [r for r in src.rows if r.get("split") == split]
    labels = sorted({r["label"] for r in rows})
    info = {r["label"]: (r["taxon"], r["lineage"]) for r in src.rows}
    out_rows = []
    for r in rows:
        wrong = labels[(labels.index(r["label"]) + 1) % len(labels)]
        for claimed in (r["label"], wrong):
            f = f"{claimed}/{r['label']}__{Path(r['file']).name}"
            dst = work / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                os.link(src.path(r), dst)
            taxon, lineage = info[claimed]
            out_rows.append({"file": f, "label": claimed, "taxon": taxon, "lineage": lineage, "true_label": r["label"]})
    with atomic_write(work / "manifest.jsonl", "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in out_rows))
    return work


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chips", type=Path, required=True)
    p.add_argument("--judge", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/synthgen-filter-wrong-taxon"))
    p.add_argument("--threshold", type=float, nargs="+", default=[0.3, 0.5])
    p.add_argument("--note", default="", help="how the judge was trained (printed under the title)")
    a = p.parse_args()
    pool = build_pool(a.chips, a.work / "pool")
    scorer = JudgeScorer(a.judge)
    metrics = json.loads((a.judge / "metrics.json").read_text())
    res = {"judge": str(a.judge), "judge_val": metrics["val"], "judge_train_seconds": metrics["train_seconds"],
           "filter": {}}
    for t in a.threshold:
        filter_pool(pool, scorer, a.work / f"out_{t}", FilterConfig(threshold=t, dedup_cosine=None, copy_cosine=None))
        kept = Pool.load(a.work / f"out_{t}").rows
        rej = Pool.load(a.work / f"out_{t}" / "rejected").rows
        pairs: dict[str, dict] = {}
        for rows, is_kept in ((kept, True), (rej, False)):
            for r in rows:
                key = f"{r['true_label']} as {r['label']}"
                d = pairs.setdefault(key, {"right": r["true_label"] == r["label"], "n": 0, "rejected": 0})
                d["n"] += 1
                d["rejected"] += not is_kept
        for d in pairs.values():
            d["reject_rate"] = d["rejected"] / d["n"]
        wrong = [d for d in pairs.values() if not d["right"]]
        right = [d for d in pairs.values() if d["right"]]
        res["filter"][str(t)] = {
            "pairs": pairs,
            "wrong_rejected": sum(d["rejected"] for d in wrong) / sum(d["n"] for d in wrong),
            "right_kept": 1 - sum(d["rejected"] for d in right) / sum(d["n"] for d in right),
        }
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "results.json", res)
    v = res["judge_val"]
    md = [f"# Judge on aquarium ({metrics['val_split']} split chips, {v['n']} chips)", "", a.note, "",
          "| level | accuracy | n | names at level (1 = trivially right) |", "|---|---|---|---|"]
    md += [f"| {lv} | {d['accuracy']:.3f} | {d['n']} | {len(scorer.space.vocab[lv])} |"
           for lv, d in v["per_level"].items() if d["accuracy"] is not None]
    md += ["", f"Taxon accuracy (whole lineage right): {v['taxon_accuracy']:.3f}, balanced over taxa "
           f"{v['balanced_taxon_accuracy']:.3f}", "", "| taxon | level | accuracy | n |", "|---|---|---|---|"]
    md += [f"| {t} | {d['level']} | {d['accuracy']:.3f} | {d['n']} |" for t, d in v["per_taxon"].items()]
    for t, f in res["filter"].items():
        md += ["", f"## Filter (judge p_taxon >= {t}): wrong-labelled rejected {f['wrong_rejected']:.1%}, "
               f"right-labelled kept {f['right_kept']:.1%}", "", "| true as claimed | n | reject rate |", "|---|---|---|"]
        md += [f"| {k} | {d['n']} | {d['reject_rate']:.1%} |" for k, d in sorted(f["pairs"].items(),
                                                                              key=lambda kv: kv[1]["right"])]
    with atomic_write(a.out / "results.md", "w") as fh:
        fh.write("\n".join(md) + "\n")
    print("wrong rejected / right kept: " + ", ".join(
        f"@{t}: {f['wrong_rejected']:.1%} / {f['right_kept']:.1%}" for t, f in res["filter"].items())
        + f" -> {a.out / 'results.md'}")


if __name__ == "__main__":
    main()
