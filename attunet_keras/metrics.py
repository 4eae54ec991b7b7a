"""Dice and IoU over a whole dataset, for binary masks and for classes.

Both accumulate true positives, false positives and false negatives per class over
every batch they see, and compute the score from those totals (not an average of
per-batch scores). Predictions are hard: `y_pred > threshold` for one channel
(binary), `argmax` over the channels for several (classes, background included).

The channel axis is the model's in either layout: without `data_format` it is found
from the maps' static shape and `n_label`, as the losses find it (binary maps need
no layout at all).
"""

import keras
import numpy as np
from keras import ops

from attunet_keras import _validation


class _OverlapMetric(keras.metrics.Metric):
    def __init__(self, n_label=1, class_id=None, threshold=0.5, data_format=None,
                 name=None, dtype=None):
        super().__init__(name=name, dtype=dtype)
        _validation.check_int("n_label", n_label, 1)
        if class_id is not None and not (
            _validation.is_int(class_id) and 0 <= class_id < max(n_label, 2)
        ):
            raise ValueError(
                f"class_id={class_id!r} is not allowed; expected None or an integer in "
                f"0..{max(n_label, 2) - 1}."
            )
        self.n_label = n_label
        self.class_id = class_id
        self.threshold = threshold
        self.data_format = _validation.check_data_format(data_format)
        n_classes = max(n_label, 2)
        self.true_positives = self.add_variable((n_classes,), "zeros", name="tp")
        self.false_positives = self.add_variable((n_classes,), "zeros", name="fp")
        self.false_negatives = self.add_variable((n_classes,), "zeros", name="fn")

    def update_state(self, y_true, y_pred, sample_weight=None):
        n_classes = max(self.n_label, 2)
        channel_axis = _validation.channel_axis_of(y_pred.shape, self.n_label,
                                                   self.data_format, type(self).__name__)
        if self.n_label == 1:  # one channel: every value is a pixel's, in either layout
            true_labels = ops.cast(y_true > 0.5, "int32")
            pred_labels = ops.cast(y_pred > self.threshold, "int32")
        else:
            true_labels = ops.argmax(y_true, axis=channel_axis)
            pred_labels = ops.argmax(y_pred, axis=channel_axis)
        true_one_hot = ops.one_hot(ops.reshape(true_labels, (-1,)), n_classes)
        pred_one_hot = ops.one_hot(ops.reshape(pred_labels, (-1,)), n_classes)
        tp = ops.sum(true_one_hot * pred_one_hot, axis=0)
        self.true_positives.assign_add(tp)
        self.false_positives.assign_add(ops.sum(pred_one_hot, axis=0) - tp)
        self.false_negatives.assign_add(ops.sum(true_one_hot, axis=0) - tp)

    def counts(self):
        """True positives, false positives, false negatives per class, as tensors.

        Read through `ops.convert_to_tensor`: under JAX a metric's `result` runs on
        the variables' values, and `ops.where` refuses a variable itself.
        """
        return tuple(ops.convert_to_tensor(variable) for variable in (
            self.true_positives, self.false_positives, self.false_negatives))

    def per_class(self):
        """The score of every class (class 0 is background), as a tensor."""
        raise NotImplementedError

    def result(self):
        scores = self.per_class()
        if self.class_id is not None:
            return scores[self.class_id]
        if self.n_label == 1:
            return scores[1]
        return ops.mean(scores[1:])

    def reset_state(self):
        for variable in (self.true_positives, self.false_positives, self.false_negatives):
            variable.assign(ops.zeros(variable.shape, variable.dtype))

    def get_config(self):
        config = super().get_config()
        config.update(n_label=self.n_label, class_id=self.class_id,
                      threshold=self.threshold, data_format=self.data_format)
        return config


def _ratio(numerator, denominator):
    """numerator / denominator, with 0 / 0 = 1 (both masks empty agree perfectly)."""
    return ops.where(denominator > 0, numerator / ops.maximum(denominator, 1e-12), 1.0)


@keras.saving.register_keras_serializable(package="attunet_keras")
class Dice(_OverlapMetric):
    """Dice coefficient `2 TP / (2 TP + FP + FN)` over all batches seen.

    Args:
        n_label: int. Output channels of the model: 1 for a binary mask, else classes.
        class_id: int or None. Report one class (0 is background); `None` reports the
            foreground for binary masks and the mean over classes 1.. otherwise.
        threshold: float. Binary decision threshold. Defaults to 0.5.
        data_format: str or None. Layout of the maps; `None` finds the channel axis
            from the shapes and `n_label`.
        name: str. Defaults to `"dice"`.
    """

    def __init__(self, n_label=1, class_id=None, threshold=0.5, data_format=None,
                 name="dice", dtype=None):
        super().__init__(n_label, class_id, threshold, data_format, name, dtype)

    def per_class(self):
        tp, fp, fn = self.counts()
        return _ratio(2.0 * tp, 2.0 * tp + fp + fn)


