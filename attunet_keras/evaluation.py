"""Held-out scores of a run: Dice, IoU and HD95 of whole images by sliding windows,
next to an Otsu baseline (`evaluate_run`, `attunet-keras evaluate`)."""

import math
import os

import numpy as np

from attunet_keras import config as config_lib
from attunet_keras import data as data_lib
from attunet_keras import inference
from attunet_keras import metrics as metrics_lib
from attunet_keras import model_info
from attunet_keras import run_folder

# Multi-Otsu's cost grows combinatorially with the classes (6 classes: 78 s on 2 cores).
MAX_OTSU_CLASSES = 5
# Overlap of the sliding windows that predict the whole held-out images in evaluation.
EVALUATE_OVERLAP = 0.25


def load_run_model(run_dir):
    """The best checkpoint of a run (the last model when no checkpoint was kept)."""
    config_lib.read_config(run_dir)  # a clear error for a folder that is not a run
    for name in (run_folder.BEST_MODEL, run_folder.LAST_MODEL):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            return model_info.load_model(path)
    raise FileNotFoundError(
        f"{run_dir} holds no {run_folder.BEST_MODEL} or {run_folder.LAST_MODEL} yet: the "
        "run has not finished an epoch (run the same train command again to resume it)."
    )


def check_model_fits(model, dataset, what="the model"):
    """Refuses a model of another task: other channels in or out, or volumes."""
    if model_info.is_volume_model(model) != (dataset.dims == 3):
        kinds = ("3D", "2D") if dataset.dims == 2 else ("2D", "3D")
        raise ValueError(f"{what} is a {kinds[0]} model; the run's dataset "
                         f"{dataset.name!r} is {kinds[1]}.")
    outputs, inputs = model_info.output_channels(model), model_info.input_channels(model)
    if outputs != dataset.n_label:
        task = "binary (1 channel)" if dataset.n_label == 1 else f"{dataset.n_label} classes"
        raise ValueError(
            f"{what} gives {outputs} output channel(s) but the run's dataset "
            f"{dataset.name!r} is {task}: it is a model of another task."
        )
    if inputs != dataset.in_channels:
        raise ValueError(
            f"{what} takes {inputs} input channel(s) but the run's images have "
            f"{dataset.in_channels}."
        )


def evaluate_run(run_dir, *, dataset=None, model=None, overlap=EVALUATE_OVERLAP):
    """Held-out scores of a run's best model on whole images, next to an Otsu baseline.

    The baseline thresholds the held-out images' intensities (their channel mean)
    with Otsu's method (scikit-image) on their pooled histogram: one threshold for
    binary masks, `n_label - 1` thresholds (multi-Otsu) for classes, the classes
    ordered by intensity.
    """
    config = config_lib.read_config(run_dir)
    dataset = dataset or config_lib.load_data(config)
    if model is None:
        model = load_run_model(run_dir)
    else:
        check_model_fits(model, dataset)
    return evaluate_model(model, dataset, config, overlap=overlap)


def evaluate_model(model, dataset, config, overlap=EVALUATE_OVERLAP):
    """Held-out Dice, IoU and HD95 of `model` on the whole held-out images.

    Each image is predicted with `inference.predict_sliding_window` (patches of the
    dataset's tile, `overlap`, Gaussian blending), so the scores count every pixel
    once, whatever the image's size and the model's layout.
    """
    metrics = metrics_lib.segmentation_metrics(
        dataset.n_label, dataset.class_names, "channels_last")
    distances = _HD95(dataset.n_label, dataset.class_names)
    for index in dataset.val:
        image, mask = dataset.read(index)
        probabilities = inference.predict_sliding_window(
            model, image, dataset.tile_shape, overlap=overlap,
            batch_size=config.batch_size, normalized=True)
        truth = data_lib.targets(mask, dataset.n_label)[None]
        for metric in metrics:
            metric.update_state(truth, probabilities[None])
        distances.add(inference.labels_from_probabilities(probabilities), mask,
                      dataset.items[index].spacing)
    scores = {metric.name: float(metric.result()) for metric in metrics}
    scores.update(distances.result())
    result = {"dataset": dataset.name, "held_out_images": len(dataset.val),
              "dims": dataset.dims, "model": scores, "otsu": None}
    if dataset.n_label > MAX_OTSU_CLASSES:
        result["otsu_note"] = (
            f"no Otsu baseline: multi-Otsu is skipped above {MAX_OTSU_CLASSES} classes, "
            "where its search takes minutes to hours")
    else:
        try:
            result["otsu"] = otsu_scores(dataset)
        except ValueError as error:  # e.g. constant intensities: nothing to threshold
            result["otsu_note"] = f"no Otsu baseline: {error}"
    return result


OTSU_BINS = 256


def otsu_scores(dataset):
    """Dice, IoU and HD95 of Otsu thresholds of the held-out images' intensities.

    The thresholds come from the histogram of every held-out pixel (images are
    normalised to [0, 1]), read one image at a time.
    """
    from skimage import filters

    edges = np.linspace(0.0, 1.0, OTSU_BINS + 1)
    counts = np.zeros(OTSU_BINS, "int64")
    for _, image, _ in dataset.examples:
        counts += np.histogram(image.mean(axis=-1), bins=edges)[0]
    histogram = (counts, (edges[:-1] + edges[1:]) / 2)
    if dataset.n_label == 1:
        thresholds = [filters.threshold_otsu(hist=histogram)]
    else:
        thresholds = filters.threshold_multiotsu(classes=dataset.n_label, hist=histogram)
    metrics = metrics_lib.segmentation_metrics(
        dataset.n_label, dataset.class_names, "channels_last")
    distances = _HD95(dataset.n_label, dataset.class_names)
    for index in dataset.val:
        image, mask = dataset.read(index)
        predicted = np.digitize(image.mean(axis=-1), thresholds)
        for metric in metrics:
            metric.update_state(data_lib.targets(mask, dataset.n_label)[None],
                                data_lib.targets(predicted, dataset.n_label)[None])
        distances.add(predicted, mask, dataset.items[index].spacing)
    scores = {metric.name: float(metric.result()) for metric in metrics}
    scores.update(distances.result())
    return scores


class _HD95:
    """Held-out HD95 in pixels (in the voxel spacing's units for volumes with one):
    per image and foreground class, then the mean.

    An image where prediction and truth are both empty (NaN) is left out of the mean,
    as MONAI's `reduction="mean"` leaves NaN out; one empty and the other not makes it
    infinite (`metrics.hausdorff95` says why).
    `hd95` is the foreground's (binary) or the mean over the classes 1.., with
    `hd95_{class}` per class.
    """

    def __init__(self, n_label, class_names):
        self.n_label, self.class_names = n_label, class_names
        self.classes = [1] if n_label == 1 else list(range(1, n_label))
        self.values = {label: [] for label in self.classes}

    def add(self, predicted, truth, spacing=None):
        for label in self.classes:
            self.values[label].append(
                metrics_lib.hausdorff95(predicted == label, truth == label, spacing))

    def result(self):
        per_class = {}
        for label, values in self.values.items():
            values = np.asarray(values, "float64")
            kept = values[~np.isnan(values)]
            per_class[label] = float(kept.mean()) if kept.size else math.nan
        if self.n_label == 1:
            return {"hd95": per_class[1]}
        scores = {"hd95": float(np.mean(list(per_class.values())))}
        scores.update({f"hd95_{self.class_names[label]}": value
                       for label, value in per_class.items()})
        return scores
