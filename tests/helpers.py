"""Helpers shared by several test modules (real aquarium and seal chips, tiny judges, noise chips,
a tiny open_clip model, a lying JPEG header), so that no test module imports another."""

from __future__ import annotations

import functools
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synthgen.scoring import JudgeConfig, train_judge

AQUARIUM = Path(__file__).resolve().parents[2] / "shared" / "data" / "aquarium"
SEALS = AQUARIUM.parent / "glacierbay-seals"
LINEAGE = {  # from ../shared/data/aquarium/README.md
    "fish": ("Actinopterygii", {"kingdom": "Animalia", "phylum": "Chordata", "class": "Actinopterygii"}),
    "jellyfish": ("Scyphozoa", {"kingdom": "Animalia", "phylum": "Cnidaria", "class": "Scyphozoa"}),
    "penguin": ("Spheniscidae", {"kingdom": "Animalia", "phylum": "Chordata", "class": "Aves",
                                 "order": "Sphenisciformes", "family": "Spheniscidae"}),
    "puffin": ("Fratercula", {"kingdom": "Animalia", "phylum": "Chordata", "class": "Aves",
                              "order": "Charadriiformes", "family": "Alcidae", "genus": "Fratercula"}),
    "shark": ("Selachimorpha", {"kingdom": "Animalia", "phylum": "Chordata", "class": "Chondrichthyes",
                                "clade:class": "Selachimorpha"}),
    "starfish": ("Asteroidea", {"kingdom": "Animalia", "phylum": "Echinodermata", "class": "Asteroidea"}),
    "stingray": ("Myliobatiformes", {"kingdom": "Animalia", "phylum": "Chordata", "class": "Chondrichthyes",
                                     "order": "Myliobatiformes"}),
}
NAMES = ["fish", "jellyfish", "penguin", "puffin", "shark", "starfish", "stingray"]


def make_chips(out: Path, labels: tuple[str, ...], per_class: dict[str, int], size: int = 48,
               min_side: int = 12) -> Path:
    """A chips folder in the ARCHITECTURE.md layout, cropped from real aquarium boxes with PIL
    (square crop with 10% context), `per_class[split]` chips per label and split."""
    rows = []
    for split, folder in (("train", "train"), ("valid", "valid")):
        counts = dict.fromkeys(labels, 0)
        for lab in sorted((AQUARIUM / folder / "labels").glob("*.txt")):
            img_path = AQUARIUM / folder / "images" / (lab.stem + ".jpg")
            todo = []
            for k, line in enumerate(lab.read_text().splitlines()):
                c, cx, cy, w, h = line.split()[:5]
                name = NAMES[int(c)]
                if name in labels and counts[name] < per_class[split]:
                    todo.append((k, name, *map(float, (cx, cy, w, h))))
            if not todo:
                continue
            with Image.open(img_path) as im:
                im = im.convert("RGB")
                W, H = im.size
                for k, name, cx, cy, w, h in todo:
                    side = max(w * W, h * H) * 1.1
                    if side < min_side or counts[name] >= per_class[split]:
                        continue
                    x0, y0 = cx * W - side / 2, cy * H - side / 2
                    box = [round(v, 1) for v in (x0, y0, x0 + side, y0 + side)]
                    f = f"{split}/{name}/{lab.stem[:40]}_{k}.png"
                    (out / split / name).mkdir(parents=True, exist_ok=True)
                    im.crop(tuple(int(v) for v in box)).resize((size, size), Image.BICUBIC).save(out / f)
                    taxon, lin = LINEAGE[name]
                    rows.append({"file": f, "source_image": str(img_path), "box": box, "label": name,
                                 "taxon": taxon, "lineage": lin, "split": split, "size": size})
                    counts[name] += 1
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@functools.cache
def tiny_chips() -> Path:
    """Three visually distinct aquarium taxa, shared by the scoring, filter and metrics tests."""
    return make_chips(Path(tempfile.mkdtemp(prefix="synthgen-chips-")), ("jellyfish", "penguin", "starfish"),
                      {"train": 60, "valid": 25})


TINY_JUDGE = JudgeConfig(arch="resnet18", pretrained=None, width=0.25, img_size=32, epochs=10, batch_size=32, lr=3e-3,
                         device="cpu")  # from scratch: seconds; the pretrained default has its own test


@functools.cache
def tiny_judge() -> tuple[Path, dict]:
    out = Path(tempfile.mkdtemp(prefix="synthgen-judge-"))
    return out, train_judge(tiny_chips(), out, TINY_JUDGE)


SEAL_JUDGE = TINY_JUDGE.model_copy(update={"epochs": 60})  # 120 steps: 60 left 40 % of noise scoring as seal (torch 2.14)


@functools.cache
def seal_chips() -> tuple[Path, Path]:
    """Seal chips and as many background chips from 60 train + 30 valid tiles (32 px)."""
    from detection import read_dataset
    from detection.chips import ChipConfig, make_background_chips
    from detection.chips import make_chips as cut

    ds = read_dataset(SEALS)
    im = ds.images.sort_values("image_path")
    ds = ds.subset(images=list(im[im.split == "train"].image_path[::7][:60]) +
                   list(im[im.split != "train"].image_path[::3][:30]))
    out = Path(tempfile.mkdtemp(prefix="synthgen-seals-"))
    cut(ds, out / "chips", ChipConfig(size=32), split=None, progress=False,
        taxonomy=Path(__file__).resolve().parents[1] / "configs" / "taxonomy" / "glacierbay-seals.csv")
    make_background_chips(ds, out / "background", None, ChipConfig(size=32), split=None, progress=False)
    return out / "chips", out / "background"


@functools.cache
def seal_judge() -> tuple[Path, dict]:
    out = Path(tempfile.mkdtemp(prefix="synthgen-seal-judge-"))
    chips, background = seal_chips()
    return out, train_judge(chips, out, SEAL_JUDGE, background=background)


def noise_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Pure Gaussian-noise chips: what an untrained generator emits."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(np.clip(rng.normal(128, 50, (32, 32, 3)), 0, 255).astype(np.uint8)) for _ in range(n)]


def tiny_open_clip(folder: Path) -> Path:
    """A random tiny ViT + text transformer saved in open_clip's hub layout (config + safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]}}))
    return folder


def patch_jpeg_size(img: Path, w: int, h: int) -> None:
    """Rewrite the frame header (SOFn) so it claims w x h; the compressed data stays as it was."""
    b = bytearray(img.read_bytes())
    i = 2
    while b[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + struct.unpack(">H", b[i + 2:i + 4])[0]
    b[i + 5:i + 9] = struct.pack(">HH", h, w)
    img.write_bytes(bytes(b))
