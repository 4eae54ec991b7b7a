"""Held-out scores of a run: Dice, IoU and HD95 of whole images by sliding windows,
next to an Otsu baseline (`evaluate_run`, `attunet-keras evaluate`)."""

import json
import math
import os

import numpy as np

from attunet_keras import config as config_lib
from attunet_keras import data as data_lib
from attunet_keras import inference
from attunet_keras import metrics as metrics_lib
from attunet_keras import model_info
from attunet_keras import run_folder
from attunet_keras import runs

# Multi-Otsu's cost grows combinatorially with the classes (6 classes: 78 s on 2 cores).
MAX_OTSU_CLASSES = 5
# Overlap of the sliding windows that predict the whole held-out images in evaluation.
EVALUATE_OVERLAP = 0.25
# The NSD's tolerance: 1 mm for volumes with a spacing, else 1 pixel.
NSD_TOLERANCE = 1.0
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"
METRICS = ("dice", "iou", "hd95", "nsd")
WORST_CASES = 3


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


def evaluate_run(run_dir, *, dataset=None, model=None, overlap=EVALUATE_OVERLAP,
                 nsd_tolerance=NSD_TOLERANCE, postprocessing=None):
    """Held-out scores of a run's best model on whole images, next to an Otsu baseline.

    The baseline thresholds the held-out images' intensities (their channel mean)
    with Otsu's method (scikit-image) on their pooled histogram: one threshold for
    binary masks, `n_label - 1` thresholds (multi-Otsu) for classes, the classes
    ordered by intensity.
    """
    config = config_lib.read_config(run_dir)
    dataset = dataset or config_lib.load_data(config, run_dir=run_dir)
    if model is None:
        model = load_run_model(run_dir)
    else:  # another model, or an `inference.Ensemble` (its first member's facts)
        check_model_fits(model.model if isinstance(model, inference.Ensemble) else model,
                         dataset)
    return evaluate_model(model, dataset, config, overlap=overlap,
                          nsd_tolerance=nsd_tolerance, postprocessing=postprocessing)


