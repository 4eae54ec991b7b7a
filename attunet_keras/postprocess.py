"""Post-processing decided from the folds: keep the largest connected component.

nnU-Net's rule (`nnunetv2/postprocessing/remove_connected_components.py`,
`determine_postprocessing`), on the held-out cases of every fold together:

1. Keep only the largest connected component of all foreground classes together
   (the rest becomes background) when that raises the mean foreground Dice (the mean
   over the classes of their mean Dice over the cases) and lowers no class's mean
   Dice.
2. Then, with more than one foreground class, class by class on top of step 1's
   decision: keep only that class's largest component when that raises that class's
   mean Dice.

Components are 26-connected in 3D (8 in 2D: `scipy.ndimage.label` with the full
structuring element), as nnU-Net's `remove_all_but_largest_component`. A per-case Dice
with both masks empty is 1 (`evaluation.case_scores`), so removing a false positive
component from a case without the class counts as a gain. The decisions are written
as `postprocessing.json` in the cross-validation folder; `predict` and `evaluate` apply
them with `--postprocess auto`.
"""

import numpy as np

POSTPROCESSING_FILE = "postprocessing.json"
NONE = {"largest_foreground": False, "largest_per_class": []}


def foreground_classes(n_label):
    """The foreground labels: 1 for a binary model, else 1..n_label-1."""
    return [1] if n_label == 1 else list(range(1, n_label))


def keep_largest(labels, classes):
    """`labels` with every component of `classes` (taken together) but the largest set
    to background; a copy."""
    from scipy import ndimage

    labels = np.asarray(labels)
    mask = np.isin(labels, classes)
    if not mask.any():
        return labels.copy()
    components, count = ndimage.label(mask, structure=np.ones((3,) * labels.ndim, bool))
    if count <= 1:
        return labels.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    result = labels.copy()
    result[mask & (components != int(np.argmax(sizes)))] = 0
    return result


def apply(labels, decisions, n_label):
    """`labels` post-processed as `decisions` say (`decide`'s dict)."""
    if decisions.get("largest_foreground"):
        labels = keep_largest(labels, foreground_classes(n_label))
    for label in decisions.get("largest_per_class", []):
        labels = keep_largest(labels, [label])
    return labels


def candidates(predicted, truth, n_label, dice):
    """The Dice of each class under each choice `decide` weighs, for one case:
    `{"none": {class: dice}, "largest_foreground": {...}, "largest_class": {class:
    dice with only that class's largest component, on no step 1}, "largest_class_after":
    {... on step 1's}}`; `dice(predicted, truth)` is the per-case Dice of two masks."""
    classes = foreground_classes(n_label)
    merged = keep_largest(predicted, classes)

    def scores(labels):
        return {label: dice(labels == label, truth == label) for label in classes}

    return {
        "none": scores(predicted),
        "largest_foreground": scores(merged),
        "largest_class": {label: dice(keep_largest(predicted, [label]) == label,
                                      truth == label) for label in classes},
        "largest_class_after": {label: dice(keep_largest(merged, [label]) == label,
                                            truth == label) for label in classes},
    }


def decide(case_candidates, n_label):
    """nnU-Net's decisions from the `candidates` of every held-out case.

    Returns:
        `(decisions, report)`: `{"largest_foreground": bool, "largest_per_class":
        [labels]}`, and the mean Dice per class before and after with the figures
        each choice compared.
    """
    classes = foreground_classes(n_label)

    def means(kind):
        return {label: float(np.mean([case[kind][label] for case in case_candidates]))
                for label in classes}

    before = means("none")
    merged = means("largest_foreground")
    foreground_before = float(np.mean(list(before.values())))
    foreground_after = float(np.mean(list(merged.values())))
    largest_foreground = (foreground_after > foreground_before
                          and all(merged[label] >= before[label] for label in classes))
    base = merged if largest_foreground else before
    per_class = means("largest_class_after" if largest_foreground else "largest_class")
    chosen = [label for label in classes if len(classes) > 1 and per_class[label] > base[label]]
    after = {label: per_class[label] if label in chosen else base[label] for label in classes}
    report = {
        "cases": len(case_candidates),
        "mean_dice_before": {str(label): value for label, value in before.items()},
        "mean_dice_after": {str(label): value for label, value in after.items()},
        "foreground_dice_before": foreground_before,
        "foreground_dice_after": float(np.mean(list(after.values()))),
        "largest_foreground_tried": {"foreground_dice": foreground_after,
                                     "mean_dice": {str(k): v for k, v in merged.items()}},
    }
    return {"largest_foreground": bool(largest_foreground),
            "largest_per_class": chosen}, report


def decisions_for(run_dir):
    """`(decisions, path)` of the cross-validation a run folder is a fold of (its
    parent's `postprocessing.json`), or `(None, None)`."""
    import json
    import os

    if run_dir is None:
        return None, None
    path = os.path.join(os.path.dirname(os.path.abspath(run_dir)), POSTPROCESSING_FILE)
    if not os.path.isfile(path):
        return None, None
    try:
        with open(path) as file:
            written = json.load(file)
        decisions = written["decisions"]
        checked = {"largest_foreground": bool(decisions["largest_foreground"]),
                   "largest_per_class": [int(label) for label in
                                         decisions["largest_per_class"]]}
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a postprocessing.json of attunet-keras "
                         f"cross-validate ({type(error).__name__}: {error}); remove it or "
                         "pass --postprocess none.") from error
    return checked, path


def describe(decisions):
    """The decisions in words."""
    if not decisions or not (decisions["largest_foreground"]
                             or decisions["largest_per_class"]):
        return "none (every component kept)"
    parts = []
    if decisions["largest_foreground"]:
        parts.append("largest foreground component")
    if decisions["largest_per_class"]:
        parts.append("largest component of class(es) "
                     + ", ".join(map(str, decisions["largest_per_class"])))
    return ", then ".join(parts)
