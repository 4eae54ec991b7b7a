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


def _layout_cases():
    """`(name, n_label, y_true, y_pred)` in channels_last: 2 images of 6x5 pixels."""
    rng = np.random.default_rng(5)
    for name in losses.LOSSES:
        for n_label in (1, 3):
            labels = rng.integers(0, max(n_label, 2), (2, 6, 5))
            if n_label == 1:
                y_true = labels[..., None].astype("float32")
                y_pred = rng.uniform(0.05, 0.95, (2, 6, 5, 1)).astype("float32")
            else:
                y_true = np.eye(3, dtype="float32")[labels]
                logits = rng.normal(size=(2, 6, 5, 3)).astype("float32")
                y_pred = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
            yield name, n_label, y_true, y_pred


@pytest.mark.parametrize("name, n_label, y_true, y_pred", list(_layout_cases()),
                         ids=lambda value: str(value) if not hasattr(value, "shape") else "")
def test_every_loss_finds_the_channel_axis_of_either_layout(name, n_label, y_true, y_pred):
    expected = float(losses.get(name, n_label, "channels_last")(y_true, y_pred))
    first = [np.ascontiguousarray(np.moveaxis(a, -1, 1)) for a in (y_true, y_pred)]
    for data_format in ("channels_last", "channels_first"):
        keras.config.set_image_data_format(data_format)  # the global must not matter
        assert float(losses.get(name, n_label)(*first)) == pytest.approx(expected, rel=1e-5)
        assert float(losses.get(name, n_label)(y_true, y_pred)) == pytest.approx(
            expected, rel=1e-5)
    # An explicit data_format is honoured, also where it is the wrong one.
    assert float(losses.get(name, n_label, "channels_first")(*first)) == pytest.approx(
        expected, rel=1e-5)
    if n_label == 3 and name != "tversky":  # reduced over the 5 columns instead
        assert float(losses.get(name, n_label, "channels_last")(*first)) != pytest.approx(
            expected, rel=1e-3)


def test_cross_entropy_in_channels_first_matches_the_hand_computed_value():
    # One pixel per class over 3 channels, channels_first (1, 3, 1, 3):
    # -mean(log p_true) over the 3 pixels, p_true = 0.7, 0.5, 0.2.
    y_true = np.eye(3, dtype="float32").T[None, :, None, :]
    p_true = np.array([0.7, 0.5, 0.2], "float32")
    y_pred = np.empty((1, 3, 1, 3), "float32")
    for pixel, p in enumerate(p_true):
        y_pred[0, :, 0, pixel] = (1 - p) / 2
        y_pred[0, pixel, 0, pixel] = p
    # Width 3 and 3 channels: the two axes cannot be told apart from the shapes.
    with pytest.raises(ValueError, match=r"both axis 1 and the last axis have n_label=3 "
                                         r"entries; pass data_format="):
        losses.get("bce", 3)(y_true, y_pred)
    value = float(losses.get("bce", 3, "channels_first")(y_true, y_pred))
    assert value == pytest.approx(-np.log(p_true).mean(), rel=1e-5)
    wide_true, wide_pred = np.tile(y_true, (1, 1, 1, 2)), np.tile(y_pred, (1, 1, 1, 2))
    assert float(losses.get("bce", 3)(wide_true, wide_pred)) == pytest.approx(value, rel=1e-5)
    # Dice per class (smooth 0), TP = p_c, FN = 1 - p_c, FP = the other pixels' (1 - p) / 2:
    # class 0: 1.4 / (1.4 + 0.65 + 0.3); class 1: 1.0 / (1.0 + 0.55 + 0.5);
    # class 2: 0.4 / (0.4 + 0.4 + 0.8).
    per_class = [1.4 / 2.35, 1.0 / 2.05, 0.4 / 1.6]
    dice = losses.DiceLoss(smooth=0.0, n_label=3)(wide_true, wide_pred)
    assert float(dice) == pytest.approx(1 - np.mean(per_class), rel=1e-5)


def test_the_binary_losses_need_no_layout_and_the_reference_shape_works():
    # The reference model's output: channels_first, one channel, 160 pixels square
    # reduced to 1x2x2: the binary Dice of Y_TRUE / Y_PRED above (0.5) in either layout.
    first_true, first_pred = (np.transpose(a, (0, 3, 1, 2)) for a in (Y_TRUE, Y_PRED))
    assert float(losses.DiceLoss()(first_true, first_pred)) == pytest.approx(0.5, abs=1e-6)
    assert float(losses.DiceLoss()(Y_TRUE, Y_PRED)) == pytest.approx(0.5, abs=1e-6)
    p = np.clip(Y_PRED, 1e-7, 1 - 1e-7)
    bce = -np.mean(Y_TRUE * np.log(p) + (1 - Y_TRUE) * np.log(1 - p))
    combined = losses.get("bce_dice", 1)
    assert float(combined(first_true, first_pred)) == pytest.approx(bce + 0.5, rel=1e-4)


def test_maps_without_the_channels_named_are_refused_with_the_remedy():
    with pytest.raises(ValueError, match=r"expected maps with n_label=3 channels on axis 1 "
                                         r"\(channels_first\) or on the last axis"):
        losses.get("dice", 3)(np.zeros((1, 4, 5, 2), "float32"), np.zeros((1, 4, 5, 2),
                                                                          "float32"))
    with pytest.raises(ValueError, match=r"pass n_label= \(the model's output channels\)"):
        losses.DiceLoss()(np.zeros((1, 4, 5, 3), "float32"), np.zeros((1, 4, 5, 3), "float32"))
