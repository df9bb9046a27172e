"""The COCO-style evaluator against hand-worked examples, and paired differences."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from detection.metrics import box_iou, evaluate, paired_differences, summarize


def _df(rows, score=False):
    cols = ["image_path", "xmin", "ymin", "xmax", "ymax", "label"] + (["score"] if score else [])
    return pd.DataFrame(rows, columns=cols)


def test_iou_hand_worked():
    import numpy as np

    iou = box_iou(np.array([[0, 0, 10, 10]], float), np.array([[5, 0, 15, 10], [20, 20, 30, 30]], float))
    assert iou[0, 0] == pytest.approx(50 / 150)
    assert iou[0, 1] == 0.0


def test_ap_hand_worked_example():
    # two seals in one image; predictions: 0.9 hits A, 0.8 is background, 0.7 hits B.
    # precision [1, .5, .667], recall [.5, .5, 1]; envelope -> 1.0 for r <= .5, 2/3 above.
    # 101-point AP50 = (51 * 1 + 50 * 2/3) / 101
    gt = _df([("a.jpg", 0, 0, 10, 10, "seal"), ("a.jpg", 50, 50, 60, 60, "seal")])
    pred = _df(
        [("a.jpg", 0, 0, 10, 10, "seal", 0.9), ("a.jpg", 100, 100, 110, 110, "seal", 0.8),
         ("a.jpg", 50, 50, 60, 60, "seal", 0.7)],
        score=True,
    )
    m = evaluate(gt, pred, conf=0.75)
    expected = (51 + 50 * 2 / 3) / 101
    assert m.map50 == pytest.approx(expected, abs=1e-9)
    assert m.map50_95 == pytest.approx(expected, abs=1e-9)  # exact boxes: same at every IoU
    # operating point conf 0.75: 0.9 (TP) and 0.8 (FP) kept -> P = .5, R = .5, count error 0
    assert (m.precision, m.recall, m.f1) == pytest.approx((0.5, 0.5, 0.5))
    assert m.count_mae == 0 and m.count_bias == 0


def test_iou_threshold_and_classes_and_empty_images():
    # shifted box: IoU = 8*10/(2*100-80) = 0.667 -> TP at 0.5..0.65, FP from 0.70 up: AP = 4/10
    gt = _df([("a.jpg", 0, 0, 10, 10, "fish"), ("b.jpg", 0, 0, 10, 10, "shark")])
    pred = _df(
        [("a.jpg", 2, 0, 12, 10, "fish", 0.9),
         ("b.jpg", 0, 0, 10, 10, "fish", 0.8),  # wrong class: a false positive for fish, shark missed
         ("c.jpg", 0, 0, 5, 5, "fish", 0.3)],  # image without any ground truth
        score=True,
    )
    m = evaluate(gt, pred, images=["a.jpg", "b.jpg", "c.jpg"], names=["fish", "shark", "puffin"])
    assert m.ap50_per_class["fish"] == pytest.approx(1.0)  # top-scored prediction is the TP
    assert m.ap_per_class["fish"] == pytest.approx(0.4)
    assert m.ap50_per_class["shark"] == 0.0
    assert math.isnan(m.ap50_per_class["puffin"])  # no ground truth: left out of the mean
    assert m.map50 == pytest.approx(0.5)
    assert m.n_gt_per_class == {"fish": 1, "shark": 1, "puffin": 0}
    # at IoU .4, conf .25: TP fish@a, FP fish@b, FP fish@c; 2 gt
    assert (m.precision, m.recall) == pytest.approx((1 / 3, 1 / 2))
    assert m.count_mae == pytest.approx(1 / 3) and m.count_bias == pytest.approx(1 / 3)


def test_duplicate_predictions_count_once():
    gt = _df([("a.jpg", 0, 0, 10, 10, "seal")])
    pred = _df([("a.jpg", 0, 0, 10, 10, "seal", 0.9), ("a.jpg", 0, 0, 10, 10, "seal", 0.8)], score=True)
    m = evaluate(gt, pred)
    assert m.map50 == pytest.approx(1.0)  # the duplicate comes after recall already hit 1
    assert m.precision == pytest.approx(0.5) and m.count_bias == 1


def test_paired_differences_pair_by_seed_and_fraction():
    rows = pd.DataFrame(
        [
            {"arm": "real", "fraction": 0.1, "seed": 0, "map50": 0.30},
            {"arm": "real", "fraction": 0.1, "seed": 1, "map50": 0.50},
            {"arm": "synth", "fraction": 0.1, "seed": 0, "map50": 0.40},
            {"arm": "synth", "fraction": 0.1, "seed": 1, "map50": 0.55},
        ]
    )
    d = paired_differences(rows, "map50").iloc[0]
    assert d.mean_diff == pytest.approx(0.075) and d.n_pairs == 2 and d.wins == 2
    assert d.std_diff == pytest.approx(summarize([0.10, 0.05])["std"])
