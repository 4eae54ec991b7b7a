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


# ------------------------------------------------------------------------ HD95


def _square(top, left, side=10, shape=(48, 48)):
    mask = np.zeros(shape, bool)
    mask[top:top + side, left:left + side] = True
    return mask


def test_hausdorff95_of_two_offset_squares_worked_by_hand():
    """Two 10x10 squares, the prediction 3 pixels to the right, and a stray pixel.

    The surfaces are the 36-pixel rings (mask minus its erosion). From the
    prediction's ring to the truth's, the distances are: 14 of 0 (the shared parts of
    the top and bottom rows), 4 of 1, 4 of 2 and 14 of 3 (the right column at 3, the
    row ends 1, 2, 3, the left column min(row offset, 3)); the other direction is
    the mirror image. The stray pixel at (40, 40) is sqrt(21**2 + 21**2) = 29.70 from
    the truth's corner (19, 19): the Hausdorff distance, but it is above the 95th
    percentile (numpy's linear interpolation at 0.95 * 36 = 34.2 reads two 3s), so
    HD95 = 3.
    """
    truth = _square(10, 10)
    prediction = _square(10, 13)
    assert metrics.hausdorff95(prediction, truth) == pytest.approx(3.0)
    prediction[40, 40] = True
    distances = metrics.surface_distances(prediction, truth)
    assert len(distances) == 37
    np.testing.assert_allclose(np.sort(distances)[:36], [0] * 14 + [1] * 4 + [2] * 4 + [3] * 14)
    assert distances.max() == pytest.approx(np.hypot(21, 21))
    assert metrics.hausdorff95(prediction, truth) == pytest.approx(3.0)


def test_hausdorff95_is_in_units_of_the_spacing():
    """Columns 2 units wide: the 3-pixel shift is 6 units; sorted distances 14 of 0,
    2 of 1, 4 of 2, 2 of 3, 4 of 4 and 10 of 6, so the 95th percentile is 6."""
    truth, prediction = _square(10, 10), _square(10, 13)
    assert metrics.hausdorff95(prediction, truth, spacing=(1.0, 2.0)) == pytest.approx(6.0)
    assert metrics.hausdorff95(prediction, truth, spacing=(2.0, 1.0)) == pytest.approx(3.0)


def test_hausdorff95_of_two_cubes():
    """Cubes of side 10 two voxels apart: no surface voxel is more than 2 from the
    other surface, and the far faces (100 of about 490 voxels) are at exactly 2."""
    truth = np.zeros((32, 32, 32), bool)
    prediction = truth.copy()
    truth[10:20, 10:20, 10:20] = True
    prediction[12:22, 10:20, 10:20] = True
    assert metrics.hausdorff95(prediction, truth) == pytest.approx(2.0)
    assert metrics.hausdorff95(prediction, truth, spacing=(0.5, 1, 1)) == pytest.approx(1.0)


def test_hausdorff95_of_empty_masks_follows_monai():
    empty, square = np.zeros((16, 16), bool), _square(2, 2, side=5, shape=(16, 16))
    assert np.isnan(metrics.hausdorff95(empty, empty))
    assert metrics.hausdorff95(empty, square) == np.inf
    assert metrics.hausdorff95(square, empty) == np.inf
    with pytest.raises(ValueError, match=r"must have one shape"):
        metrics.hausdorff95(square, square[:8])


@pytest.mark.parametrize("metric_class", [metrics.Dice, metrics.IoU])
@pytest.mark.parametrize("n_label", [1, 3])
def test_metrics_find_the_channel_axis_of_either_layout(metric_class, n_label):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, max(n_label, 2), (2, 12, 10))
    if n_label == 1:
        y_true = labels[..., None].astype("float32")
        y_pred = rng.random((2, 12, 10, 1), dtype="float32")
    else:
        y_true = np.eye(3, dtype="float32")[labels]
        y_pred = rng.random((2, 12, 10, 3), dtype="float32")
    expected = metric_class(n_label, data_format="channels_last")
    expected.update_state(y_true, y_pred)
    first = [np.moveaxis(a, -1, 1) for a in (y_true, y_pred)]
    for data_format in ("channels_last", "channels_first"):
        keras.config.set_image_data_format(data_format)  # the global must not matter
        for arrays in (first, (y_true, y_pred)):
            metric = metric_class(n_label)
            metric.update_state(*arrays)
            assert float(metric.result()) == pytest.approx(float(expected.result()))


def test_channels_first_dice_matches_hand_counts_without_a_data_format():
    # channels_first (1, 3, 1, 4): labels true 0 1 1 2, predicted 0 1 2 2.
    y_true = np.eye(3, dtype="float32")[[0, 1, 1, 2]].T[None, :, None, :]
    y_pred = np.eye(3, dtype="float32")[[0, 1, 2, 2]].T[None, :, None, :]
    dice = metrics.Dice(3)
    dice.update_state(y_true, y_pred)
    assert float(dice.result()) == pytest.approx(2 / 3)  # classes a and b: 2/3 each
    with pytest.raises(ValueError, match=r"both axis 1 and the last axis have n_label=3"):
        metrics.Dice(3).update_state(y_true[..., :3], y_pred[..., :3])


def test_surface_dice_matches_hand_counts_of_boundary_pixels():
    """Two 4x4 squares one column apart in a 10x10 image: each boundary has 12 pixels
    (the square minus its 2x2 erosion). Within 1 pixel every boundary pixel of one lies
    near the other's: NSD 1. At distance 0 only 6 of each 12 coincide (the shared
    stretches of the top and bottom rows): NSD 12 / 24."""
    reference = np.zeros((10, 10), bool)
    reference[2:6, 2:6] = True
    prediction = np.roll(reference, 1, axis=1)
    assert metrics.surface_dice(prediction, reference, tolerance=1.0) == 1.0
    assert metrics.surface_dice(prediction, reference, tolerance=0.5) == 0.5
    # rows 2 mm apart, columns 1 mm: the one-column shift is 1 mm
    assert metrics.surface_dice(prediction, reference, (2.0, 1.0), tolerance=1.0) == 1.0
    assert metrics.surface_dice(prediction, reference, (2.0, 1.0), tolerance=0.9) == 0.5
    assert metrics.surface_dice(prediction, prediction, tolerance=0.0) == 1.0
    empty = np.zeros_like(reference)
    assert np.isnan(metrics.surface_dice(empty, empty))
    assert metrics.surface_dice(empty, reference) == 0.0
    assert metrics.surface_dice(reference, empty) == 0.0
    with pytest.raises(ValueError, match=r"tolerance=-1 is not allowed"):
        metrics.surface_dice(prediction, reference, tolerance=-1)
