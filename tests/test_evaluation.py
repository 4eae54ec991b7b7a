"""Evaluation as the field reports it: per-case scores, folds, post-processing.

The per-case figures are worked out by hand on masks small enough to count; the
cross-validation runs for real on a tiny folder (three folds of two cases)."""

import contextlib
import csv
import io
import json
import math
import shutil
import subprocess

import numpy as np
import pytest

from attunet_keras import cli
from attunet_keras import config as config_lib
from attunet_keras import evaluation
from attunet_keras import folds
from attunet_keras import postprocess
from attunet_keras import training
from helpers import write_pairs


def test_per_case_scores_follow_the_conventions_worked_out_by_hand():
    truth = np.zeros((8, 8), "uint8")
    truth[2:6, 2:6] = 1  # 16 pixels
    predicted = np.zeros((8, 8), "uint8")
    predicted[2:6, 3:7] = 1  # 16 pixels, 12 shared
    scores = evaluation.case_scores(predicted, truth, 1, ("background", "fg"))["foreground"]
    assert scores["dice"] == pytest.approx(2 * 12 / 32)
    assert scores["iou"] == pytest.approx(12 / 20)
    assert scores["reference_volume"] == 16 and scores["predicted_volume"] == 16
    # Boundaries (mask minus erosion) of 12 pixels each; the prediction's right column
    # (4 pixels, x=6) is 1 pixel from the truth's boundary, and so are all others at
    # most: every boundary pixel lies within 1 pixel of the other boundary.
    assert scores["nsd"] == pytest.approx(1.0)
    assert scores["hd95"] == pytest.approx(1.0)
    # With a spacing of 2 mm along x the same shift is 2 mm: outside a 1 mm tolerance
    # for the columns that moved (the left and right edges: 4 + 4 of the 24 pixels).
    spaced = evaluation.case_scores(predicted, truth, 1, ("background", "fg"),
                                    spacing=(1.0, 2.0), nsd_tolerance=1.0)["foreground"]
    assert spaced["nsd"] == pytest.approx(16 / 24)
    assert spaced["reference_volume"] == 32.0

    empty = np.zeros((8, 8), "uint8")
    both = evaluation.case_scores(empty, empty, 1, ("background", "fg"))["foreground"]
    assert both["dice"] == 1.0 and math.isnan(both["hd95"]) and math.isnan(both["nsd"])
    one = evaluation.case_scores(empty, truth, 1, ("background", "fg"))["foreground"]
    assert one["dice"] == 0.0 and one["nsd"] == 0.0 and math.isinf(one["hd95"])


def test_statistics_leave_nan_and_inf_out_and_count_them():
    figures = evaluation.statistics([1.0, 3.0, float("nan"), float("inf")])
    assert figures == {"mean": 2.0, "median": 2.0, "std": 1.0, "cases": 4, "nan": 1,
                       "inf": 1}
    assert evaluation.statistics([float("nan")])["mean"] is None


def test_keep_largest_counts_diagonal_neighbours_as_one_component():
    labels = np.zeros((6, 6), "uint8")
    labels[0, 0] = labels[1, 1] = 1  # diagonal neighbours: one component of 2
    labels[4:6, 4:6] = 2  # 4 pixels of class 2
    labels[3, 0] = 1  # a lone pixel
    merged = postprocess.keep_largest(labels, [1, 2])
    assert (merged == 2).sum() == 4 and (merged == 1).sum() == 0
    per_class = postprocess.keep_largest(labels, [1])
    assert per_class[0, 0] == per_class[1, 1] == 1 and per_class[3, 0] == 0
    assert (per_class == 2).sum() == 4  # other classes untouched


