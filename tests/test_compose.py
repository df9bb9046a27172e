"""Compositor: masks, label correctness on known shapes, seals end-to-end (resume, worker-count
independence, outputs), GeoTIFF + GeoPackage round trip, and the clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

from synthgen.compose import ComposeConfig, augment_dataset, compose_tile
from synthgen.compose.blend import estimate_jpeg_quality
from synthgen.compose.config import BlendConfig, MaskConfig
from synthgen.compose.masks import check_mask, estimate_mask
from synthgen.compose.pipeline import _init_worker
from synthgen.compose.scale import DatasetSizes
from synthgen.errors import SynthgenError


def _ellipse_chip(size=90, axes=(24, 12), angle=0.0, fg=(20, 20, 20), bg=(235, 235, 235), noise=0, seed=0):
    """A chip cut like `synthgen data chips` (margin 0.15): an ellipse centred on a plain background."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = bg
    cv2.ellipse(img, (size // 2, size // 2), axes, angle, 0, 360, fg, -1)
    if noise:
        img = np.clip(img.astype(int) + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)
    return img


def _write_pool(root: Path, chips: list[np.ndarray], label: str, taxon: str | None = "Phoca vitulina",
                masks: list[np.ndarray] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, c in enumerate(chips):
        Image.fromarray(c).save(root / f"c{i}.png")
        row = {"file": f"c{i}.png", "label": label}
        if taxon is not None:
            row["taxon"] = taxon
        rows.append(row)
        if masks is not None:
            Image.fromarray(masks[i]).save(root / f"m{i}.png")
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


# --- masks ----------------------------------------------------------------------------------------
def test_grabcut_mask_recovers_a_noisy_ellipse():
    chip = _ellipse_chip(noise=12, angle=30)
    truth = np.zeros(chip.shape[:2], np.uint8)
    cv2.ellipse(truth, (45, 45), (24, 12), 30, 0, 360, 1, -1)
    res = estimate_mask(chip)
    assert res.mask is not None, res.reason
    m = res.mask > 0
    iou = (m & (truth > 0)).sum() / (m | (truth > 0)).sum()
    assert iou > 0.9, (res.method, iou)


def test_implausible_masks_are_rejected_with_a_reason():
    blank = np.full((80, 80, 3), 128, np.uint8)
    r = estimate_mask(blank)
    assert r.mask is None and r.reason
    # the "animal" touches the chip edge: cut off, rejected
    cut = _ellipse_chip(axes=(60, 10))
    r = estimate_mask(cut)
    assert r.mask is None and "edge" in r.reason


@pytest.mark.parametrize("region", [(30, 3, 60, 33), (60, 3, 87, 40)])
def test_mask_does_not_leak_into_an_adjacent_region_of_the_animal_colour(region):
    """A dark seal touching dark water that runs out of its box into the chip margin: the mask stays
    on the seal, so the label is its tight box (GrabCut seeded only from the chip frame grew into
    the water, up to the chip's top edge)."""
    chip = _ellipse_chip(axes=(34, 14), fg=(30, 30, 30), noise=8)
    x0, y0, x1, y1 = region
    chip[y0:y1, x0:x1] = np.clip(chip[y0:y1, x0:x1].astype(int) - 190, 0, 255)  # ~45 grey, like the seal
    res = estimate_mask(chip)
    assert res.mask is not None, res.reason
    ys, xs = np.nonzero(res.mask)
    assert np.allclose([xs.min(), ys.min(), xs.max(), ys.max()], [11, 31, 79, 59], atol=1), res.method


def test_mask_disagreeing_with_the_chip_box_is_rejected():
    """Chips centre the animal with its longer side spanning the central box: an off-centre
    fragment is not the chip's animal."""
    m = np.zeros((90, 90), np.uint8)
    cv2.ellipse(m, (55, 50), (22, 8), 0, 0, 360, 255, -1)  # off-centre, 2/3 of the box long
    assert check_mask(m, MaskConfig())[1].startswith("mask box disagrees")
    assert check_mask(m, MaskConfig(min_box_iou=0.2))[0] is not None


# --- label correctness ----------------------------------------------------------------------------
def _state(tmp_path, items, cfg, sizes):
    return {"cfg": cfg, "items": items, "out": tmp_path, "sizes": sizes}


def _ellipse_on_white(tmp_path, axes, cfg, box_side: float):
    """A one-chip pool of a known black ellipse, a white 400 px tile, and a compose worker whose
    dataset boxes are all `box_side` px: returns (tile path, output folder)."""
    import pandas as pd

    chip = _ellipse_chip(axes=axes)
    mask = np.zeros(chip.shape[:2], np.uint8)
    cv2.ellipse(mask, (45, 45), axes, 0, 0, 360, 255, -1)
    pool = _write_pool(tmp_path / "pool", [chip], "seal", masks=[mask])
    bg = tmp_path / "bg.png"
    Image.fromarray(np.full((400, 400, 3), 255, np.uint8)).save(bg)
    items = [{"pool": str(pool), "file": str(pool / "c0.png"), "rel": "c0.png", "label": "seal",
              "taxon": "Phoca vitulina", "cls": 0, "mask": str(pool / "m0.png"), "mask_method": "given"}]
    sizes = DatasetSizes(pd.DataFrame({"xmin": [0.0], "ymin": [0.0], "xmax": [box_side], "ymax": [box_side],
                                       "label": ["seal"]}), jitter=0.3)
    out = tmp_path / "out"
    _init_worker(_state(out, items, cfg, sizes))
    return bg, out


def test_dataset_size_larger_than_the_tile_is_shrunk_to_fit(tmp_path):
    """Photo datasets hold boxes that fill the frame; such a draw must fit the tile, not stop the job."""
    cfg = ComposeConfig(max_rotation_deg=0.0, tile_aug={"p": 0, "jpeg_quality": 100},
                        count={"distribution": "uniform", "low": 1, "high": 1},
                        blend=BlendConfig(mix={"hard": 1.0}, color_match=0.0, shadow_p=0.0))
    bg, out = _ellipse_on_white(tmp_path, (40, 10), cfg, box_side=900.0)
    res = compose_tile({"image_path": str(bg), "copy": 0, "split": "train", "boxes": [],
                        "out_rel": "images/train/bg__syn0.jpg"})
    assert res["row"]["n_pasted"] == 1
    x0, y0, x1, y1 = res["prov"][0]["box"]
    assert 0 <= x0 and 0 <= y0 and x1 <= 400 and y1 <= 400 and x1 - x0 >= 0.9 * 400


@pytest.mark.parametrize("angle_range", [0.0, 180.0])
def test_pasted_labels_are_the_tight_box_of_the_pasted_shape(tmp_path, angle_range):
    """Known black ellipses (known alpha) pasted on a white tile: the written YOLO box equals the box
    of the dark pixels in the output image, and its size equals the rotated ellipse's analytic extent."""
    a, b = 24, 12
    cfg = ComposeConfig(max_rotation_deg=angle_range, max_overlap=0.0, tile_aug={"p": 0, "jpeg_quality": 100},
                        count={"distribution": "uniform", "low": 4, "high": 4},
                        blend=BlendConfig(mix={"hard": 1.0}, color_match=0.0, shadow_p=0.0))
    bg, out = _ellipse_on_white(tmp_path, (a, b), cfg, box_side=40.0)
    checked = 0
    for k in range(4):
        res = compose_tile({"image_path": str(bg), "copy": k, "split": "train", "boxes": [],
                            "out_rel": f"images/train/bg__syn{k}.jpg"})
        img = np.asarray(Image.open(out / res["row"]["output"]).convert("L"))
        n, lab, stats, _ = cv2.connectedComponentsWithStats((img < 128).astype(np.uint8))
        found = sorted(stats[1:, :4].tolist())
        lines = (out / "labels" / "train" / f"bg__syn{k}.txt").read_text().split()
        boxes = []
        for i in range(0, len(lines), 5):
            cx, cy, w, h = (float(v) * 400 for v in lines[i + 1:i + 5])
            boxes.append([cx - w / 2, cy - h / 2, w, h])
        boxes.sort()
        assert len(boxes) == len(found) == res["row"]["n_pasted"] > 0
        for (x, y, w, h), got, prov in zip(found, boxes, sorted(res["prov"], key=lambda p: p["box"]), strict=True):
            assert np.allclose(got, [x, y, w, h], atol=1.0), (got, (x, y, w, h))
            t = math.radians(prov["rotation"])
            s = prov["scale"]
            ew = 2 * s * math.hypot(a * math.cos(t), b * math.sin(t)) + s
            eh = 2 * s * math.hypot(a * math.sin(t), b * math.cos(t)) + s
            assert abs(w - ew) <= 1.5 and abs(h - eh) <= 1.5, (w, h, ew, eh, prov)
            checked += 1
    assert checked >= 8
    if angle_range:
        assert any(abs(p["rotation"]) > 10 for p in res["prov"])


def test_jpeg_quality_is_estimated_from_quantisation_tables(tmp_path):
    img = Image.fromarray(_ellipse_chip(noise=20))
    for q in (60, 90):
        p = tmp_path / f"q{q}.jpg"
        img.save(p, quality=q)
        assert abs(estimate_jpeg_quality(Image.open(p)) - q) <= 1
    assert estimate_jpeg_quality(img) == 90  # not a JPEG: the default


# --- seals end-to-end -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seal_pool(seals, tmp_path_factory):
    """Real seal chips cut from a few training tiles with detection's chip cutter."""
    from detection import read_dataset
    from detection.chips import ChipConfig, make_chips

    ds = read_dataset(seals, splits=["train"])
    sub = ds.subset("train", images=sorted(ds.images.image_path)[200:230])
    out = tmp_path_factory.mktemp("sealchips")
    make_chips(sub, out, ChipConfig(size=96), progress=False)
    return out


def _snapshot(folder: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_seals_augment_end_to_end(seals, seal_pool, configs, tmp_path):
    before = _snapshot(seals / "valid" / "labels")
    out = tmp_path / "out"
    cfg = configs / "compose" / "glacierbay-seals.yaml"
    r = augment_dataset(seals, seal_pool, out, cfg, n_images=6, preview=2)
    assert r.n_tiles == 6 and r.n_pasted > 0
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    prov = [json.loads(x) for x in (out / "provenance.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and len(prov) == r.n_pasted == sum(x["n_pasted"] for x in rows)
    for row in rows:
        assert (out / row["output"]).is_file()
        det = (out / "labels" / "train" / (Path(row["output"]).stem + ".txt")).read_text().splitlines()
        seg = (out / "labels-seg" / "train" / (Path(row["output"]).stem + ".txt")).read_text().splitlines()
        assert len(det) == len(seg) == len(row["real"]) + row["n_pasted"]
        assert all(len(s.split()) >= 7 for s in seg)
        for p in row["pasted"]:  # every pasted box lies on ice per the colour habitat, inside the tile
            x0, y0, x1, y1 = p["box"]
            assert 0 <= x0 < x1 <= row["width"] and 0 <= y0 < y1 <= row["height"]
    d = yaml.safe_load((out / "data.yaml").read_text())
    assert d["train"] == ["train_real.txt", "train_synthetic.txt"] and d["synthetic_ratio"] == 0.5
    val = (out / "val.txt").read_text().split()
    assert len(val) == 151 and all("/valid/" in v for v in val)
    real = set((out / "train_real.txt").read_text().split())
    assert all("/train/" in p for p in real) and not real & set(val)
    assert {p["blend"] for p in prov} <= {"hard", "feather", "gaussian", "poisson", "feather (poisson fallback)"}
    coco = json.loads((out / "annotations" / "instances_train_synthetic.json").read_text())
    assert len(coco["images"]) == 6 and sum(a["synthetic"] for a in coco["annotations"]) == r.n_pasted
    assert len(list((out / "previews").glob("*.png"))) == 2
    masks = json.loads((out / "masks" / "summary.json").read_text())
    assert masks["chips"] == sum(masks["by_method"].values()) and all(r["reason"] for r in masks["rejected"])
    assert len(masks["rejected"]) == r.n_masks_rejected
    assert _snapshot(seals / "valid" / "labels") == before

    # resume after a "kill": drop the last manifest row and add a stale provenance row for it
    last = rows[-1]
    (out / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows[:-1]))
    with open(out / "provenance.jsonl", "a") as f:
        f.write(json.dumps({**prov[0], "tile": last["output"]}) + "\n")
    r2 = augment_dataset(seals, seal_pool, out, cfg, n_images=6)
    rows2 = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    prov2 = [json.loads(x) for x in (out / "provenance.jsonl").read_text().splitlines()]
    assert [x["output"] for x in rows2] == [x["output"] for x in rows[:-1]] + [last["output"]]
    assert rows2[-1] == last  # per-tile seeds: the redone tile is identical
    assert len(prov2) == len(prov) == r2.n_pasted

    # worker count does not change results
    out2 = tmp_path / "out2"
    augment_dataset(seals, seal_pool, out2, cfg, n_images=6, workers=2)
    for row in rows:
        a = (out / "labels" / "train" / (Path(row["output"]).stem + ".txt")).read_text()
        b = (out2 / "labels" / "train" / (Path(row["output"]).stem + ".txt")).read_text()
        assert a == b


def test_output_inside_input_or_pool_is_refused(seals, seal_pool):
    with pytest.raises(SynthgenError, match="inside the input"):
        augment_dataset(seals, seal_pool, seals / "synthetic")
    with pytest.raises(SynthgenError, match=f"inside the input {seal_pool}"):  # the old guard only refused ==
        augment_dataset(seals, seal_pool, seal_pool / "aug")
    assert not (seal_pool / "aug").exists()


# --- GeoTIFF ----------------------------------------------------------------------------------------
def _magenta_pool(tmp_path):
    chips = [_ellipse_chip(axes=(26, 12), fg=(255, 0, 255), bg=(40, 90, 40), seed=i) for i in range(3)]
    return _write_pool(tmp_path / "pool", chips, "tree", taxon="Pinus palustris")


def test_geotiff_output_and_geopackage_boxes_land_on_pasted_instances(geo, tmp_path):
    import geopandas as gpd
    import rasterio

    pool = _magenta_pool(tmp_path)
    cfg = ComposeConfig(scale={"mode": "physical", "body_length_m": {"tree": 3.0}, "jitter": 0.05},
                        count={"distribution": "uniform", "low": 5, "high": 5}, max_overlap=0.0,
                        blend={"mix": {"hard": 1.0}, "color_match": 0.0}, tile_aug={"p": 0})
    out = tmp_path / "out"
    r = augment_dataset(geo / "OSBS_029.tif", pool, out, cfg)
    assert r.n_tiles == 1 and r.n_pasted == 5
    tif = out / "images" / "train" / "OSBS_029__syn0.tif"
    with rasterio.open(tif) as dst, rasterio.open(geo / "OSBS_029.tif") as src:
        assert dst.crs == src.crs and dst.transform == src.transform
        img = dst.read().transpose(1, 2, 0)
        transform = dst.transform
    gdf = gpd.read_file(out / "boxes.gpkg")
    assert gdf.crs.to_epsg() == 32617
    syn = gdf[gdf.synthetic]
    assert len(syn) == 5
    magenta = (img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] > 200)
    inv = ~transform
    for geom in syn.geometry:
        mx0, my0, mx1, my1 = geom.bounds
        px0, py1 = inv @ (mx0, my0)
        px1, py0 = inv @ (mx1, my1)
        x0, y0, x1, y1 = (int(round(v)) for v in (px0, py0, px1, py1))
        inside = magenta[y0:y1, x0:x1]
        ys, xs = np.nonzero(inside)
        assert inside.sum() > 50
        # the magenta shape fills the box to its edges within 1 px (edge pixels mix colours), and no
        # magenta lies in the 2 px ring just outside the box
        assert xs.min() <= 1 and ys.min() <= 1 and xs.max() >= x1 - x0 - 2 and ys.max() >= y1 - y0 - 2
        ring = magenta[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2].sum()
        assert ring == inside.sum()
        # body length 3 m at 0.1 m/px ~ 30 px (+-jitter) along the long axis before rotation
        assert 18 <= max(x1 - x0, y1 - y0) <= 45


def test_geotiff_without_crs_is_a_clear_error_when_scale_needs_gsd(tmp_path):
    pool = _magenta_pool(tmp_path)
    plain = tmp_path / "bg" / "nocrs.tif"
    plain.parent.mkdir()
    Image.fromarray(np.full((200, 200, 3), 90, np.uint8)).save(plain)
    cfg = ComposeConfig(scale={"mode": "physical", "body_length_m": {"tree": 3.0}})
    with pytest.raises(SynthgenError, match=r"nocrs\.tif.*(CRS|GSD)"):
        augment_dataset(plain.parent, pool, tmp_path / "out", cfg)


def test_tile_smaller_than_instance_is_a_clear_error(geo, tmp_path):
    import rasterio

    pool = _magenta_pool(tmp_path)
    with rasterio.open(geo / "OSBS_029.tif") as src:
        prof = src.profile
        arr = src.read(window=((0, 16), (0, 16)))
    prof.update(width=16, height=16)
    small = tmp_path / "bg" / "small.tif"
    small.parent.mkdir()
    with rasterio.open(small, "w", **prof) as dst:
        dst.write(arr)
    cfg = ComposeConfig(scale={"mode": "physical", "body_length_m": {"tree": 6.0}})
    with pytest.raises(SynthgenError, match=r"small\.tif.*smaller than instance"):
        augment_dataset(small, pool, tmp_path / "out", cfg)


def test_pool_errors_name_the_manifest_line(seals, tmp_path):
    chips = [_ellipse_chip()]
    no_taxon = _write_pool(tmp_path / "p1", chips, "seal", taxon=None)
    with pytest.raises(SynthgenError, match=r"manifest\.jsonl:1: .*no taxon"):
        augment_dataset(seals, no_taxon, tmp_path / "o1")
    wrong = _write_pool(tmp_path / "p2", chips, "walrus", taxon="Odobenus rosmarus")
    with pytest.raises(SynthgenError, match=r"manifest\.jsonl:1: .*'walrus'.*not in the dataset's names"):
        augment_dataset(seals, wrong, tmp_path / "o2")


def test_config_yaml_files_load(configs):
    for name in ("glacierbay-seals.yaml", "aquarium.yaml"):
        cfg = ComposeConfig.from_yaml(configs / "compose" / name)
        assert cfg.view in ("nadir", "ground")
    assert ComposeConfig.from_yaml(configs / "compose" / "aquarium.yaml").view == "ground"
    assert MaskConfig().margin == 0.15


def test_cli_augment_dataset_and_its_error_message(geo, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    pool = _magenta_pool(tmp_path)
    cfg = tmp_path / "geo.yaml"
    cfg.write_text(yaml.safe_dump({"scale": {"mode": "physical", "body_length_m": {"tree": 3.0}},
                                   "tile_aug": {"p": 0}}))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["augment-dataset", str(geo / "OSBS_029.tif"), "--pool", str(pool), "--out",
                                   str(out), "--config", str(cfg), "--preview", "1"])
    assert res.exit_code == 0, res.output
    assert "1 tiles" in res.output and str(out / "data.yaml") in res.output.replace("\n", "")
    assert (out / "boxes.gpkg").is_file() and len(list((out / "previews").glob("*.png"))) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("view: sideways\n")
    res = CliRunner().invoke(app, ["augment-dataset", str(geo / "OSBS_029.tif"), "--pool", str(pool), "--out",
                                   str(tmp_path / "o2"), "--config", str(bad)])
    assert res.exit_code == 1 and "bad.yaml" in res.output and "Traceback" not in res.output


def test_image_list_restricts_backgrounds_and_real_list(seals, seal_pool, tmp_path):
    """The benchmark passes its cell's training list: only those tiles are backgrounds and real images."""
    imgs = sorted((seals / "train" / "images").glob("*.jpg"))[:3]
    lst = tmp_path / "train.txt"
    lst.write_text("".join(f"{p}\n" for p in imgs))
    out = tmp_path / "out"
    r = augment_dataset(seals / "data.yaml", seal_pool, out, image_list=lst, seed=1, n_images=5)
    # more than the 3 listed tiles: several copies of some, each its own seed (a copy where nothing was
    # placed is not written)
    assert r.n_tiles + r.n_empty == 5 and r.n_tiles >= 3
    listed = [Path(x).resolve() for x in (out / "train_real.txt").read_text().split()]
    assert listed == [p.resolve() for p in imgs]  # same files, whatever links lead to the data
    assert {Path(x).name.split("__syn")[0] for x in (out / "train_synthetic.txt").read_text().split()} <= {
        p.stem for p in imgs}


def test_vector_habitat_in_map_crs_keeps_pastes_inside_the_polygon(geo, tmp_path):
    """Habitat polygons in another CRS (WGS84) are reprojected to the raster's CRS and burnt onto its grid."""
    import geopandas as gpd
    import rasterio
    from shapely.geometry import box

    with rasterio.open(geo / "OSBS_029.tif") as src:
        t = src.transform
    # the raster's top-left quarter (pixels 0..200) as a polygon, stored in EPSG:4326
    quarter = box(t.c, t.f - 200 * 0.1, t.c + 200 * 0.1, t.f)
    hab = tmp_path / "habitat.gpkg"
    gpd.GeoDataFrame(geometry=[quarter], crs="EPSG:32617").to_crs("EPSG:4326").to_file(hab)
    cfg = ComposeConfig(scale={"mode": "physical", "body_length_m": {"tree": 2.0}, "jitter": 0.05},
                        count={"distribution": "uniform", "low": 6, "high": 6}, tile_aug={"p": 0},
                        habitat={"kind": "vector", "path": str(hab), "min_fraction": 1.0})
    out = tmp_path / "out"
    r = augment_dataset(geo / "OSBS_029.tif", _magenta_pool(tmp_path), out, cfg)
    assert r.n_pasted > 0
    for p in (json.loads(x) for x in (out / "provenance.jsonl").read_text().splitlines()):
        x0, y0, x1, y1 = p["box"]
        assert x1 <= 201 and y1 <= 201, p["box"]  # 1 px for the reprojected polygon's edge


def test_raster_habitat_folder_of_masks(tmp_path):
    """Plain tiles with a per-tile habitat mask (<stem>.png, nonzero = habitat)."""
    bg = tmp_path / "tiles"
    bg.mkdir()
    Image.fromarray(np.full((300, 300, 3), 200, np.uint8)).save(bg / "t1.png")
    masks = tmp_path / "hab"
    masks.mkdir()
    m = np.zeros((300, 300), np.uint8)
    m[150:, 150:] = 255
    Image.fromarray(m).save(masks / "t1.png")
    pool = _write_pool(tmp_path / "pool", [_ellipse_chip(axes=(26, 12))], "seal")
    cfg = ComposeConfig(scale={"mode": "physical"}, count={"distribution": "uniform", "low": 3, "high": 3},
                        habitat={"kind": "raster", "path": str(masks), "min_fraction": 1.0}, tile_aug={"p": 0})
    # plain tiles have no GSD: physical scale is refused with the file named
    with pytest.raises(SynthgenError, match=r"t1\.png"):
        augment_dataset(bg, pool, tmp_path / "o1", cfg.model_copy(update={
            "scale": cfg.scale.model_copy(update={"body_length_m": {"seal": 1.7}})}))
    # dataset scale needs real boxes; a bare folder has none -> clear error
    dcfg = cfg.model_copy(update={"scale": cfg.scale.model_copy(update={"mode": "dataset"})})
    with pytest.raises(SynthgenError, match="no real boxes"):
        augment_dataset(bg, pool, tmp_path / "o2", dcfg)
    # with an explicit size every paste lands inside the habitat quarter
    dcfg = dcfg.model_copy(update={"scale": dcfg.scale.model_copy(update={"size_px": {"seal": 30.0}})})
    r = augment_dataset(bg, pool, tmp_path / "o3", dcfg)
    assert r.n_pasted == 3
    for p in (json.loads(x) for x in (tmp_path / "o3" / "provenance.jsonl").read_text().splitlines()):
        assert p["box"][0] >= 150 and p["box"][1] >= 150, p["box"]


# --- issue 20: bad backgrounds, orphaned workers, empty tiles, banners, summary, label format -------
def _bare_tiles(folder: Path, n: int = 2, size=(300, 400), seed: int = 0) -> Path:
    """Textured grey JPEG tiles (no labels): backgrounds for a bare-folder augment-dataset run."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        img = np.clip(rng.normal(150, 25, (*size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"t{i}.jpg", quality=90)
    return folder


_SIZED = {"scale": {"mode": "dataset", "size_px": {"seal": 30.0}}, "tile_aug": {"p": 0}}


def test_corrupt_background_is_one_line_or_skipped_and_listed(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    bg = _bare_tiles(tmp_path / "bg")
    data = (bg / "t1.jpg").read_bytes()
    (bg / "t1.jpg").write_bytes(data[: len(data) // 2])  # truncated: the header still reads
    pool = _write_pool(tmp_path / "pool", [_ellipse_chip(axes=(26, 12))], "seal")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**_SIZED, "count": {"distribution": "uniform", "low": 2, "high": 2}}))
    base = ["augment-dataset", str(bg), "--pool", str(pool), "--config", str(cfg)]
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "o1")])
    assert r.exit_code == 1 and "Traceback" not in r.output  # stderr holds the progress bars only
    assert len(r.stdout.strip().splitlines()) == 1 and "t1.jpg" in r.stdout and "truncated" in r.stdout
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "o2"), "--on-error", "skip", "--workers", "2"])
    assert r.exit_code == 0, r.output
    assert f"skipped {bg / 't1.jpg'}" in r.output and "1 backgrounds skipped" in r.output
    assert [Path(x).name for x in (tmp_path / "o2" / "train_synthetic.txt").read_text().split()] == ["t0__syn0.jpg"]


@pytest.mark.slow
def test_workers_die_with_their_parent_after_kill_9(tmp_path):
    """kill -9 of augment-dataset --workers 2 left both workers running; they now go with the parent."""
    import os
    import signal
    import subprocess
    import sys
    import time

    bg = _bare_tiles(tmp_path / "bg", n=40, size=(600, 600))
    pool = _write_pool(tmp_path / "pool", [_ellipse_chip(axes=(26, 12), seed=i, noise=8) for i in range(6)], "seal")
    script = (f"from synthgen.compose import ComposeConfig, augment_dataset\n"
              f"cfg = ComposeConfig(**{_SIZED!r}, copies_per_tile=50)\n"
              f"augment_dataset({str(bg)!r}, {str(pool)!r}, {str(tmp_path / 'out')!r}, cfg, workers=2)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        kids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent.pid and fields[0] != "Z":
                kids.append(int(stat.parent.name))
        return kids

    deadline = time.time() + 120
    while len(children()) < 2 and time.time() < deadline and parent.poll() is None:
        time.sleep(0.2)
    workers = children()
    assert len(workers) >= 2, "the workers never started"
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.time() + 5
    while any(alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.1)
    left = [p for p in workers if alive(p)]
    for p in left:  # never leave them behind, even when the test fails
        os.kill(p, signal.SIGKILL)
    assert not left, f"workers {left} outlived their parent"


def test_a_tile_where_nothing_was_placed_is_not_written(tmp_path):
    bg = _bare_tiles(tmp_path / "bg", n=2)
    pool = _write_pool(tmp_path / "pool", [_ellipse_chip(axes=(26, 12))], "seal")
    cfg = ComposeConfig(**_SIZED, count={"distribution": "uniform", "low": 0, "high": 0})
    out = tmp_path / "out"
    r = augment_dataset(bg, pool, out, cfg)
    assert (r.n_tiles, r.n_empty, r.n_pasted) == (0, 2, 0)
    assert not (out / "images").exists() and (out / "train_synthetic.txt").read_text() == ""
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(x["empty"] for x in rows)  # recorded, so a rerun does not redo them
    assert augment_dataset(bg, pool, out, cfg).n_empty == 2


def test_ground_view_pastes_avoid_a_uniform_date_banner(tmp_path):
    bg = _bare_tiles(tmp_path / "bg", n=1)
    img = np.asarray(Image.open(bg / "t0.jpg")).copy()
    img[270:] = 0  # a camera's black date banner along the bottom, with white text
    cv2.putText(img, "2021-06-03 14:22:07", (8, 292), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2)
    Image.fromarray(img).save(bg / "t0.jpg", quality=90)
    pool = _write_pool(tmp_path / "pool", [_ellipse_chip(axes=(26, 12))], "seal")
    cfg = ComposeConfig(**_SIZED, view="ground", copies_per_tile=6, max_overlap=1.0,
                        count={"distribution": "uniform", "low": 10, "high": 10})
    out = tmp_path / "out"
    r = augment_dataset(bg, pool, out, cfg)
    assert r.n_pasted == 60
    boxes = [json.loads(x)["box"] for x in (out / "provenance.jsonl").read_text().splitlines()]
    assert max(b[3] for b in boxes) <= 270, "a paste landed on the banner"
    assert max(b[3] for b in boxes) > 200  # the rest of the frame is still used


def test_summary_says_what_each_pool_gave_and_why_masks_were_rejected(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    bg = _bare_tiles(tmp_path / "bg", n=2)
    good = _write_pool(tmp_path / "good", [_ellipse_chip(axes=(26, 12))], "seal")
    flat = [np.full((90, 90, 3), 128, np.uint8), np.full((90, 90, 3), 200, np.uint8)]  # nothing to cut out
    bad = _write_pool(tmp_path / "bad", flat, "seal")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**_SIZED, "count": {"distribution": "uniform", "low": 2, "high": 2}}))
    r = CliRunner().invoke(app, ["augment-dataset", str(bg), "--pool", str(good), "--pool", str(bad),
                                 "--config", str(cfg), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert f"pool {good}: 4 pasted of 1 instances; 0 masks rejected" in text
    assert f"pool {bad}: 0 pasted of 2 instances; 2 masks rejected (" in text
    summary = json.loads((tmp_path / "out" / "masks" / "summary.json").read_text())
    assert len(summary["rejected"]) == 2


@pytest.mark.slow
def test_obb_input_gives_polygon_labels_and_no_ultralytics_segment_warning(seals, seal_pool, tmp_path):
    """Real OBB tiles (polygons) mixed with box-only synthetic label files made ultralytics drop all
    segments with "Box and segment counts should be equal" on every seal detector run."""
    import logging

    from ultralytics.data.dataset import YOLODataset
    from ultralytics.utils import DEFAULT_CFG, LOGGER

    lst = tmp_path / "train.txt"
    lst.write_text("".join(f"{p}\n" for p in sorted((seals / "train" / "images").glob("*.jpg"))[200:204]))
    out = tmp_path / "out"
    r = augment_dataset(seals, seal_pool, out, image_list=lst, n_images=4, seed=3)
    assert r.n_pasted > 0
    for f in (out / "labels" / "train").glob("*.txt"):
        assert all(len(line.split()) == 9 for line in f.read_text().splitlines())

    class Grab(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    grab = Grab()
    LOGGER.addHandler(grab)
    try:
        ds = YOLODataset(img_path=[str(out / "train_real.txt"), str(out / "train_synthetic.txt")], imgsz=64,
                         augment=False, hyp=DEFAULT_CFG, data={"names": {0: "seal"}, "channels": 3}, task="detect")
    finally:
        LOGGER.removeHandler(grab)
    assert len(ds.labels) == 8 and sum(len(lb["segments"]) for lb in ds.labels) > 0
    assert not [m for m in grab.messages if "segment counts" in m], grab.messages
