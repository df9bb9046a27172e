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
        detect(tmp_path / "none.pt", tmp_path, tmp_path / "o", progress=False)
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
