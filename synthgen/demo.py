"""`synthgen demo`: a tour of the data and taxonomy steps on the shared data (../shared/data).

The main job end to end is `synthgen benchmark` (README). This tour inspects both datasets, resolves
every label through the shipped taxonomy and cuts training chips of the train split. Every step is resumable (chips skip what the
manifest already holds), so a rerun after a kill finishes the job.
"""

from __future__ import annotations

from pathlib import Path

from detection import read_dataset
from detection.chips import ChipConfig, make_chips
from detection.inspect import inspect_dataset
from synthgen.errors import SynthgenError
from synthgen.io_utils import atomic_write, write_json

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DATASETS = {"aquarium": "aquarium.csv", "glacierbay-seals": "glacierbay-seals.csv"}


def run_demo(data_root: str | Path, out: str | Path, chips: ChipConfig | None = None,
             progress: bool = True) -> dict:
    """Inspect, resolve labels and cut chips for each shared dataset; writes OUT/summary.{json,md}."""
    from taxonomy import Taxonomy

    data_root, out = Path(data_root), Path(out)
    summary: dict = {"data_root": str(data_root.resolve()), "datasets": {}}
    for name, tax_file in DATASETS.items():
        folder = data_root / name
        if not (folder / "data.yaml").is_file():
            raise SynthgenError(f"{folder}: dataset not found (expected {name}/data.yaml under {data_root})")
        ds = read_dataset(folder)
        stats = inspect_dataset(ds)
        write_json(out / name / "inspect.json", stats)
        tax = Taxonomy.load(CONFIGS / "taxonomy" / tax_file)
        resolved = {}
        for label in ds.names:
            t = tax.labels.get(label) or tax.resolve(label)
            resolved[label] = {"taxon": t.name, "level": t.level, "text": tax.bioclip_text(t)}
        c = make_chips(ds, out / name / "chips", chips, taxonomy=CONFIGS / "taxonomy" / tax_file, split="train",
                       progress=progress)
        summary["datasets"][name] = {
            "images": {s: v["images"] for s, v in stats["splits"].items()},
            "boxes": {s: v["boxes_per_class"] for s, v in stats["splits"].items()},
            "empty_images": {s: v["empty_images"] for s, v in stats["splits"].items()},
            "taxa": resolved, "chips": c["total"], "chips_manifest": c["manifest"],
        }
    write_json(out / "summary.json", summary)
    md = out / "summary.md"
    with atomic_write(md) as f:
        f.write(_markdown(summary))
    return {"datasets": len(summary["datasets"]), "chips": sum(d["chips"] for d in summary["datasets"].values()),
            "summary": str(md), "details": summary}


def _markdown(summary: dict) -> str:
    lines = ["# synthgen demo", "", f"Data: `{summary['data_root']}`", ""]
    for name, d in summary["datasets"].items():
        lines += [f"## {name}", "", "| split | images | empty | boxes |", "|---|---:|---:|---:|"]
        for s, n in d["images"].items():
            lines.append(f"| {s} | {n} | {d['empty_images'][s]} | {sum(d['boxes'][s].values())} |")
        lines += ["", "| label | taxon | level | train boxes |", "|---|---|---|---:|"]
        for label, t in d["taxa"].items():
            lines.append(f"| {label} | {t['taxon']} | {t['level']} | {d['boxes'].get('train', {}).get(label, 0)} |")
        lines += ["", f"{d['chips']} training chips: `{d['chips_manifest']}`", ""]
    return "\n".join(lines)
