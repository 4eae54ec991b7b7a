"""Segmentation losses: soft Dice, cross-entropy + Dice, Tversky, and a name lookup.

Targets are float maps shaped like the model's output: a 0/1 mask with one channel
for binary segmentation (sigmoid output), one-hot classes for multi-class (softmax
output). Overlap losses are computed over the whole batch (sums over batch and
spatial axes, per channel) and averaged over channels; under a multi-replica
strategy, over each replica's part of the batch.

The channel axis is the model's, in either layout: without `data_format`, every loss
finds it from the maps' static shape and `n_label` (axis 1 or the last axis, the one
with `n_label` entries; `_validation.channel_axis_of`), so a loss made for the default
channels_first reference model computes the same value as for the same data in
channels_last. Binary maps (one channel) need no layout.

`call` returns one value per sample (the batch's overlap loss repeated), not a
scalar: Keras only divides a loss by the number of replicas when it reduces a
per-sample vector, and a scalar loss would be counted once per replica.
"""

import keras
from keras import ops

from attunet_keras import _validation

LOSSES = ("bce", "dice", "bce_dice", "focal", "tversky")


class _LayoutLoss(keras.losses.Loss):
    """Base of the losses: the channel axis from `data_format`, or found from the shapes."""

    def __init__(self, n_label=None, data_format=None, name=None,
                 reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if n_label is not None:
            _validation.check_int("n_label", n_label, 1)
        self.n_label = n_label
        self.data_format = _validation.check_data_format(data_format)

    def channel_axis(self, y_pred):
        """The channel axis of `y_pred` (static shapes; see the module's docstring)."""
        return _validation.channel_axis_of(y_pred.shape, self.n_label, self.data_format,
                                           type(self).__name__)

    def get_config(self):
        config = super().get_config()
        config.update(n_label=self.n_label, data_format=self.data_format)
        return config


class _OverlapLoss(_LayoutLoss):
    """Base of the overlap losses: per-channel sums over batch and spatial axes."""

    def __init__(self, smooth=1.0, n_label=None, data_format=None, name=None,
                 reduction="sum_over_batch_size", dtype=None):
        super().__init__(n_label=n_label, data_format=data_format, name=name,
                         reduction=reduction, dtype=dtype)
        self.smooth = smooth

    def _sums(self, y_true, y_pred):
        """Per-channel true positives, false positives and false negatives (soft)."""
        y_true = ops.cast(y_true, y_pred.dtype)
        channel_axis = self.channel_axis(y_pred)
        rank = len(y_pred.shape)
        axes = [axis for axis in range(rank) if axis != channel_axis % rank]
        true_positive = ops.sum(y_true * y_pred, axis=axes)
        false_positive = ops.sum((1.0 - y_true) * y_pred, axis=axes)
        false_negative = ops.sum(y_true * (1.0 - y_pred), axis=axes)
        return true_positive, false_positive, false_negative

    def get_config(self):
        config = super().get_config()
        config.update(smooth=self.smooth)
        return config


def _per_sample(value, y_pred):
    """`value` (a scalar) repeated for every sample of the batch."""
    return ops.ones((ops.shape(y_pred)[0],), dtype=y_pred.dtype) * value


@keras.saving.register_keras_serializable(package="attunet_keras")
class DiceLoss(_OverlapLoss):
    """Soft Dice loss: `1 - (2 TP + s) / (2 TP + FP + FN + s)`, averaged over channels.

    Args:
        smooth: float. Added to numerator and denominator. Defaults to 1.0.
        n_label: int or None. The model's output channels; with `data_format=None` it
            finds the channel axis (`None`: the maps must have one channel).
        data_format: str or None. Layout of the maps; `None` finds it from the
            shapes and `n_label`.
        name: str. Defaults to `"dice_loss"`.
    """

    def __init__(self, smooth=1.0, n_label=None, data_format=None, name="dice_loss",
                 **kwargs):
        super().__init__(smooth=smooth, n_label=n_label, data_format=data_format,
                         name=name, **kwargs)

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
        n_label, data_format: as `DiceLoss`.
        name: str. Defaults to `"tversky_loss"`.
    """

    def __init__(self, alpha=0.3, beta=0.7, smooth=1.0, n_label=None, data_format=None,
                 name="tversky_loss", **kwargs):
        super().__init__(smooth=smooth, n_label=n_label, data_format=data_format,
                         name=name, **kwargs)
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
        n_label, data_format: as `DiceLoss`.
        name: str. Defaults to `"bce_dice_loss"`.
    """

    def __init__(self, cross_entropy_weight=1.0, dice_weight=1.0, smooth=1.0,
                 n_label=None, data_format=None, name="bce_dice_loss", **kwargs):
        super().__init__(smooth=smooth, n_label=n_label, data_format=data_format,
                         name=name, **kwargs)
        self.cross_entropy_weight = cross_entropy_weight
        self.dice_weight = dice_weight

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        cross_entropy = _cross_entropy(y_true, y_pred, self.channel_axis(y_pred))
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


def _cross_entropy(y_true, y_pred, channel_axis, gamma=None, alpha=0.25):
    """Keras's cross-entropy (focal with `gamma`) over `channel_axis`: binary for one
    channel, categorical for several; one value per pixel (voxel)."""
    if y_pred.shape[channel_axis] == 1:
        if gamma is None:
            return keras.losses.binary_crossentropy(y_true, y_pred, axis=channel_axis)
        return keras.losses.binary_focal_crossentropy(y_true, y_pred, gamma=gamma,
                                                      alpha=alpha, axis=channel_axis)
    if gamma is None:
        return keras.losses.categorical_crossentropy(y_true, y_pred, axis=channel_axis)
    return keras.losses.categorical_focal_crossentropy(y_true, y_pred, gamma=gamma,
                                                       alpha=alpha, axis=channel_axis)


@keras.saving.register_keras_serializable(package="attunet_keras")
class CrossEntropyLoss(_LayoutLoss):
    """Cross-entropy over the channel axis: Keras's binary cross-entropy for one channel,
    categorical for several; with `gamma`, Keras's (binary or categorical) focal loss.

    The same values as `keras.losses.BinaryCrossentropy`, `CategoricalCrossentropy`,
    `BinaryFocalCrossentropy` and `CategoricalFocalCrossentropy` given the right
    `axis`, which this loss finds itself (see the module's docstring).

    Args:
        gamma: float or None. Focusing parameter of the focal loss; `None` is plain
            cross-entropy. Keras's focal default is 2.0.
        alpha: float. Focal weight (Keras's default 0.25; binary focal applies it only
            with class balancing, which is off as in Keras's default).
        n_label, data_format: as `DiceLoss`.
        name: str. Defaults to `"cross_entropy"` (`"focal"` with `gamma`).
    """

    def __init__(self, gamma=None, alpha=0.25, n_label=None, data_format=None, name=None,
                 **kwargs):
        name = name or ("cross_entropy" if gamma is None else "focal")
        super().__init__(n_label=n_label, data_format=data_format, name=name, **kwargs)
        self.gamma = gamma
        self.alpha = alpha

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        return _cross_entropy(y_true, y_pred, self.channel_axis(y_pred), self.gamma,
                              self.alpha)

    def get_config(self):
        config = super().get_config()
        config.update(gamma=self.gamma, alpha=self.alpha)
        return config


def get(name, n_label, data_format=None):
    """The loss called `name` (one of `LOSSES`) for a model with `n_label` channels.

    `bce` and `focal` are Keras's binary losses for one channel and categorical ones
    for several. With `data_format=None` the loss finds the channel axis of the maps it
    is given (either layout); an explicit `data_format` is used as it is.
    """
    _validation.check_int("n_label", n_label, 1)
    data_format = _validation.check_data_format(data_format)
    layout = dict(n_label=n_label, data_format=data_format)
    if name == "bce":
        return CrossEntropyLoss(**layout)
    if name == "focal":
        return CrossEntropyLoss(gamma=2.0, **layout)
    if name == "dice":
        return DiceLoss(**layout)
    if name == "bce_dice":
        return CrossEntropyDiceLoss(**layout)
    if name == "tversky":
        return TverskyLoss(**layout)
    raise ValueError(f"loss={name!r} is not supported; expected one of {LOSSES}.")