def test_decide_follows_nnunet_s_rule():
    def case(none, merged, largest, after):
        return {"none": none, "largest_foreground": merged, "largest_class": largest,
                "largest_class_after": after}

    # Keeping the largest foreground component raises the mean (0.6 -> 0.7) but lowers
    # class 2: not applied; class 1's own largest component raises class 1: applied.
    cases = [case({1: 0.4, 2: 0.8}, {1: 0.7, 2: 0.7}, {1: 0.5, 2: 0.8}, {1: 0.7, 2: 0.7})]
    decisions, report = postprocess.decide(cases, 3)
    assert decisions == {"largest_foreground": False, "largest_per_class": [1]}
    assert report["foreground_dice_before"] == pytest.approx(0.6)
    assert report["foreground_dice_after"] == pytest.approx(0.65)
    # Raising every class: applied, and the per-class step compares on top of it.
    cases = [case({1: 0.4, 2: 0.6}, {1: 0.5, 2: 0.6}, {1: 0.9, 2: 0.9}, {1: 0.5, 2: 0.7})]
    decisions, _ = postprocess.decide(cases, 3)
    assert decisions == {"largest_foreground": True, "largest_per_class": [2]}
    # Binary: only the foreground step exists; equal means are not a gain.
    cases = [case({1: 0.5}, {1: 0.5}, {1: 0.9}, {1: 0.9})]
    assert postprocess.decide(cases, 1)[0] == postprocess.NONE


def test_splits_are_folds_of_the_cases_written_once_and_checked(tmp_path):
    names = [f"im{index}.png" for index in range(7)]
    splits = folds.make_splits(names, 3, seed=0)
    assert sorted(len(fold["val"]) for fold in splits) == [2, 2, 3]
    assert sorted(sum((fold["val"] for fold in splits), [])) == sorted(names)
    for fold in splits:
        assert sorted(fold["train"] + fold["val"]) == sorted(names)
    assert folds.make_splits(names, 3, seed=0) == splits
    path = str(tmp_path / "splits.json")
    found, val = folds.fold_split(names, 3, 1, 5, path)
    assert found == folds.make_splits(names, 3, seed=5) and val == found[1]["val"]
    folds.commit(path, found)
    # Written once, reused whatever the seed.
    assert folds.fold_split(names, 3, 2, 99, path)[0] == found
    with pytest.raises(ValueError, match="written by another run meanwhile"):
        folds.commit(path, splits)
    with pytest.raises(ValueError, match=r"other cases \(cases not in the split"):
        folds.fold_split(names + ["new.png"], 3, 0, 0, path)
    with pytest.raises(ValueError, match="holds 3 folds, not --folds 4"):
        folds.fold_split(names, 4, 0, 0, path)


@pytest.mark.parametrize("changes, message", [
    (dict(folds=3), "needs the held-out fold"),
    (dict(folds=3, fold=3), "fold=3 is not one of 0..2"),
    (dict(folds=1, fold=0), "folds"),
    (dict(folds=3, fold=0, val_fraction=0.3), "folds replace val_fraction"),
    (dict(fold=0), "fold and splits go with folds"),
    (dict(dataset="nuclei", n_label=None, folds=3, fold=0), "has its own fixed split"),
])
def test_bad_fold_settings_are_refused(tmp_path, changes, message):
    values = dict(dataset=str(tmp_path), n_label=1, output=str(tmp_path / "run"))
    values.update(changes)
    with pytest.raises(ValueError, match=message):
        config_lib.TrainConfig(**values).validate()


CV_FLAGS = ["--n-label", "1", "--folds", "3", "--epochs", "1", "--steps-per-epoch", "2",
            "--batch-size", "2", "--depth", "2", "--features", "4", "--tile", "32",
            "--val-batches", "1", "--verbose", "0"]


@pytest.fixture(scope="module")
def cross_validated(tmp_path_factory):
    """A 3-fold cross-validation of six 32x32 pairs, stopped between its first two
    folds (as by a kill: the exception stands for it) and run again: `(folder, the
    second run's console output, the folds started the first time)`."""
    root = tmp_path_factory.mktemp("cv")
    dataset = write_pairs(root / "set", 6, size=(32, 32))
    output = root / "cv"
    argv = ["cross-validate", "--dataset", str(dataset), "--output", str(output), *CV_FLAGS]
    train = training.train
    started = []

    def stopped_at_the_second_fold(config, **kwargs):
        started.append(config.fold)
        if config.fold == 1:
            raise KeyboardInterrupt
        return train(config, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "train", stopped_at_the_second_fold)
        with pytest.raises(KeyboardInterrupt):
            cli.main(argv)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert cli.main(argv) == 0
    return output, buffer.getvalue(), started


