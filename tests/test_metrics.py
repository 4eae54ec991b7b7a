"""Tests of attunet_keras.metrics: Dice and IoU accumulated over a dataset."""

import keras
import numpy as np
import pytest

from attunet_keras import metrics


def _binary(values):
    return np.array(values, dtype="float32").reshape(1, -1, 1, 1)


def test_binary_dice_and_iou_match_hand_counts():
    y_true = _binary([1, 1, 1, 0, 0, 0])
    y_pred = _binary([0.9, 0.8, 0.2, 0.7, 0.1, 0.0])  # TP 2, FP 1, FN 1
    dice = metrics.Dice(data_format="channels_last")
    iou = metrics.IoU(data_format="channels_last")
    dice.update_state(y_true, y_pred)
    iou.update_state(y_true, y_pred)
    assert float(dice.result()) == pytest.approx(4 / 6)
    assert float(iou.result()) == pytest.approx(2 / 4)


def test_scores_are_over_all_batches_not_a_mean_of_batches():
    dice = metrics.Dice(data_format="channels_last")
    dice.update_state(_binary([1, 1, 1, 1]), _binary([1, 1, 1, 1]))  # TP 4
    dice.update_state(_binary([1, 0, 0, 0]), _binary([0, 0, 0, 0]))  # FN 1
    # 2*4 / (2*4 + 0 + 1), where a mean of batch scores would give (1 + 0) / 2.
    assert float(dice.result()) == pytest.approx(8 / 9)
    dice.reset_state()
    dice.update_state(_binary([0, 0]), _binary([0, 0]))
    assert float(dice.result()) == 1.0  # both empty: perfect agreement


def test_multiclass_per_class_and_mean_in_channels_first():
    labels_true = np.array([[0, 1, 1, 2]])
    labels_pred = np.array([[0, 1, 2, 2]])
    y_true = np.transpose(np.eye(3, dtype="float32")[labels_true][None], (0, 3, 1, 2))
    y_pred = np.transpose(np.eye(3, dtype="float32")[labels_pred][None], (0, 3, 1, 2))
    scores = {}
    for metric in metrics.segmentation_metrics(3, ("bg", "a", "b"), "channels_first"):
        metric.update_state(y_true, y_pred)
        scores[metric.name] = float(metric.result())
    # class a: TP 1, FN 1 -> 2/3; class b: TP 1, FP 1 -> 2/3
    assert scores["dice_a"] == pytest.approx(2 / 3)
    assert scores["dice_b"] == pytest.approx(2 / 3)
    assert scores["dice"] == pytest.approx(2 / 3)
    assert scores["iou_a"] == pytest.approx(1 / 2)
    assert set(scores) == {"dice", "iou", "dice_a", "iou_a", "dice_b", "iou_b"}


def test_metric_serializes():
    metric = metrics.Dice(n_label=3, class_id=2, data_format="channels_first", name="d")
    restored = keras.metrics.deserialize(keras.metrics.serialize(metric))
    assert isinstance(restored, metrics.Dice)
    assert restored.get_config() == metric.get_config()


def test_class_id_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"class_id=3 is not allowed.*0\.\.2"):
        metrics.Dice(n_label=3, class_id=3)
