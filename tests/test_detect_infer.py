"""synthgen detect: tiling, border merging, outputs on the real pelican frame and the OSBS GeoTIFF."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio

from detection.infer import SliceConfig, detect, merge_detections, tile_origins
from synthgen.errors import SynthgenError


def test_tile_origins_cover_frame_with_overlap():
    assert tile_origins(1058, 640, 0.2) == [0, 418]  # last tile flush with the edge
    assert tile_origins(400, 640, 0.2) == [0]
    o = tile_origins(1000, 256, 0.25)
    assert o[0] == 0 and o[-1] == 1000 - 256 and all(b - a <= 192 for a, b in zip(o, o[1:], strict=False))


def test_nmm_merges_a_box_cut_by_a_tile_border_and_keeps_neighbours():
    boxes = np.array([[100, 10, 140, 50], [120, 10, 140, 50], [300, 10, 340, 50], [100, 10, 140, 50]], float)
    scores = np.array([0.9, 0.6, 0.8, 0.7])
    classes = np.array([0, 0, 0, 1])
    b, s, c = merge_detections(boxes, scores, classes, "nmm", 0.5)
    # the half box (120..140) lies inside the whole one: merged; other class and far box stay
    assert len(b) == 3
    assert sorted(zip(c.tolist(), s.tolist(), strict=True)) == [(0, 0.8), (0, 0.9), (1, 0.7)]
    b2, _, _ = merge_detections(boxes, scores, classes, "nms", 0.5)
    assert len(b2) == 4  # IoU of the half box is exactly 0.5 -> not above, NMS keeps it


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """An untrained yolov8n (random init, built offline from the yaml), saved as .pt and .safetensors."""
    from ultralytics import YOLO

    from detection.train import export_safetensors, make_ultralytics_offline

    make_ultralytics_offline()
    d = tmp_path_factory.mktemp("model")
    m = YOLO("yolov8n.yaml")
    m.save(d / "tiny.pt")
    export_safetensors(d / "tiny.pt")
    return d / "tiny.pt"


# untrained heads start near sigmoid(log(5 / nc / 80**2)) ~ 1e-5: a tiny threshold still yields boxes
CFG = SliceConfig(tile=256, overlap=0.2, batch=4, conf=1e-7, max_det=200)


def test_detect_pelican_jpeg_csv_and_coco(tiny_model, geo, tmp_path):
    src = geo / "AWPE_Pigeon_Lake_2020_DJI_0005.JPG"
    s = detect(tiny_model, src, tmp_path / "out", CFG, device="cpu", progress=False)
    df = pd.read_csv(s["csv"])
    assert list(df.columns) == ["image_path", "xmin", "ymin", "xmax", "ymax", "label", "score"]
    assert len(df) == s["detections"] > 0  # random weights still fire at a tiny threshold
    assert (df.xmin >= 0).all() and (df.xmax <= 1058).all() and (df.ymax <= 997).all()
    assert (df.xmax > 1058 - 256).any() or (df.xmin > 256).any()  # boxes shifted out of the first tile
    coco = json.loads(Path(s["coco"]).read_text())
    assert coco["images"][0]["width"] == 1058 and coco["images"][0]["height"] == 997
    assert len(coco["annotations"]) == len(df)
    assert s["gpkg"] == []  # plain JPEG: no CRS, no GeoPackage

    # rerun resumes from the journal: no duplicates, identical table
    s2 = detect(tiny_model, src, tmp_path / "out", CFG, device="cpu", progress=False)
    assert s2["detections"] == len(df)
    pd.testing.assert_frame_equal(pd.read_csv(s2["csv"]), df)


def test_detect_geotiff_writes_gpkg_in_map_crs(tiny_model, geo, tmp_path):
    tif = geo / "OSBS_029.tif"
    model = tiny_model.with_suffix(".safetensors")  # the unpickled path works end to end
    s = detect(model, tif, tmp_path / "geo", CFG, device="cpu", progress=False)
    df = pd.read_csv(s["csv"])
    gdf = gpd.read_file(s["gpkg"][0])
    assert gdf.crs.to_epsg() == 32617
    assert len(gdf) == len(df) > 0
    with rasterio.open(tif) as r:
        t, bounds = r.transform, r.bounds
    first = df.iloc[0]
    x, y = t @ (first.xmin, first.ymin)
    minx, miny, maxx, maxy = gdf.geometry.iloc[0].bounds
    assert minx == pytest.approx(x) and maxy == pytest.approx(y)  # north-up: pixel ymin is map ymax
    assert maxx - minx == pytest.approx((first.xmax - first.xmin) * 0.1)  # 0.1 m pixels
    tb = gdf.total_bounds
    assert tb[0] >= bounds.left - 1e-6 and tb[2] <= bounds.right + 1e-6
    assert tb[1] >= bounds.bottom - 1e-6 and tb[3] <= bounds.top + 1e-6


def test_same_predictions_from_pt_and_safetensors(tiny_model, geo, tmp_path):
    a = detect(tiny_model, geo / "OSBS_029.tif", tmp_path / "a", CFG, device="cpu", progress=False)
    b = detect(tiny_model.with_suffix(".safetensors"), geo / "OSBS_029.tif", tmp_path / "b", CFG,
               device="cpu", progress=False)
    pa, pb = pd.read_csv(a["csv"]), pd.read_csv(b["csv"])
    assert len(pa) == len(pb)
    np.testing.assert_allclose(pa[["xmin", "ymin", "xmax", "ymax"]], pb[["xmin", "ymin", "xmax", "ymax"]], atol=1e-3)


def test_missing_model_and_source_errors(tiny_model, tmp_path):
    with pytest.raises(SynthgenError, match="not found"):
        detect(tmp_path / "none.pt", tmp_path / "src", tmp_path / "o", progress=False)
    with pytest.raises(SynthgenError, match="does not exist"):
        detect(tiny_model, tmp_path / "missing.jpg", tmp_path / "o", progress=False)


def test_cli_detect_and_train_detector_errors(tiny_model, geo, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    r = CliRunner().invoke(app, ["detect", "--model", str(tiny_model), "--source", str(geo / "OSBS_029.tif"),
                                 "--out", str(tmp_path / "cli"), "--tile", "256", "--conf", "1e-7",
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "detections in 1 images" in r.output and (tmp_path / "cli" / "OSBS_029.gpkg").is_file()
    r = CliRunner().invoke(app, ["train-detector", "--data", str(tmp_path / "missing.yaml"),
                                 "--out", str(tmp_path / "t"), "--device", "cpu"])
    out = " ".join(r.output.split())  # rich wraps long lines
    assert r.exit_code == 1 and "missing.yaml not found" in out and "Traceback" not in out


# --- checkpoints must not run code (issue 20, defect 2) -------------------------------------------
class _RunsShell:
    """Unpickling this runs `touch MARKER` (what a crafted .pt does to whoever loads it)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _crafted_pt(tmp_path: Path, payload) -> Path:
    import torch

    pt = tmp_path / "crafted.pt"
    torch.save({"model": payload, "train_args": {}}, pt)
    return pt


