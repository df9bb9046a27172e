"""Bootstrap intervals of paired differences, and native-scale windows, on small hand-made cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from detection.metrics import evaluate
from synthgen.benchmark.data import cut_windows
from synthgen.benchmark.power import image_flags, paired_interval, weighted_map50


def _case(rng: np.random.Generator, n_images: int, hit_rate: float):
    """GT: 3 boxes per image; predictions: each GT found with `hit_rate`, plus one false positive."""
    gt, pred = [], []
    for i in range(n_images):
        for k in range(3):
            box = [10 + 30 * k, 10, 30 + 30 * k, 30]
            gt.append([f"im{i}", *box, "seal"])
            if rng.random() < hit_rate:
                pred.append([f"im{i}", *box, "seal", rng.uniform(0.3, 1.0)])
        pred.append([f"im{i}", 200, 200, 220, 220, "seal", rng.uniform(0.0, 0.8)])
    cols = ["image_path", "xmin", "ymin", "xmax", "ymax", "label"]
    return pd.DataFrame(gt, columns=cols), pd.DataFrame(pred, columns=[*cols, "score"])


def test_weighted_map50_matches_the_evaluator_and_reweights_images():
    rng = np.random.default_rng(0)
    gt, pred = _case(rng, 20, 0.6)
    images = [f"im{i}" for i in range(20)]
    f = image_flags(gt, pred, images, ["seal"])
    ref = evaluate(gt, pred, images=images, names=["seal"]).map50
    assert abs(weighted_map50(f, np.ones(20)) - ref) < 1e-9
    w = np.zeros(20)
    w[:5] = 2.0  # images counted twice equal the evaluator on those images
    assert abs(weighted_map50(f, w) - evaluate(gt, pred, images=images[:5], names=["seal"]).map50) < 1e-9


def test_interval_excludes_zero_only_for_a_real_difference():
    rng = np.random.default_rng(1)
    images = [f"im{i}" for i in range(60)]
    base, same, better = {}, {}, {}
    for seed in range(3):
        gt, p = _case(rng, 60, 0.5)
        base[seed] = image_flags(gt, p, images, ["seal"])
        _, p2 = _case(rng, 60, 0.5)
        same[seed] = image_flags(gt, p2, images, ["seal"])
        _, p3 = _case(rng, 60, 0.9)
        better[seed] = image_flags(gt, p3, images, ["seal"])
    null = paired_interval(same, base, 60, n_boot=300)
    assert null["lo"] < 0 < null["hi"] and null["n_seeds"] == 3
    win = paired_interval(better, base, 60, n_boot=300)
    assert win["lo"] > 0 and win["lo"] <= win["mean"] <= win["hi"]
    assert abs(win["half_width"] - (win["hi"] - win["lo"]) / 2) < 1e-12
    assert paired_interval(better, base, 60, n_boot=300) == win  # seeded: the same interval each time
    assert paired_interval({}, base, 60)["n_seeds"] == 0


def test_windows_keep_native_pixels_and_clip_cut_boxes(tmp_path):
    img_dir, lab_dir = tmp_path / "d" / "images", tmp_path / "d" / "labels"
    img_dir.mkdir(parents=True)
    lab_dir.mkdir()
    yy, xx = np.mgrid[0:640, 0:640]  # smooth, so JPEG keeps it close and a shift or resize would not
    arr = np.stack([xx * 255 // 639, yy * 255 // 639, (xx + yy) * 255 // 1278], -1).astype(np.uint8)
    Image.fromarray(arr).save(img_dir / "t.png")
    # a 40 px box inside the top-left window, one straddling x=320 (70 % left), one 25 % inside at the right
    boxes = [(20, 20, 60, 60), (292, 100, 332, 140), (350, 400, 390, 440)]
    (lab_dir / "t.txt").write_text("".join(f"0 {(a + c) / 1280} {(b + d) / 1280} {(c - a) / 640} {(d - b) / 640}\n"
                                           for a, b, c, d in boxes))
    before = (img_dir / "t.png").read_bytes()
    index = cut_windows([str(img_dir / "t.png")], tmp_path / "w", 320, 0.0, 0.5)
    wins = index[str(img_dir / "t.png")]
    assert len(wins) == 4 and (img_dir / "t.png").read_bytes() == before  # the input is only read
    assert all(Image.open(w).size == (320, 320) for w in wins)
    labels = {w.split("__")[-1][:-4]: (tmp_path / "w" / "labels" / (w.split("/")[-1][:-4] + ".txt")).read_text()
              .split("\n")[:-1] for w in wins}
    assert len(labels["0_0"]) == 2 and labels["320_0"] == [] and len(labels["320_320"]) == 1
    _, cx, cy, bw, bh = (float(v) for v in labels["0_0"][0].split())
    assert abs(bw * 320 - 40) < 1e-3 and abs(cx * 320 - 40) < 1e-3  # full resolution: 40 px stays 40 px
    _, cx, _, bw, _ = (float(v) for v in labels["0_0"][1].split())
    assert abs(bw * 320 - 28) < 1e-3 and abs((cx + bw / 2) * 320 - 320) < 1e-3  # clipped at the window edge
    crop = np.asarray(Image.open(wins[0]).convert("RGB")).astype(int)
    assert np.abs(crop - arr[:320, :320]).mean() < 2  # JPEG of the same pixels, not a resize


def test_learning_curve_chooses_the_first_epoch_near_the_plateau():
    from synthgen.benchmark.curve import choose_epochs

    curve = {2: 0.10, 4: 0.30, 6: 0.42, 8: 0.47, 10: 0.48, 12: 0.485, 14: 0.48}
    rows = [{"seed": s, "epoch": e, "map50": m + (0.01 if s else -0.01)} for s in (0, 1) for e, m in curve.items()]
    mean, smooth, plateau, chosen = choose_epochs(pd.DataFrame(rows), 0.01)
    assert list(mean.index) == sorted(curve) and abs(mean[8] - 0.47) < 1e-12  # seeds averaged
    assert abs(plateau - (0.485 + 0.48) / 2) < 1e-12  # running mean (2 points at the end) damps a lucky one
    assert chosen == 10  # 8's running mean (0.4567) is 2.6 points short; 10's (0.4783) is within 1
    assert choose_epochs(pd.DataFrame(rows), 0.5)[3] == 2