@keras.saving.register_keras_serializable(package="attunet_keras")
class IoU(_OverlapMetric):
    """Intersection over union `TP / (TP + FP + FN)` over all batches seen.

    Args: as `Dice`; `name` defaults to `"iou"`.
    """

    def __init__(self, n_label=1, class_id=None, threshold=0.5, data_format=None,
                 name="iou", dtype=None):
        super().__init__(n_label, class_id, threshold, data_format, name, dtype)

    def per_class(self):
        tp, fp, fn = self.counts()
        return _ratio(tp, tp + fp + fn)


def segmentation_metrics(n_label, class_names=None, data_format=None):
    """Dice and IoU, plus per-class Dice and IoU when there are several classes."""
    metrics = [Dice(n_label, data_format=data_format),
               IoU(n_label, data_format=data_format)]
    if n_label > 1:
        names = class_names or [f"class_{c}" for c in range(n_label)]
        for class_id in range(1, n_label):
            metrics.append(Dice(n_label, class_id, data_format=data_format,
                                name=f"dice_{names[class_id]}"))
            metrics.append(IoU(n_label, class_id, data_format=data_format,
                               name=f"iou_{names[class_id]}"))
    return metrics


def surface_distances(prediction, truth, spacing=None):
    """Distances from every surface pixel (voxel) of `prediction` to the surface of
    `truth`, in units of `spacing` (pixels by default).

    A mask's surface is the mask minus its binary erosion (as MONAI's
    `get_mask_edges`); distances come from the exact Euclidean distance transform of
    the other surface's complement (`scipy.ndimage.distance_transform_edt`).
    """
    from scipy import ndimage

    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    edges_prediction = prediction ^ ndimage.binary_erosion(prediction)
    edges_truth = truth ^ ndimage.binary_erosion(truth)
    if not edges_truth.any():
        return np.full(int(edges_prediction.sum()), np.inf)
    distance = ndimage.distance_transform_edt(~edges_truth, sampling=spacing)
    return distance[edges_prediction]


def hausdorff95(prediction, truth, spacing=None):
    """The 95th percentile Hausdorff distance between two binary masks (2D or 3D).

    The larger of the two directed 95th percentiles of `surface_distances`, as MONAI's
    `compute_hausdorff_distance(percentile=95)` on non-empty masks. Empty masks: both
    empty gives NaN (no surface to measure); one empty and the other not gives
    infinity, the plain Hausdorff distance's answer (no point of the empty mask is
    near the other's). MONAI's 95th-percentile path gives NaN there instead.

    Args:
        prediction, truth: boolean (or 0/1) arrays of one shape.
        spacing: float or sequence. Pixel (voxel) size per axis, e.g. from a NIfTI
            affine; `None` measures in pixels.
    """
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} must have "
                         "one shape.")
    if not prediction.any() and not truth.any():
        return float("nan")
    if not prediction.any() or not truth.any():
        return float("inf")
    return float(max(np.percentile(surface_distances(prediction, truth, spacing), 95),
                     np.percentile(surface_distances(truth, prediction, spacing), 95)))


def surface_dice(prediction, reference, spacing=None, tolerance=1.0):
    """The normalised surface Dice (NSD, Nikolov et al. 2021) of two binary masks.

    The share of boundary voxels of both masks that lie within `tolerance` of the
    other mask's boundary: `(|S_p within tol of S_r| + |S_r within tol of S_p|) /
    (|S_p| + |S_r|)`, with boundaries and distances as `hausdorff95` takes them (mask
    minus its erosion; exact Euclidean distances in units of `spacing`). This is
    MONAI's `compute_surface_dice` convention (boundary voxels counted), not the
    surface-area weighting of DeepMind's `surface-distance`. Both masks empty gives
    NaN (no surface); one empty and the other not gives 0.

    Args:
        prediction, reference: boolean (or 0/1) arrays of one shape (2D or 3D).
        spacing: float or sequence. Voxel size per axis; `None` measures in voxels.
        tolerance: float. The distance (in `spacing`'s units) within which a boundary
            voxel counts as matched. Defaults to 1.0.
    """
    prediction, reference = np.asarray(prediction, bool), np.asarray(reference, bool)
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} "
                         "must have one shape.")
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ValueError(f"tolerance={tolerance!r} is not allowed; expected a number >= 0.")
    if not prediction.any() and not reference.any():
        return float("nan")
    if not prediction.any() or not reference.any():
        return 0.0
    to_reference = surface_distances(prediction, reference, spacing)
    to_prediction = surface_distances(reference, prediction, spacing)
    matched = np.sum(to_reference <= tolerance) + np.sum(to_prediction <= tolerance)
    return float(matched / (to_reference.size + to_prediction.size))
