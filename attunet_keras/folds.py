"""K-fold cross-validation splits by case: `splits.json`, written once and reused.

`train --folds K --fold F` holds out fold F of a folder dataset's cases and trains on
the other K - 1. The split is drawn once (the cases sorted by file name, permuted with
the run's seed, cut into K folds of sizes differing by at most one, as
`numpy.array_split` cuts) and written as `splits.json` in the parent folder of
`--output`, so that `DIR/fold_0` ... `DIR/fold_{K-1}` share it (or at `--splits FILE`);
never in the dataset folder, which may be read-only. Once written it is reused as it is,
as nnU-Net reuses its `splits_final.json`: a later run with another seed or other cases
in the folder is refused rather than silently validated on another split. Its format is
nnU-Net's: a list with one `{"train": [...], "val": [...]}` per fold (image file names).
"""

import json
import os

import numpy as np

from attunet_keras import runs

SPLITS_FILE = "splits.json"


def splits_path(output, splits=None):
    """Where the splits of a run in `output` live: `splits`, or `splits.json` beside it."""
    if splits is not None:
        return os.path.abspath(splits)
    return os.path.join(os.path.dirname(os.path.abspath(output)), SPLITS_FILE)


def make_splits(names, folds, seed):
    """`[{"train": [...], "val": [...]}, ...]`: `names` permuted with `seed`, cut into
    `folds` folds; each list sorted."""
    names = sorted(names)
    order = np.random.default_rng(seed).permutation(len(names))
    splits = []
    for part in np.array_split(order, folds):
        held_out = {names[index] for index in part}
        splits.append({"train": [name for name in names if name not in held_out],
                       "val": sorted(held_out)})
    return splits


def check_splits(splits, names, folds, path):
    """Refuses splits that are not K folds of exactly these cases, naming the problem."""
    if not (isinstance(splits, list) and all(
            isinstance(fold, dict) and isinstance(fold.get("train"), list)
            and isinstance(fold.get("val"), list) for fold in splits)):
        raise ValueError(f"{path} is not a list of {{'train': [...], 'val': [...]}} folds.")
    if len(splits) != folds:
        raise ValueError(f"{path} holds {len(splits)} folds, not --folds {folds}; use its "
                         f"fold count or another --splits file.")
    names = set(names)
    for index, fold in enumerate(splits):
        listed = set(fold["train"]) | set(fold["val"])
        if set(fold["train"]) & set(fold["val"]) or not fold["val"]:
            raise ValueError(f"{path}: fold {index} holds out no case, or a case it also "
                             "trains on.")
        if listed != names:
            missing, unknown = sorted(names - listed), sorted(listed - names)
            detail = (f"cases not in the split: {missing[:3]}" if missing
                      else f"cases the dataset lacks: {unknown[:3]}")
            raise ValueError(f"{path} was written for other cases ({detail}); restore the "
                             "folder, or give another --splits file for the new cases.")


def read_splits(path):
    """The splits written at `path`, or None when there are none yet."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as file:
            return json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from error


def fold_split(names, folds, fold, seed, path):
    """The splits of a run (those at `path`, else a new draw, not yet written) and the
    held-out files of its fold, checked against the dataset's cases `names`."""
    if not 0 <= fold < folds:
        raise ValueError(f"fold={fold} is not one of 0..{folds - 1} (--folds {folds}).")
    if len(names) < folds:
        raise ValueError(f"--folds {folds} needs at least {folds} cases; the dataset has "
                         f"{len(names)}.")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the folder {folder} of {os.path.basename(path)} does not "
                                "exist; create it first.")
    splits = read_splits(path)
    if splits is None:
        splits = make_splits(names, folds, seed)
    check_splits(splits, names, folds, path)
    return splits, splits[fold]["val"]


def commit(path, splits):
    """Writes `splits` at `path` unless it holds them already (under a lock, so folds
    started at once agree); refuses when another run wrote other splits there since."""
    with runs.file_lock(path + ".lock", remove=True, what=path):
        written = read_splits(path)
        if written is None:
            runs.write_json(path, splits)
        elif written != splits:
            raise ValueError(f"{path} was written by another run meanwhile with other "
                             "folds; run the command again to use them.")