def test_cross_validation_runs_every_fold_survives_a_stop_and_decides_post_processing(
        cross_validated):
    output, out, started = cross_validated
    assert started == [0, 1]
    assert "Fold 0 of 3: finished already, kept" in out
    assert "Fold 1 of 3: training" in out and "Fold 2 of 3: training" in out
    assert "Post-processing decided:" in out and "worst by Dice" in out
    splits = json.loads((output / "splits.json").read_text())
    held_out = [set(fold["val"]) for fold in splits]
    assert sum(map(len, held_out)) == 6 and len(set().union(*held_out)) == 6
    for fold in range(3):
        recorded = config_lib.read_config(str(output / f"fold_{fold}"))
        assert set(recorded.val_files) == held_out[fold] and recorded.fold == fold
        assert (output / f"fold_{fold}" / "result.json").is_file()
    with open(output / "summary.csv") as file:
        rows = list(csv.DictReader(file))
    assert sorted(row["case"] for row in rows) == sorted(f"im{i}.png" for i in range(6))
    assert set(rows[0]) == {"case", "class", "dice", "iou", "hd95", "nsd",
                            "reference_volume", "predicted_volume"}
    summary = json.loads((output / "summary.json").read_text())
    assert summary["per_class"]["foreground"]["dice"]["cases"] == 6
    decided = json.loads((output / "postprocessing.json").read_text())
    assert set(decided["decisions"]) == {"largest_foreground", "largest_per_class"}
    assert decided["report"]["cases"] == 6


def test_evaluate_applies_the_cross_validation_s_post_processing(cross_validated, tmp_path,
                                                                 capsys):
    copy = tmp_path / "cv"
    shutil.copytree(cross_validated[0], copy)
    decided = json.loads((copy / "postprocessing.json").read_text())
    decided["decisions"] = {"largest_foreground": True, "largest_per_class": []}
    (copy / "postprocessing.json").write_text(json.dumps(decided))
    assert cli.main(["evaluate", str(copy / "fold_0"), "--nsd-tolerance", "2"]) == 0
    out = capsys.readouterr().out
    assert "Post-processing from" in out and "largest foreground component" in out
    assert "NSD at 2 pixels" in out
    evaluated = json.loads((copy / "fold_0" / "summary.json").read_text())
    assert evaluated["postprocessing"]["largest_foreground"] is True
    assert evaluated["nsd_tolerance"] == 2.0
    # Every case's prediction now holds at most one component.
    for case in evaluated["cases"]:
        assert case["classes"]["foreground"]["predicted_volume"] >= 0
    assert cli.main(["evaluate", str(copy / "fold_0"), "--postprocess", "none"]) == 0
    assert "Post-processing from" not in capsys.readouterr().out
    assert json.loads((copy / "fold_0" / "summary.json").read_text())["postprocessing"] is None


def test_the_report_is_self_contained_and_every_figure_shows_in_chromium(cross_validated,
                                                                           tmp_path):
    page = tmp_path / "report.html"
    assert cli.main(["report", str(cross_validated[0]), "--output", str(page)]) == 0
    text = page.read_text()
    figures = text.count('<img class="figure"')
    # curves, box plot, 2 worst + 2 best cases, attention maps
    assert figures == 7, figures
    assert text.count('src="data:image/png;base64,') == figures
    assert "http://" not in text and "https://" not in text
    assert "fold 2" in text and "Post-processing decided from the folds" in text
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (make test installs it with apt-get)")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(flags + ["--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert f'data-figures-loaded="{figures}"' in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "page.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,2400",
                            page.as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), "float32")
    assert pixels.shape == (2400, 1200) and pixels.std() > 10  # a page, not a blank


