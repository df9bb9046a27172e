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


def test_geojson_without_crs_is_wgs84(geo, osbs, tmp_path):
    """RFC 7946: no `crs` member means WGS84. Lon/lat reads; projected metres are an error naming
    the file (before: exit 0 with all-NaN boxes)."""
    import json

    import geopandas as gpd

    from detection import DataError

    f = write_dataset(osbs, tmp_path / "utm", "geojson") / "train.geojson"
    lonlat = json.loads(gpd.read_file(f).to_crs("EPSG:4326").to_json())
    assert "crs" not in lonlat
    (tmp_path / "lonlat.geojson").write_text(json.dumps(lonlat))
    back = read_dataset(tmp_path / "lonlat.geojson")
    assert len(back.boxes) == 61 and np.isfinite(back.boxes[["xmin", "ymin", "xmax", "ymax"]].to_numpy()).all()
    utm = json.loads(f.read_text())
    utm.pop("crs", None)
    (tmp_path / "utm.geojson").write_text(json.dumps(utm))
    with pytest.raises(DataError, match="outside longitude/latitude range of WGS 84") as e:
        read_dataset(tmp_path / "utm.geojson")
    assert str(e.value).startswith(str(tmp_path / "utm.geojson"))


@pytest.fixture
def pixel_layer(geo, tmp_path):
    """A plain PNG (no CRS) and two boxes drawn on it in pixels, with no .prj."""
    import geopandas as gpd
    from PIL import Image
    from shapely.geometry import box

    Image.open(geo / "AWPE_Pigeon_Lake_2020_DJI_0005.JPG").save(tmp_path / "colony.png")

    def layer(boxes, name="colony"):
        gdf = gpd.GeoDataFrame({"label": ["pelican"] * len(boxes)}, geometry=[box(*b) for b in boxes], crs=None)
        with pytest.warns(UserWarning, match="crs"):
            gdf.to_file(tmp_path / f"{name}.shp")
        return tmp_path / f"{name}.shp"
    return layer


def test_vector_in_pixel_coordinates(pixel_layer, tmp_path):
    """No CRS on either side: pixel coordinates, y negated when every y <= 0 (before: unreadable)."""
    want = [[100, 200, 140, 220], [500, 860, 530, 900]]
    up = pixel_layer([(100, -220, 140, -200), (500, -900, 530, -860)])
    for kw in ({}, {"pixel_y": "up"}):  # auto finds every y <= 0
        ds = read_dataset(up, **kw)  # the image is found beside the file by its stem
        assert ds.boxes[["xmin", "ymin", "xmax", "ymax"]].to_numpy().tolist() == want
        assert ds.images.image_path.tolist() == [str(tmp_path / "colony.png")] and ds.boxes.geometry.isna().all()
        assert len(ds.notes) == 1 and "image pixel coordinates, y negated" in ds.notes[0]
    down = pixel_layer([(100, 200, 140, 220), (500, 860, 530, 900)], "down")
    ds = read_dataset(down, raster=tmp_path / "colony.png")
    assert ds.boxes[["xmin", "ymin", "xmax", "ymax"]].to_numpy().tolist() == want and "y down" in ds.notes[0]
    skipped = read_dataset(up, raster=tmp_path / "colony.png", pixel_y="down", on_error="skip")
    assert len(skipped.boxes) == 0 and "outside raster colony.png" in skipped.problems[0]["reason"]
    with pytest.raises(ValueError, match="pixel_y"):
        read_dataset(up, pixel_y="sideways")


def test_pixel_vector_over_georeferenced_raster_is_refused(geo, pixel_layer):
    from detection import DataError

    shp = pixel_layer([(1, -20, 10, -10)])
    with pytest.raises(DataError, match="vector file has no CRS .* but OSBS_029.tif is georeferenced") as e:
        read_dataset(shp, raster=geo / "OSBS_029.tif")
    assert str(e.value).startswith(str(shp))