def _activation_payload(marker: Path):
    """A checkpoint naming only an ultralytics class, whose constructor evals the yaml's activation."""
    from ultralytics.nn.tasks import DetectionModel

    class Build:
        def __reduce__(self):
            cfg = {"activation": f"__import__('os').system('touch {marker}')", "nc": 1,
                   "backbone": [[-1, 1, "Conv", [16, 3, 2]]], "head": [[-1, 1, "Detect", ["nc"]]]}
            return DetectionModel, (cfg,)

    return Build()


@pytest.mark.parametrize("payload", ["shell", "constructor"])
def test_crafted_checkpoint_is_refused_without_running_code(tmp_path, payload):
    from typer.testing import CliRunner

    from cli import app

    marker = tmp_path / "marker"
    pt = _crafted_pt(tmp_path, _RunsShell(marker) if payload == "shell" else _activation_payload(marker))
    assert not marker.exists()
    r = CliRunner().invoke(app, ["detect", "--model", str(pt), "--source", str(tmp_path / "src.jpg"),
                                 "--out", str(tmp_path / "pred"), "--device", "cpu"])
    assert not marker.exists(), "loading the checkpoint ran its code"
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "crafted.pt" in lines[0] and "--trust-checkpoint" in lines[0], r.output


def test_trusted_checkpoint_opt_in_unpickles_in_full(tmp_path):
    from detection.train import load_torch_checkpoint, trusted_checkpoints

    marker = tmp_path / "marker"
    pt = _crafted_pt(tmp_path, _RunsShell(marker))
    with trusted_checkpoints(pt):
        load_torch_checkpoint(pt)
    assert marker.exists()  # the user's explicit choice: full unpickling
    marker.unlink()
    with pytest.raises(SynthgenError, match="trust-checkpoint"):  # the opt-in ends with the block
        load_torch_checkpoint(pt)
    assert not marker.exists()


def test_safetensors_export_with_a_crafted_activation_is_refused(tiny_model, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = tiny_model.with_suffix(".safetensors")
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    marker = tmp_path / "marker"
    yml = json.loads(meta["yaml"]) | {"activation": f"__import__('os').system('touch {marker}')"}
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(src)), str(bad), metadata={**meta, "yaml": json.dumps(yml)})
    with pytest.raises(SynthgenError, match="activation"):
        detect(bad, tmp_path / "src", tmp_path / "o", progress=False)
    assert not marker.exists()


# --- outputs: inside the source refused, previews, GeoTIFF without CRS ---------------------------
def test_detect_out_inside_the_source_folder_is_refused(tiny_model, geo, tmp_path):
    src = tmp_path / "frames"
    src.mkdir()
    (src / "pelican.jpg").symlink_to(geo / "AWPE_Pigeon_Lake_2020_DJI_0005.JPG")
    with pytest.raises(SynthgenError, match="inside the input"):
        detect(tiny_model, src, src / "pred", CFG, device="cpu", progress=False)
    assert sorted(p.name for p in src.iterdir()) == ["pelican.jpg"]


def test_detect_writes_an_annotated_preview_and_says_when_a_raster_has_no_crs(tiny_model, geo, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from cli import app

    with rasterio.open(geo / "OSBS_029.tif") as src:
        arr = src.read()
    plain = tmp_path / "src" / "nocrs.tif"
    plain.parent.mkdir()
    with rasterio.open(plain, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=3,
                       dtype="uint8") as dst:
        dst.write(arr[:3])
    out = tmp_path / "pred"
    r = CliRunner().invoke(app, ["detect", "--model", str(tiny_model), "--source", str(plain), "--out", str(out),
                                 "--tile", "256", "--conf", "1e-7", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "nocrs.tif: raster without a CRS, so no GeoPackage was written" in text
    assert not list(out.glob("*.gpkg"))
    preview = out / "previews" / "nocrs.jpg"
    df = pd.read_csv(out / "predictions.csv")
    assert len(df) > 0
    img = np.asarray(Image.open(preview).convert("RGB")).astype(int)
    assert img.shape[:2] == (400, 400)
    red = (img[..., 0] > 200) & (img[..., 1] < 90) & (img[..., 2] < 90)  # box outlines
    b = df.iloc[0]
    assert red[int(b.ymin):int(b.ymax) + 2, int(b.xmin):int(b.xmax) + 2].any()