def test_a_run_s_report_evaluates_it_when_it_has_no_summary(cross_validated, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cross_validated[0] / "fold_1", run)
    (run / "summary.json").unlink()
    assert cli.main(["report", str(run)]) == 0
    assert (run / "summary.json").is_file()
    text = (run / "report.html").read_text()
    # curves, box plot, the two held-out cases (each worst and best), attention maps
    assert text.count('<img class="figure"') == 5
    with pytest.raises(SystemExit):
        cli.main(["report", str(run)])  # exists: refused without --overwrite


def test_the_folds_predict_as_one_ensemble(cross_validated, tmp_path, capsys):
    from PIL import Image

    from attunet_keras import data
    from attunet_keras import evaluation as evaluation_lib
    from attunet_keras import inference

    output, _, _ = cross_validated
    images = tmp_path / "images"
    images.mkdir()
    source = output.parent / "set" / "images" / "im0.png"
    shutil.copy(source, images / "im0.png")
    assert cli.main(["predict", str(images), "--cross-validation", str(output),
                     "--output", str(tmp_path / "out"), "--postprocess", "none"]) == 0
    assert "Ensemble of 3 runs" in capsys.readouterr().out
    written = np.asarray(Image.open(tmp_path / "out" / "im0_mask.png")) > 0
    # The mean of the three folds' probabilities, each model run here on its own.
    image = data.read_image(str(source))
    mean = np.mean([inference.predict_image(
        inference.fully_convolutional(evaluation_lib.load_run_model(
            str(output / f"fold_{fold}"))), image) for fold in range(3)], axis=0)
    expected = mean[..., 0] > 0.5
    near_threshold = np.abs(mean[..., 0] - 0.5) < 1e-5
    assert np.array_equal(written[~near_threshold], expected[~near_threshold])


def test_an_ensemble_of_models_of_other_classes_is_refused(tmp_path):
    from attunet_keras import inference
    from attunet_keras import models

    paths = []
    for n_label in (1, 2):
        model = models.att_unet(16, 16, n_label, depth=1, features=2, in_channels=1,
                                output_activation="sigmoid" if n_label == 1 else "softmax",
                                data_format="channels_last")
        paths.append(tmp_path / f"m{n_label}.keras")
        model.save(paths[-1])
    with pytest.raises(ValueError, match=r"m2.keras cannot join the ensemble of .*m1.keras: "
                                         r"output channels 2 \(not 1\)"):
        inference.Ensemble(paths)
    with pytest.raises(ValueError, match="at least two models"):
        inference.Ensemble(paths[:1])


def test_evaluate_scores_an_ensemble_of_runs_on_a_run_s_held_out_cases(cross_validated,
                                                                        tmp_path, capsys):
    from attunet_keras import evaluation as evaluation_lib
    from attunet_keras import inference

    output = cross_validated[0]
    out = tmp_path / "scores"
    out.mkdir()
    assert cli.main(["evaluate", str(output / "fold_0"), "--with-run", str(output / "fold_1"),
                     "--output", str(out), "--postprocess", "none", "--json"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.index("{"):])
    assert "dice" in result["model"]
    # Each held-out case of fold 0 by hand: the two models' probabilities averaged,
    # thresholded, and Dice counted with numpy.
    members = [evaluation_lib.load_run_model(str(output / f"fold_{fold}")) for fold in (0, 1)]
    config = config_lib.read_config(str(output / "fold_0"))
    dataset = config_lib.load_data(config)
    summary = json.loads((out / "summary.json").read_text())
    written = {case["case"]: case["classes"]["foreground"]["dice"]
               for case in summary["cases"]}
    for index in dataset.val:
        image, mask = dataset.read(index)
        mean = np.mean([inference.predict_sliding_window(
            member, image, dataset.tile_shape, overlap=0.25, normalized=True)[..., 0]
            for member in members], axis=0)
        assert np.abs(mean - 0.5).min() > 1e-5  # no tie at the threshold
        predicted, truth = mean > 0.5, mask > 0
        total = predicted.sum() + truth.sum()
        dice = 1.0 if total == 0 else 2 * (predicted & truth).sum() / total
        assert written[dataset.items[index].name] == pytest.approx(dice, abs=1e-9)
