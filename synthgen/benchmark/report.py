"""results.json -> report.md + self-contained report.html (plots embedded) that answers plainly:
did synthetic data help, and at the goal fraction does real + synthgen beat real-only by the goal
margin and beat copy-paste? If not, it names what holds it back."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd

from detection.metrics import paired_differences
from synthgen.benchmark.config import ARMS
from synthgen.io_utils import atomic_write, write_json

METRICS = ["map50", "map50_95", "precision", "recall", "f1", "count_mae"]
# A real-only detector below this mAP50 has not learned the task: no arm difference above it is evidence.
BASELINE_FLOOR = 0.05


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std over seeds per arm and fraction."""
    g = runs.groupby(["arm", "fraction"])
    agg = g[METRICS].agg(["mean", "std"])
    agg.columns = [f"{m}_{s}" for m, s in agg.columns]
    return agg.assign(seeds=g.size()).reset_index()


def per_taxon(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean AP50 per taxon, arm and fraction."""
    rows = []
    for r in runs.itertuples():
        for taxon, ap in (r.ap50_per_class or {}).items():
            rows.append({"arm": r.arm, "fraction": r.fraction, "taxon": taxon, "ap50": ap})
    df = pd.DataFrame(rows, columns=["arm", "fraction", "taxon", "ap50"])
    return df.groupby(["taxon", "arm", "fraction"]).ap50.mean().reset_index()


def _iv(r) -> str:
    return f"{r['mean'] * 100:+.1f} points [95 % interval {r['lo'] * 100:+.1f}, {r['hi'] * 100:+.1f}]"


def verdict(results: dict, runs: pd.DataFrame, intervals: pd.DataFrame) -> list[str]:
    """Plain sentences: the goal, stated either way, and what holds it back when it is not met.
    An arm is said to help only when its interval (test images x paired seeds) excludes zero."""
    cfg = results["config"]
    goal_f, gain = cfg["goal_fraction"], cfg["goal_map50_gain"]
    skipped = results.get("skipped_arms", {})
    fracs = sorted(runs.fraction.unique()) if len(runs) else []
    f = min(fracs, key=lambda x: abs(x - goal_f)) if fracs else goal_f
    iv = intervals[(intervals.test == "test") & (intervals.fraction == f)].set_index("arm") if len(intervals) else (
        pd.DataFrame())
    lines = [f"**Goal:** at {goal_f:.0%} real, real + synthgen >= real-only + {gain * 100:.0f} mAP50 points with a "
             "95 % interval that excludes zero, and above real + copy-paste."]
    gen_arms = [a for a in ("synthgen", "incontext") if a in iv.index]
    if not gen_arms:
        why = "; ".join(f"{a}: {skipped[a]}" for a in ("synthgen", "incontext") if a in skipped) or "not in this run"
        lines.append(f"**Goal not answered:** no real + synthgen arm was measured ({why}).")
        return lines
    base = runs[(runs.arm == "real") & (runs.fraction == f)].map50.mean()
    if base < BASELINE_FLOOR:
        lines.append(f"**Not answerable at this scale:** the real-only detector reaches mAP50 {base:.3f} at "
                     f"{f * 100:g}% of the real data (scale '{results['scale']}'). A detector that has not learned "
                     "the task cannot show whether more data helps, so the differences below are noise, not "
                     "evidence either way.")
    cp = iv.loc["copy_paste"] if "copy_paste" in iv.index else None
    met_any = False
    for a in gen_arms:
        r = iv.loc[a]
        helps = r.lo > 0
        met = helps and r["mean"] >= gain and cp is not None and r["mean"] > cp["mean"] and base >= BASELINE_FLOOR
        met_any |= met
        lines.append(f"At {f * 100:g}% real, {ARMS[a]} vs real-only: {_iv(r)} over {int(r.n_seeds)} paired seeds; "
                     f"{'helps (interval excludes zero)' if helps else 'not shown to help (interval includes zero)' if r.lo <= 0 <= r.hi else 'hurts (interval below zero)'}. "
                     f"Goal: **{'met' if met else 'not met'}**.")
    if cp is None:
        lines.append("Copy-paste arm not measured, so the generator's own contribution is not isolated.")
    else:
        lines.append(f"Real + copy-paste vs real-only: {_iv(cp)}.")
    if "pretrain_finetune" in iv.index:
        pf = iv.loc["pretrain_finetune"]
        ctl = f"; its control, real-only with as many optimizer steps: {_iv(iv.loc['real_long'])}" if (
            "real_long" in iv.index) else " (its equal-steps control was not run)"
        lines.append(f"Pre-train on synthgen tiles, fine-tune on real: {_iv(pf)}{ctl}.")
    half = intervals[intervals.test == "test"].half_width.max() if len(intervals) else float("nan")
    if half == half:
        lines.append(f"Widest interval half-width: {half * 100:.1f} points (the protocol asks <= 2 points; "
                     "more seeds narrow the seed part).")
    if not met_any:
        lines.append("What holds it back (from these numbers): " + "; ".join(_limits(results, runs)))
    return lines


def _limits(results: dict, runs: pd.DataFrame) -> list[str]:
    s = results["config"]["scales"][results["scale"]]
    out = []
    det = s["detector"]
    base = runs[runs.arm == "real"].groupby("fraction").map50.mean()
    if len(base) and base.min() < BASELINE_FLOOR:
        out.append(f"the real-only detector has not learned the task (mAP50 {base.min():.3f}): "
                   f"{det['epochs']} epochs at {det['imgsz']} px from {det['model']} are too few optimizer steps "
                   "on this much real data")
    if det["epochs"] < 30:
        out.append(f"detectors trained for only {det['epochs']} epochs at {det['imgsz']} px (scale "
                   f"'{results['scale']}'): every arm is far from convergence, so differences are mostly noise")
    gens = list(results.get("generators", {}).values())
    if gens:
        steps = sorted({g["steps"] for g in gens})
        kept = [g for g in gens if "generated" in g]
        line = f"the generator trains {'/'.join(map(str, steps))} steps per cell (scale '{results['scale']}')"
        if kept:
            k, n = sum(g["kept"] for g in kept), sum(g["generated"] for g in kept)
            line += (f"; the filter ({kept[0]['score']}) kept {k} of {n} generated instances"
                     + (", so the few kept are reused across many pastes" if k < n / 2 else ""))
        line += ("; see the generated-instance sheet (beside real training chips) for what the generator draws, "
                 "and the example tiles for what the detector was shown")
        out.append(line)
    sd = runs.groupby(["arm", "fraction"]).map50.std().mean()
    if sd == sd and sd > 0.03:
        out.append(f"seed-to-seed spread of mAP50 ({sd * 100:.1f} points) is as large as the effect sought")
    if results.get("skipped_arms"):
        out.append("arms not run: " + ", ".join(sorted(results["skipped_arms"])))
    return out or ["no single cause visible in these aggregates; inspect per-taxon AP and the example tiles"]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def plots(agg: pd.DataFrame, taxa: pd.DataFrame, examples: list[str], names: list[str],
          instances: dict[str, list[str]] | None = None) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, g in agg.groupby("arm"):
        g = g.sort_values("fraction")
        ax.errorbar(g.fraction, g.map50_mean, yerr=g.map50_std.fillna(0), marker="o", capsize=3,
                    label=ARMS.get(arm, arm))
    ax.set_xscale("log")
    ax.set_xlabel("fraction of real training data")
    ax.set_ylabel("mAP50 (mean ± sd over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    out["map_vs_fraction.png"] = _png(fig)

    if len(taxa):
        f0 = taxa.fraction.min()
        t = taxa[taxa.fraction == f0].pivot(index="taxon", columns="arm", values="ap50")
        fig, ax = plt.subplots(figsize=(7, 4))
        t.plot.bar(ax=ax)
        ax.set_ylabel(f"AP50 at {f0:.0%} real")
        ax.legend(fontsize=8)
        out["per_taxon_ap.png"] = _png(fig)

    if examples:
        from PIL import Image, ImageDraw

        fig, axes = plt.subplots(1, len(examples), figsize=(3 * len(examples), 3))
        for ax, p in zip(np.atleast_1d(axes), examples, strict=False):
            im = Image.open(p).convert("RGB")
            lab = Path(str(p).replace("/images/", "/labels/")).with_suffix(".txt")
            if lab.is_file():
                dr = ImageDraw.Draw(im)
                for line in lab.read_text().splitlines():
                    v = line.split()
                    if len(v) == 5:
                        _, cx, cy, w, h = (float(x) for x in v)
                        W, H = im.size
                        dr.rectangle([(cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H],
                                     outline=(255, 0, 0), width=2)
            ax.imshow(im)
            ax.axis("off")
        out["example_synthetic_tiles.png"] = _png(fig)
    rows = {k: v for k, v in (instances or {}).items() if v}
    if rows:
        from PIL import Image

        cols = max(len(v) for v in rows.values())
        fig, axes = plt.subplots(len(rows), cols, figsize=(0.8 * cols, 1.0 * len(rows)), squeeze=False)
        for r, (title, files) in enumerate(rows.items()):
            for c in range(cols):
                ax = axes[r, c]
                ax.axis("off")
                if c < len(files):
                    ax.imshow(Image.open(files[c]).convert("RGB"))
            axes[r, 0].set_title(title, fontsize=8, loc="left")
        out["example_instances.png"] = _png(fig)
    return out


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines)


def _filter_line(f: dict | None) -> str:
    if f is None:
        return "- Generated instances go to the compositor unfiltered (`filter: null` in the config)."
    scorer = f.get("scorer", "judge")
    who = "a judge trained on the cell's real chips" if scorer == "judge" else f"scorer `{scorer}`"
    mode = f.get("mode", "fixed")
    rule = {"fixed": f"score >= {f.get('threshold', 0.5)}", "topk": f"top {f.get('top_k', 100)} per taxon",
            "calibrated": f"score >= the {f.get('percentile', 10.0):g}th percentile of the cell's held-out real "
                          "chips"}[mode]
    pct, cos = f.get("distinct_percentile", 99.0), f.get("copy_cosine", 0.98)
    bars = "" if pct is None else (f", both bars raised to the similarity {pct:g}% of the held-out real chips "
                                   "stay under to their nearest training chip (distinct real animals)")
    copies = "" if cos is None else f", and so are near-copies (cosine > {cos} to a training chip)"
    return (f"- Generated instances are filtered before composing: `{f.get('score', 'p_taxon')}` from {who}, kept if "
            f"{rule}; near-duplicates are rejected{copies}{bars}.")


def stage_times(seconds: dict[str, float]) -> pd.DataFrame:
    """Wall time per kind of stage (summed over cells): `cells/f0.1-s0/synthgen/eval-test` counts as
    `eval-test`, `cells/f0.1-s0/synthgen` as `detector synthgen`."""
    import re

    from synthgen.benchmark.config import ARMS as arms

    rows = []
    for name, sec in seconds.items():
        last = re.sub(r"^cells/[^/]+/", "", name)
        kind = last.split("/")[-1]
        if "/" not in last and kind in arms:
            kind = f"detector {kind}"
        elif name.startswith("tests/"):
            kind = "further test set"
        rows.append({"stage": kind, "seconds": sec})
    df = pd.DataFrame(rows, columns=["stage", "seconds"])
    g = df.groupby("stage", sort=False).seconds.agg(["count", "sum"]).reset_index()
    g = g.rename(columns={"count": "runs", "sum": "seconds"})
    return pd.concat([g, pd.DataFrame([{"stage": "total", "runs": int(g.runs.sum()), "seconds": g.seconds.sum()}])])


def _protocol(results: dict) -> list[str]:
    cfg, sp = results["config"], results["split"]
    scale = cfg["scales"][results["scale"]]
    det, nat, g = scale["detector"], scale.get("native"), cfg["groups"]
    src, leak = sp.get("source", {}), sp.get("leak", {})
    lines = [
        f"- Dataset `{cfg['dataset']}`. Test set: the given `{cfg['test_split']}` split "
        f"({sp['counts'].get('test', 0)} real images, {sp['groups']['test']} groups), never seen by the "
        "generator, the judge or any detector.",
        f"- Groups (file names, case-insensitive): source tile `{g['tile']}`, source frame `{g['frame']}`; "
        "splits and draws keep whole frames together (whole tiles where a name carries no frame)."]
    if src:
        lines.append(
            f"- Given `{cfg['train_split']}`: {src['train']['images']} images, {src['train']['tiles']} source tiles, "
            f"{src['train']['frames']} frames; `{cfg['test_split']}`: {src['test']['images']} images, "
            f"{src['test']['tiles']} tiles, {src['test']['frames']} frames. {leak['frames_shared']} frames give both "
            f"train and test tiles: their {leak['train_images_dropped']} train images ({leak['train_tiles_dropped']} "
            f"source tiles) are left out of training; {leak['tiles_shared']} train images share a source tile "
            "with a test image.")
    lines += [
        f"- The rest of `{cfg['train_split']}` is divided by group into train ({sp['counts'].get('train', 0)} images / "
        f"{sp['groups']['train']} groups) and validation for early stopping ({sp['counts'].get('val', 0)} / "
        f"{sp['groups']['val']}).",
        f"- Real fractions {scale['fractions']} drawn by group, stratified by rarest taxon, seeds {scale['seeds']}"
        " (nested across fractions for one seed). Generators see only their cell's real training images.",
        f"- Detector `{det['model']}`, {det['epochs']} epochs, imgsz {det['imgsz']}, batch {det['batch']}, the "
        "same augmentation and schedule for every arm except where an arm's row says otherwise; synthetic share "
        f"of each batch {scale['synthetic_ratio']}; "
        + ("an epoch holds as many images as real-only training's (equal optimizer steps)."
           if det.get("synthetic_epoch") == "match_real" else
           "an epoch shows every real image once, so mixed arms take more optimizer steps than arm 1.")
        + " Each row's optimizer steps are in the results table.",
        (f"- Native scale: detectors train on {nat['window']} px windows cut from the tiles at full resolution "
         f"(a box cut by a window edge is kept if {nat['min_visible']:.0%} of it is inside) and predict on whole "
         f"test tiles by sliced inference ({nat['window']} px slices, overlap {nat['slice_overlap']})."
         if nat else f"- Whole tiles resized to imgsz {det['imgsz']} for training and test."),
        f"- Metrics on the test set: COCO-style mAP50 / mAP50-95 (own evaluator), P/R/F1 at IoU 0.4 and "
        f"count error per image at score >= {scale['operating_conf']}. Intervals: 95 % percentile bootstrap "
        f"({scale.get('bootstrap', 1000)} replicates) over test images (one draw shared by every model) and "
        "paired seeds together; an arm helps only when its interval excludes zero.",
        _filter_line(scale.get("filter")),
        "- Composed tiles are the cell's real training tiles, keeping their own labelled real animals, with "
        "instances pasted in: arm 4 (synthgen only) therefore still sees the cell's real instances, inside "
        "altered tiles. Arm 5 pre-trains on those tiles (arm 4), then fine-tunes on the real tiles; its control "
        "trains real-only for as many optimizer steps in total.",
        f"- Nothing was tuned on `{cfg['test_split']}`; the learning curve that sets the schedule is measured on "
        "the validation part."]
    return lines


def _interval_table(iv: pd.DataFrame) -> str:
    t = iv.assign(**{c: (iv[c] * 100).round(2) for c in ("mean", "lo", "hi", "half_width")})
    t = t.assign(helps=np.where(t.lo > 0, "yes", np.where(t.hi < 0, "hurts", "not shown")))
    return _md_table(t[["arm", "fraction", "mean", "lo", "hi", "half_width", "n_seeds", "helps"]])


def write_report(results: dict, out: str | Path) -> Path:
    """Write results.json, report.md (+ PNGs beside it) and a self-contained report.html."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    runs = pd.DataFrame(results["runs"])
    cfg = results["config"]
    names = results["split"]["names"]
    ivs = pd.DataFrame(results.get("intervals", []),
                       columns=["test", "arm", "fraction", "mean", "lo", "hi", "half_width", "n_seeds"])
    if len(runs):
        agg = aggregate(runs)
        agg = agg.merge(runs.groupby(["arm", "fraction"]).optimizer_steps.mean().rename("steps").reset_index())
        diffs = pd.concat([paired_differences(runs, m).assign(metric=m) for m in ("map50", "map50_95")])
        taxa = per_taxon(runs)
    else:
        agg, diffs, taxa = pd.DataFrame(), pd.DataFrame(), pd.DataFrame()
    v = verdict(results, runs, ivs)
    imgs = plots(agg, taxa, results.get("example_tiles", []), names, results.get("example_instances")) if len(agg) else {}
    for k, b in imgs.items():
        with atomic_write(out / k, "wb") as f:
            f.write(b)

    md = [f"# Benchmark `{results['name']}` (scale `{results['scale']}`)", "", *v, "", "## Protocol",
          *_protocol(results), "",
          "## Arms", *[f"- {ARMS[a]}" for a in cfg["arms"] if cfg["arms"][a] is not None and a in ARMS], ""]
    if results.get("skipped_arms"):
        md += ["## Arms not run", *[f"- {ARMS.get(a, a)}: {why}" for a, why in results["skipped_arms"].items()], ""]
    if len(agg):
        test_iv = ivs[ivs.test == "test"]
        md += ["## Results (mean and sd over seeds)", _md_table(agg.round(4)), "",
               "## mAP50 difference against real-only, points (95 % interval: test images x paired seeds)",
               _interval_table(test_iv) if len(test_iv) else "(only the real-only arm was run)", "",
               "## Paired differences over seeds alone (same fraction and seed)",
               _md_table(diffs[["metric", "arm", "fraction", "mean_diff", "std_diff", "n_pairs", "wins"]]
                         .round(4)) if len(diffs) else "(only the real-only arm was run)", ""]
        t = taxa.pivot_table(index=["taxon", "fraction"], columns="arm", values="ap50").reset_index().round(4)
        rare = cfg.get("rare_taxa") or []
        md += ["## Per-taxon AP50 (mean over seeds)", _md_table(t[~t.taxon.isin(rare)]), ""]
        if rare:
            md += ["### Rare taxa (reported apart)", _md_table(t[t.taxon.isin(rare)]), ""]
    for name, ft in results.get("further_tests", {}).items():
        info, fr = ft["info"], pd.DataFrame(ft["runs"])
        md += [f"## Further test set `{name}`",
               f"- `{info['path']}`: {info['images']} images, {info['boxes']} boxes; {info['share_tile']} images share "
               f"a source tile and {info['share_frame']} a source frame with the run's training images "
               "(train and validation).", ""]
        if len(fr):
            md += [_md_table(aggregate(fr).round(4)), ""]
            fiv = ivs[ivs.test == name]
            if len(fiv):
                md += ["mAP50 difference against real-only, points:", _interval_table(fiv), ""]
    if results.get("stage_seconds"):
        md += ["## Stage wall times (this run's stages; cached ones with the time they took when they ran)",
               _md_table(stage_times(results["stage_seconds"]).round(1)), ""]
    md += [f"![{k}]({k})" for k in imgs] + ["", f"Stages run {results['stages']['ran']}, cached "
                                               f"{results['stages']['cached']}."]
    text = "\n".join(md) + "\n"
    with atomic_write(out / "report.md") as f:
        f.write(text)
    _write_html(text, imgs, out / "report.html")
    return out / "report.md"


def _write_html(md: str, imgs: dict[str, bytes], path: Path) -> None:
    """Minimal markdown -> HTML (headings, lists, tables, bold, images inlined as base64)."""
    import re

    body, table = [], []

    def flush_table() -> None:
        if table:
            rows = [r.strip("|").split("|") for r in table if not r.startswith("|---")]
            head, *rest = rows
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>"
                                  for r in rest) + "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        m = re.match(r"!\[(.*)\]\((.*)\)", line)
        if m and m.group(2) in imgs:
            b64 = base64.b64encode(imgs[m.group(2)]).decode()
            body.append(f'<img alt="{m.group(1)}" src="data:image/png;base64,{b64}"/>')
            continue
        esc = html.escape(line)
        esc = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", esc)
        esc = re.sub(r"`(.+?)`", r"<code>\1</code>", esc)
        if line.startswith("#"):
            n = len(line) - len(line.lstrip("#"))
            body.append(f"<h{n}>{esc[n:].strip()}</h{n}>")
        elif line.startswith("- "):
            body.append(f"<li>{esc[2:]}</li>")
        elif line.strip():
            body.append(f"<p>{esc}</p>")
    flush_table()
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}img{max-width:100%}")
    with atomic_write(path) as f:
        f.write(f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>"
                + "\n".join(body) + "</body></html>\n")
