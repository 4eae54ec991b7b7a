"""K-fold cross-validation in one call: every fold, then all held-out cases together.

`cross_validate(config)` (`attunet-keras cross-validate`) trains fold F of
`config.folds` in `OUTPUT/fold_F` for every F in turn: each a normal `train` run with
`folds=K, fold=F`, sharing `OUTPUT/splits.json` (`folds.py`). A fold that finished is
kept as it is, one that was interrupted resumes from its backup, so a killed
cross-validation run again with the same command goes on where it stopped. Then the
held-out cases of all folds (each fold's `summary.json`, written when it finished) are
summarised together in `OUTPUT/summary.json` and `summary.csv`, and the post-processing
is decided from them (`postprocess.decide`, nnU-Net's rule) and written in
`OUTPUT/postprocessing.json`, which `predict` and `evaluate` of the fold runs apply with
`--postprocess auto`.
"""

import dataclasses
import os

from attunet_keras import evaluation
from attunet_keras import postprocess
from attunet_keras import run_folder
from attunet_keras import runs
from attunet_keras import training


def fold_folder(output, fold):
    return os.path.join(output, f"fold_{fold}")


def fold_runs(folder):
    """The fold runs of a cross-validation folder, `[(fold, run folder)]` in order."""
    folder = os.path.abspath(folder)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    folds = sorted(int(name[len("fold_"):]) for name in names
                   if name.startswith("fold_") and name[len("fold_"):].isdigit())
    return [(fold, fold_folder(folder, fold)) for fold in folds
            if run_folder.is_run_folder(fold_folder(folder, fold))]


def cross_validate(config, *, verbose="auto"):
    """Trains every fold of `config.folds` under `config.output`, then evaluates them
    together; returns `{"folds", "summary", "postprocessing", "written"}`."""
    if config.folds is None:
        raise ValueError("cross-validation needs folds (--folds K).")
    if config.strategy == "multiworker":
        raise ValueError("cross-validate trains its folds in this process; start a "
                         "multi-worker train per fold with --folds K --fold F instead.")
    output = os.path.abspath(config.output)
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"output {output} exists and is not a folder.")
    folds = [dataclasses.replace(config, output=fold_folder(output, fold), fold=fold,
                                 splits=config.splits)
             for fold in range(config.folds)]
    for fold_config in folds:  # every fold's settings checked before any is trained
        fold_config.validate()
    os.makedirs(output, exist_ok=True)
    with runs.folder_lock(output, what="cross-validation folder"):
        for fold, fold_config in enumerate(folds):
            if os.path.isfile(os.path.join(fold_config.output, run_folder.RESULT_FILE)):
                print(f"Fold {fold} of {config.folds}: finished already, kept "
                      f"({fold_config.output})")
                continue
            print(f"Fold {fold} of {config.folds}: training {fold_config.output}")
            training.train(fold_config, verbose=verbose)
        return _combine(config, output, folds)


def _combine(config, output, folds):
    cases = []
    for fold, fold_config in enumerate(folds):
        path = os.path.join(fold_config.output, evaluation.SUMMARY_JSON)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: fold {fold} finished without its "
                                    "per-case summary; train it again with --overwrite.")
        cases += [dict(case, fold=fold) for case in evaluation.read_summary(path)["cases"]]
    n_label = config.n_label  # a folder dataset's, given with --n-label
    summary = evaluation.summarize(cases, n_label)
    candidates = [{kind: {int(label): value for label, value in values.items()}
                   for kind, values in case["postprocessing_candidates"].items()}
                  for case in cases]
    decisions, report = postprocess.decide(candidates, n_label)
    decision_path = os.path.join(output, postprocess.POSTPROCESSING_FILE)
    runs.write_json(decision_path, {"decisions": decisions, "report": report,
                                    "rule": "nnU-Net's determine_postprocessing: see "
                                            "attunet_keras.postprocess"})
    written = list(evaluation.write_summary(output, summary)) + [decision_path]
    return {"folds": config.folds, "summary": summary,
            "postprocessing": {"decisions": decisions, "report": report},
            "written": written}

