"""Tests of attunet_keras.losses against values worked out by hand."""

import keras
import numpy as np
import pytest

from attunet_keras import losses

# A 1x2x2x1 example: y_true has 2 foreground pixels, y_pred puts 0.5 on one of them
# and 0.5 on a background pixel. TP = 0.5, FP = 0.5, FN = 1.5.
Y_TRUE = np.array([[[[1.0], [1.0]], [[0.0], [0.0]]]], dtype="float32")
Y_PRED = np.array([[[[0.5], [0.0]], [[0.5], [0.0]]]], dtype="float32")


def test_dice_loss_matches_the_hand_computed_value():
    # 1 - (2*0.5 + 1) / (2*0.5 + 0.5 + 1.5 + 1) = 1 - 2/4
    loss = losses.DiceLoss(data_format="channels_last")
    assert float(loss(Y_TRUE, Y_PRED)) == pytest.approx(0.5, abs=1e-6)


def test_dice_loss_is_zero_for_a_perfect_prediction_and_near_one_for_its_complement():
    loss = losses.DiceLoss(smooth=1e-6, data_format="channels_last")
    assert float(loss(Y_TRUE, Y_TRUE)) == pytest.approx(0.0, abs=1e-5)
    assert float(loss(Y_TRUE, 1.0 - Y_TRUE)) == pytest.approx(1.0, abs=1e-5)


def test_tversky_with_equal_weights_is_the_dice_loss():
    # TP / (TP + (FP + FN) / 2) = 2 TP / (2 TP + FP + FN) without smoothing.
    tversky = losses.TverskyLoss(alpha=0.5, beta=0.5, smooth=0.0,
                                 data_format="channels_last")
    dice = losses.DiceLoss(smooth=0.0, data_format="channels_last")
    assert float(tversky(Y_TRUE, Y_PRED)) == pytest.approx(float(dice(Y_TRUE, Y_PRED)))
    # alpha=0.3, beta=0.7: 1 - (0.5 + 1) / (0.5 + 0.15 + 1.05 + 1)
    default = losses.TverskyLoss(data_format="channels_last")
    assert float(default(Y_TRUE, Y_PRED)) == pytest.approx(1 - 1.5 / 2.7, abs=1e-6)


def test_cross_entropy_dice_adds_binary_cross_entropy_and_dice():
    combined = losses.CrossEntropyDiceLoss(data_format="channels_last")
    p = np.clip(Y_PRED, 1e-7, 1 - 1e-7)
    bce = -np.mean(Y_TRUE * np.log(p) + (1 - Y_TRUE) * np.log(1 - p))
    assert float(combined(Y_TRUE, Y_PRED)) == pytest.approx(bce + 0.5, rel=1e-4)


def test_multiclass_dice_averages_the_classes_in_either_layout():
    one_hot = np.eye(3, dtype="float32")[np.array([[0, 1], [2, 2]])][None]  # 1x2x2x3
    wrong = np.eye(3, dtype="float32")[np.array([[0, 2], [2, 2]])][None]
    # Per class (smooth=0): class0 1.0, class1 0 (TP 0, FN 1), class2 2*2/(4+1) = 0.8
    loss = losses.DiceLoss(smooth=0.0, data_format="channels_last")
    assert float(loss(one_hot, wrong)) == pytest.approx(1 - (1.0 + 0.0 + 0.8) / 3, abs=1e-6)
    first = losses.DiceLoss(smooth=0.0, data_format="channels_first")
    value = first(np.transpose(one_hot, (0, 3, 1, 2)), np.transpose(wrong, (0, 3, 1, 2)))
    assert float(value) == pytest.approx(1 - 1.8 / 3, abs=1e-6)


@pytest.mark.parametrize("loss_class", [losses.DiceLoss, losses.TverskyLoss,
                                        losses.CrossEntropyDiceLoss])
def test_losses_serialize(loss_class):
    loss = loss_class(data_format="channels_first")
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is loss_class
    assert restored.get_config() == loss.get_config()


@pytest.mark.parametrize("name", losses.LOSSES)
@pytest.mark.parametrize("n_label", [1, 3])
def test_every_named_loss_gives_a_finite_value(name, n_label):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, max(n_label, 2), (2, 8, 8))
    y_true = (labels[..., None] > 0).astype("float32") if n_label == 1 else np.eye(
        n_label, dtype="float32")[labels]
    y_pred = rng.random(y_true.shape).astype("float32")
    if n_label > 1:
        y_pred /= y_pred.sum(axis=-1, keepdims=True)
    value = float(losses.get(name, n_label, "channels_last")(y_true, y_pred))
    assert np.isfinite(value) and value > 0


def test_unknown_loss_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"loss='l2' is not supported; expected one of"):
        losses.get("l2", 1)