def evaluate_model(model, dataset, config, overlap=EVALUATE_OVERLAP,
                   nsd_tolerance=NSD_TOLERANCE, postprocessing=None):
    """Held-out scores of `model` (or of an `inference.Ensemble`, its members'
    probabilities averaged) on the whole held-out images: dataset-wide Dice,
    IoU and HD95 (`result["model"]`), next to Otsu's, and per case (`result["summary"]`,
    `case_scores` and `summarize`).

    Each image is predicted with `inference.predict_sliding_window` (patches of the
    dataset's tile, `overlap`, Gaussian blending), so the scores count every pixel
    once, whatever the image's size and the model's layout. `postprocessing` (the
    decisions of `postprocess.decide`) is applied to the labels before they are
    scored; the per-case record keeps the candidates' Dice either way, from which a
    cross-validation decides it.
    """
    from attunet_keras import postprocess

    metrics = metrics_lib.segmentation_metrics(
        dataset.n_label, dataset.class_names, "channels_last")
    distances = _HD95(dataset.n_label, dataset.class_names)
    cases = []
    for index in dataset.val:
        image, mask = dataset.read(index)
        def predict(member):
            return inference.predict_sliding_window(
                member, image, dataset.tile_shape, overlap=overlap,
                batch_size=config.batch_size, normalized=True)

        probabilities = (model.average(predict) if isinstance(model, inference.Ensemble)
                         else predict(model))
        item = dataset.items[index]
        spacing = item.spacing
        if item.restore is not None:  # a resampled case: scored on its own grid
            probabilities = item.restore(probabilities)
            mask, spacing = item.truth()
        labels = inference.labels_from_probabilities(probabilities)
        candidates = postprocess.candidates(labels, mask, dataset.n_label, case_dice)
        if postprocessing:
            labels = postprocess.apply(labels, postprocessing, dataset.n_label)
            probabilities = data_lib.targets(labels, dataset.n_label)
        truth = data_lib.targets(mask, dataset.n_label)[None]
        for metric in metrics:
            metric.update_state(truth, probabilities[None])
        distances.add(labels, mask, spacing)
        cases.append({"case": item.name, "spacing": spacing and list(spacing),
                      "classes": case_scores(labels, mask, dataset.n_label,
                                             dataset.class_names, spacing,
                                             nsd_tolerance),
                      "postprocessing_candidates": {
                          kind: {str(label): value for label, value in values.items()}
                          for kind, values in candidates.items()}})
    scores = {metric.name: float(metric.result()) for metric in metrics}
    scores.update(distances.result())
    result = {"dataset": dataset.name, "held_out_images": len(dataset.val),
              "dims": dataset.dims, "model": scores, "otsu": None,
              "summary": summarize(cases, dataset.n_label, nsd_tolerance,
                                   postprocessing)}
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

    The thresholds come from the histogram of every held-out pixel (of the images'
    channel mean, over [0, 1] where the images are normalised to it, else over their
    range), read one image at a time. Resampled medical cases are thresholded on the
    model's grid and scored on their own, as the model is.
    """
    from skimage import filters

    low, high = 0.0, 1.0
    for _, image, _ in dataset.examples:
        means = image.mean(axis=-1)
        low, high = min(low, float(means.min())), max(high, float(means.max()))
    edges = np.linspace(low, high, OTSU_BINS + 1)
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
        item = dataset.items[index]
        spacing = item.spacing
        if item.restore is not None:
            predicted = inference.labels_from_probabilities(
                item.restore(data_lib.targets(predicted, dataset.n_label)))
            mask, spacing = item.truth()
        for metric in metrics:
            metric.update_state(data_lib.targets(mask, dataset.n_label)[None],
                                data_lib.targets(predicted, dataset.n_label)[None])
        distances.add(predicted, mask, spacing)
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


# ------------------------------------------------------------------ per case


def case_dice(predicted, truth):
    """Dice of two boolean masks of one case: 1 when both are empty."""
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    total = int(predicted.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((predicted & truth).sum()) / total


def case_scores(predicted, truth, n_label, class_names, spacing=None,
                nsd_tolerance=NSD_TOLERANCE):
    """Per foreground class of one case: Dice, IoU, HD95, NSD and the two volumes.

    Conventions (the project's Dice and HD95, `metrics.hausdorff95`): both masks empty
    gives Dice and IoU 1, HD95 and NSD NaN; one empty and the other not gives Dice, IoU
    and NSD 0 and HD95 infinity. Distances and the NSD tolerance are in the units of
    `spacing` (mm for volumes with one), else pixels; volumes are voxel counts times
    the voxel volume.
    """
    classes = [1] if n_label == 1 else list(range(1, n_label))
    voxel = float(np.prod(spacing)) if spacing else 1.0
    scores = {}
    for label in classes:
        p, t = np.asarray(predicted) == label, np.asarray(truth) == label
        union = int((p | t).sum())
        scores[class_names[label] if n_label > 1 else "foreground"] = {
            "dice": case_dice(p, t),
            "iou": 1.0 if union == 0 else int((p & t).sum()) / union,
            "hd95": metrics_lib.hausdorff95(p, t, spacing),
            "nsd": metrics_lib.surface_dice(p, t, spacing, nsd_tolerance),
            "reference_volume": int(t.sum()) * voxel,
            "predicted_volume": int(p.sum()) * voxel,
        }
    return scores


def statistics(values):
    """`{"mean", "median", "std", "cases", "nan", "inf"}` of per-case values, NaN
    cases and infinite ones left out of the figures and counted beside them (so a
    mean is never infinite or silently optimistic); None figures when none is left."""
    values = np.asarray(values, "float64")
    nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
    kept = values[np.isfinite(values)]
    figures = ({"mean": float(kept.mean()), "median": float(np.median(kept)),
                "std": float(kept.std())} if kept.size
               else {"mean": None, "median": None, "std": None})
    return dict(figures, cases=int(values.size), nan=nan, inf=inf)


def summarize(cases, n_label, nsd_tolerance=NSD_TOLERANCE, postprocessing=None):
    """The summary of per-case records (`evaluate_model`'s, or several folds'):
    per class the statistics of every metric and the worst cases by Dice."""
    names = list(cases[0]["classes"]) if cases else []
    per_class = {}
    for name in names:
        rows = [(case["case"], case["classes"][name]) for case in cases]
        per_class[name] = {metric: statistics([row[metric] for _, row in rows])
                           for metric in METRICS}
        worst = sorted(rows, key=lambda row: (row[1]["dice"], row[0]))[:WORST_CASES]
        per_class[name]["worst_cases"] = [{"case": case, "dice": row["dice"]}
                                          for case, row in worst]
    units = "mm" if any(case.get("spacing") for case in cases) else "pixels"
    return {"classes": names, "nsd_tolerance": nsd_tolerance, "distance_unit": units,
            "postprocessing": postprocessing or None, "per_class": per_class,
            "cases": cases}


def write_summary(folder, summary):
    """Writes `summary.json` and `summary.csv` (one row per case and class) in
    `folder`, each whole or not at all; returns their paths."""
    import csv
    import io

    json_path = os.path.join(folder, SUMMARY_JSON)
    csv_path = os.path.join(folder, SUMMARY_CSV)
    runs.write_json(json_path, json_safe(summary))
    text = io.StringIO()
    fields = ["case", "class", *METRICS, "reference_volume", "predicted_volume"]
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for case in summary["cases"]:
        for name, scores in case["classes"].items():
            writer.writerow({"case": case["case"], "class": name, **scores})
    runs.write_text(csv_path, text.getvalue())
    return json_path, csv_path


def read_summary(path):
    """The summary `write_summary` wrote at `path`, its "nan" / "inf" strings floats
    again."""
    with open(path) as file:
        return _from_json_safe(json.load(file))


def _from_json_safe(value):
    if isinstance(value, dict):
        return {key: _from_json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json_safe(item) for item in value]
    if value in ("nan", "inf", "-inf"):
        return float(value)
    return value


def json_safe(value):
    """JSON has no NaN or infinity: they are written as the strings "nan" and "inf"."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def class_table(summary):
    """The console's table of a summary: per class the mean, median and spread of
    every metric, with the NaN and infinite cases left out counted."""
    lines = [f"{'class':<16}{'metric':<7}{'mean':>8}{'median':>8}{'std':>8}  cases "
             f"(left out)"]
    for name, stats in summary["per_class"].items():
        for metric in METRICS:
            figures = stats[metric]
            shown = ["   -    " if figures[key] is None else f"{figures[key]:8.4f}"
                     for key in ("mean", "median", "std")]
            left = [f"{figures[kind]} {kind}" for kind in ("nan", "inf") if figures[kind]]
            lines.append(f"{name:<16}{metric:<7}{''.join(shown)}  {figures['cases']}"
                         + (f" ({', '.join(left)})" if left else ""))
        worst = ", ".join(f"{row['case']} {row['dice']:.3f}" for row in stats["worst_cases"])
        lines.append(f"{'':<16}worst by Dice: {worst}")
    return "\n".join(lines)
