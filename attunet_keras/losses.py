"""Segmentation losses: soft Dice, cross-entropy + Dice, Tversky, and a name lookup.

Targets are float maps shaped like the model's output: a 0/1 mask with one channel
for binary segmentation (sigmoid output), one-hot classes for multi-class (softmax
output). Overlap losses are computed over the whole batch (sums over batch and
spatial axes, per channel) and averaged over channels; under a multi-replica
strategy, over each replica's part of the batch.

`call` returns one value per sample (the batch's overlap loss repeated), not a
scalar: Keras only divides a loss by the number of replicas when it reduces a
per-sample vector, and a scalar loss would be counted once per replica.
"""

import keras
from keras import ops

from attunet_keras import _validation

LOSSES = ("bce", "dice", "bce_dice", "focal", "tversky")


class _OverlapLoss(keras.losses.Loss):
    """Base of the overlap losses: per-channel sums over batch and spatial axes."""

    def __init__(self, smooth=1.0, data_format=None, name=None, reduction="sum_over_batch_size",
                 dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.smooth = smooth
        self.data_format = _validation.resolve_data_format(data_format)

    def _sums(self, y_true, y_pred):
        """Per-channel true positives, false positives and false negatives (soft)."""
        y_true = ops.cast(y_true, y_pred.dtype)
        channel_axis = _validation.channel_axis_for(self.data_format)
        rank = len(y_pred.shape)
        axes = [axis for axis in range(rank) if axis != channel_axis % rank]
        true_positive = ops.sum(y_true * y_pred, axis=axes)
        false_positive = ops.sum((1.0 - y_true) * y_pred, axis=axes)
        false_negative = ops.sum(y_true * (1.0 - y_pred), axis=axes)
        return true_positive, false_positive, false_negative

    def get_config(self):
        config = super().get_config()
        config.update(smooth=self.smooth, data_format=self.data_format)
        return config


def _per_sample(value, y_pred):
    """`value` (a scalar) repeated for every sample of the batch."""
    return ops.ones((ops.shape(y_pred)[0],), dtype=y_pred.dtype) * value


@keras.saving.register_keras_serializable(package="attunet_keras")
class DiceLoss(_OverlapLoss):
    """Soft Dice loss: `1 - (2 TP + s) / (2 TP + FP + FN + s)`, averaged over channels.

    Args:
        smooth: float. Added to numerator and denominator. Defaults to 1.0.
        data_format: str or None. Layout of the maps; `None` means
            `keras.config.image_data_format()`.
        name: str. Defaults to `"dice_loss"`.
    """

    def __init__(self, smooth=1.0, data_format=None, name="dice_loss", **kwargs):
        super().__init__(smooth=smooth, data_format=data_format, name=name, **kwargs)

    def call(self, y_true, y_pred):
        tp, fp, fn = self._sums(y_true, y_pred)
        dice = (2.0 * tp + self.smooth) / (2.0 * tp + fp + fn + self.smooth)
        return _per_sample(1.0 - ops.mean(dice), y_pred)


@keras.saving.register_keras_serializable(package="attunet_keras")
class TverskyLoss(_OverlapLoss):
    """Tversky loss: `1 - (TP + s) / (TP + alpha FP + beta FN + s)`, averaged over channels.

    `alpha = beta = 0.5` is the Dice loss; `beta > alpha` weighs missed foreground more.

    Args:
        alpha: float. Weight of false positives. Defaults to 0.3.
        beta: float. Weight of false negatives. Defaults to 0.7.
        smooth: float. Defaults to 1.0.
        data_format: str or None. Layout of the maps.
        name: str. Defaults to `"tversky_loss"`.
    """

    def __init__(self, alpha=0.3, beta=0.7, smooth=1.0, data_format=None,
                 name="tversky_loss", **kwargs):
        super().__init__(smooth=smooth, data_format=data_format, name=name, **kwargs)
        self.alpha = alpha
        self.beta = beta

    def call(self, y_true, y_pred):
        tp, fp, fn = self._sums(y_true, y_pred)
        index = (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)
        return _per_sample(1.0 - ops.mean(index), y_pred)

    def get_config(self):
        config = super().get_config()
        config.update(alpha=self.alpha, beta=self.beta)
        return config


@keras.saving.register_keras_serializable(package="attunet_keras")
class CrossEntropyDiceLoss(_OverlapLoss):
    """Cross-entropy plus soft Dice: binary for one channel, categorical for several.

    Args:
        cross_entropy_weight: float. Defaults to 1.0.
        dice_weight: float. Defaults to 1.0.
        smooth: float. Dice smoothing. Defaults to 1.0.
        data_format: str or None. Layout of the maps.
        name: str. Defaults to `"bce_dice_loss"`.
    """

    def __init__(self, cross_entropy_weight=1.0, dice_weight=1.0, smooth=1.0,
                 data_format=None, name="bce_dice_loss", **kwargs):
        super().__init__(smooth=smooth, data_format=data_format, name=name, **kwargs)
        self.cross_entropy_weight = cross_entropy_weight
        self.dice_weight = dice_weight

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        channel_axis = _validation.channel_axis_for(self.data_format)
        if y_pred.shape[channel_axis] == 1:
            cross_entropy = keras.losses.binary_crossentropy(y_true, y_pred, axis=channel_axis)
        else:
            cross_entropy = keras.losses.categorical_crossentropy(
                y_true, y_pred, axis=channel_axis)
        tp, fp, fn = self._sums(y_true, y_pred)
        dice = ops.mean((2.0 * tp + self.smooth) / (2.0 * tp + fp + fn + self.smooth))
        rank = len(y_pred.shape)
        per_sample_cross_entropy = ops.mean(cross_entropy, axis=tuple(range(1, rank - 1)))
        return (self.cross_entropy_weight * per_sample_cross_entropy
                + self.dice_weight * _per_sample(1.0 - dice, y_pred))

    def get_config(self):
        config = super().get_config()
        config.update(cross_entropy_weight=self.cross_entropy_weight,
                      dice_weight=self.dice_weight)
        return config


def get(name, n_label, data_format=None):
    """The loss called `name` (one of `LOSSES`) for a model with `n_label` channels.

    `bce` and `focal` are Keras's binary losses for one channel and categorical ones
    for several.
    """
    data_format = _validation.resolve_data_format(data_format)
    channel_axis = _validation.channel_axis_for(data_format)
    binary = n_label == 1
    if name == "bce":
        if binary:
            return keras.losses.BinaryCrossentropy(axis=channel_axis)
        return keras.losses.CategoricalCrossentropy(axis=channel_axis)
    if name == "focal":
        if binary:
            return keras.losses.BinaryFocalCrossentropy(axis=channel_axis)
        return keras.losses.CategoricalFocalCrossentropy(axis=channel_axis)
    if name == "dice":
        return DiceLoss(data_format=data_format)
    if name == "bce_dice":
        return CrossEntropyDiceLoss(data_format=data_format)
    if name == "tversky":
        return TverskyLoss(data_format=data_format)
    raise ValueError(f"loss={name!r} is not supported; expected one of {LOSSES}.")
