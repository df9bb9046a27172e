"""Vector boxes over the real GeoTIFF OSBS_029.tif (EPSG:32617, 0.1 m px): pixel <-> map both ways."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from detection import map_to_pixel_boxes, pixel_to_map_boxes, read_dataset, read_georef, write_dataset


@pytest.fixture(scope="module")
def osbs(geo):
    return read_dataset(geo / "OSBS_029.csv")


def test_csv_and_voc_agree(geo, osbs):
    voc = read_dataset(geo / "OSBS_029.xml")
    assert len(osbs.boxes) == len(voc.boxes) == 61
    assert osbs.images.iloc[0].width == 400 and osbs.images.iloc[0].height == 400
    np.testing.assert_array_equal(osbs.boxes[["xmin", "ymin", "xmax", "ymax"]].to_numpy(),
                                  voc.boxes[["xmin", "ymin", "xmax", "ymax"]].to_numpy())


def test_pixel_map_pixel_within_half_pixel(geo, osbs):
    g = read_georef(geo / "OSBS_029.tif")
    assert g.crs.to_epsg() == 32617 and abs(g.transform.a - 0.1) < 1e-9
    px = osbs.boxes[["xmin", "ymin", "xmax", "ymax"]].to_numpy()
    polys = pixel_to_map_boxes(px, g.transform)
    # the map corners are exactly what rasterio says for those pixel corners
    with rasterio.open(geo / "OSBS_029.tif") as src:
        x, y = src.xy(px[0, 1], px[0, 0], offset="ul")
    assert polys[0].bounds[0] == pytest.approx(x) and polys[0].bounds[3] == pytest.approx(y)
    assert polys[0].area == pytest.approx((px[0, 2] - px[0, 0]) * (px[0, 3] - px[0, 1]) * 0.01)
    back = map_to_pixel_boxes(polys, g.transform)
    assert np.abs(back - px).max() < 0.5


@pytest.mark.parametrize("fmt", ["gpkg", "geojson", "shp"])
def test_vector_round_trip(geo, osbs, tmp_path, fmt):
    out = write_dataset(osbs, tmp_path / fmt, fmt)
    f = out / f"train.{fmt}"
    assert f.is_file()
    import geopandas as gpd

    gdf = gpd.read_file(f)
    assert gdf.crs.to_epsg() == 32617 and len(gdf) == 61
    # read back through the image_path column, and with the raster given explicitly
    for kw in ({}, {"raster": geo / "OSBS_029.tif"}):
        back = read_dataset(f, **kw)
        assert back.fmt == "vector" and len(back.boxes) == 61
        assert back.boxes.geometry.notna().all()
        d = np.abs(back.boxes[["xmin", "ymin", "xmax", "ymax"]].to_numpy()
                   - osbs.boxes[["xmin", "ymin", "xmax", "ymax"]].to_numpy())
        assert d.max() < 0.5
        assert set(back.boxes.label) == {"Tree"}


def test_vector_in_other_crs_is_reprojected(geo, osbs, tmp_path):
    """Boxes stored in WGS84 come back onto the UTM raster's pixels (reprojection bends edges a little)."""
    import geopandas as gpd

    f = write_dataset(osbs, tmp_path / "utm", "gpkg") / "train.gpkg"
    gdf = gpd.read_file(f).to_crs("EPSG:4326")
    gdf.to_file(tmp_path / "wgs84.gpkg", driver="GPKG")
    back = read_dataset(tmp_path / "wgs84.gpkg", raster=geo / "OSBS_029.tif")
    d = np.abs(back.boxes[["xmin", "ymin", "xmax", "ymax"]].to_numpy()
               - osbs.boxes[["xmin", "ymin", "xmax", "ymax"]].to_numpy())
    assert d.max() < 0.5


def test_cli_convert_to_geopackage(geo, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    r = CliRunner().invoke(app, ["data", "convert", str(geo / "OSBS_029.xml"), "--out", str(tmp_path), "--to", "gpkg"])
    assert r.exit_code == 0, r.output
    assert "61 boxes" in r.output
    assert len(read_dataset(tmp_path / "train.gpkg").boxes) == 61
