"""Decathlon and nnU-Net v2 folders as they come: layouts, problems, nnU-Net's target
spacing, resampling, normalisation by modality, plan, and a short run that learns.

The folders are made by tests/medical_cases.py (the MNI template of the nilearn wheel
at mixed spacings with a rotated affine, two channels; synthetic CT in HU).
"""

import csv
import json
import os
import shutil

import nibabel
import numpy as np
import pytest

import medical_cases
from attunet_keras import cli
from attunet_keras import data
from attunet_keras.data import medical
from attunet_keras.data import planning

# Printed by tests/data/nnunet_golden.py (nnunetv2 2.8.1's own
# ExperimentPlanner.determine_fullres_target_spacing and crop_to_nonzero), 2026-12-02.
NNUNET_BRAIN_SHAPES_AFTER_CROP = [[36, 45, 39], [40, 51, 30], [31, 39, 26], [35, 44, 38],
                                  [40, 52, 33], [29, 35, 30]]
NNUNET_BRAIN_TARGET = [4.0, 4.0, 4.75]
NNUNET_CT_TARGET = [0.9000000059604645, 0.9000000059604645, 2.5]
NNUNET_OTHER_TARGETS = {"anisotropic": [1.5, 1.5, 5.6], "raised": [1.0, 1.0, 1.00001],
                        "spacing_only": [1.0, 1.0, 3.5]}
NNUNET_NEW_SHAPE = [36, 46, 33]  # compute_new_shape([41, 52, 31], (3.5, 3.5, 5), target)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("medical")
    return {"decathlon": medical_cases.decathlon_brain(str(root / "Task01_Brain")),
            "nnunet": medical_cases.nnunet_brain(str(root / "Dataset001_Brain")),
            "ct": medical_cases.nnunet_ct(str(root / "Dataset002_CT"))}


def _copy(folder, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def test_both_layouts_are_read_as_they_come(folders):
    decathlon = medical.describe(folders["decathlon"])
    nnunet = medical.describe(folders["nnunet"])
    for folder, layout in ((decathlon, "decathlon"), (nnunet, "nnunet")):
        assert folder.layout == layout
        assert folder.channels == ("T1", "T2")
        assert folder.label_names == ("background", "grey_matter", "white_matter")
        assert folder.n_label == 3 and folder.dims == 3
        assert folder.case_names == sorted(medical_cases.BRAIN_CASES)
        assert [case.name for case in folder.test_cases] == ["brain_900"]
    assert all(len(case.images) == 1 for case in decathlon.cases)  # 4D, the ._* ignored
    assert all(os.path.basename(path) == f"{case.name}_{index:04d}.nii.gz"
               for case in nnunet.cases for index, path in enumerate(case.images))
    # the same case read from either layout: the channels in dataset.json order
    one, labels, geometry = medical.read_case(decathlon.cases[1])
    other, other_labels, other_geometry = medical.read_case(nnunet.cases[1])
    np.testing.assert_array_equal(one, other)
    np.testing.assert_array_equal(labels, other_labels)
    assert one.shape == geometry.shape + (2,) and geometry.spacing == (3.5, 3.5, 5.0)
    assert other_geometry.spacing == geometry.spacing


def test_nnunet_s_target_spacing_rules_give_its_own_numbers():
    for name, (spacings, shapes) in {
        "anisotropic": ([[1.5, 1.5, 10.0], [1.25, 1.25, 10.0], [1.6, 1.6, 5.0],
                         [1.4, 1.4, 6.5], [1.5, 1.5, 10.0]],
                        [[200, 200, 9], [220, 210, 10], [190, 180, 18], [200, 200, 14],
                         [210, 200, 9]]),
        "raised": ([[1.0, 1.0, 4.0], [1.0, 1.0, 4.0], [1.0, 1.0, 0.9], [1.0, 1.0, 4.0],
                    [1.0, 1.0, 0.8]],
                   [[300, 300, 20], [300, 300, 22], [300, 300, 80], [300, 300, 21],
                    [300, 300, 90]]),
        "spacing_only": ([[1.0, 1.0, 3.5]] * 3, [[100, 100, 90]] * 3),
    }.items():
        target, rule = planning.target_spacing(spacings, shapes)
        np.testing.assert_allclose(target, NNUNET_OTHER_TARGETS[name], rtol=0, atol=1e-9)
        assert rule.startswith("anisotropic axis 2") == (name != "spacing_only"), name
    assert list(planning.new_shape((41, 52, 31), (3.5, 3.5, 5.0), NNUNET_BRAIN_TARGET)) == \
        NNUNET_NEW_SHAPE


def test_the_plan_of_each_folder(folders, tmp_path, capsys):
    output = tmp_path / "plan.json"
    assert cli.main(["plan", folders["decathlon"], "--output", str(output), "--depth", "2",
                     "--features", "4", "--memory-gb", "0.02"]) == 0
    out = capsys.readouterr().out
    plan = planning.read_plan(output)
    crops = [case["shape_after_crop"] for case in plan["fingerprint"]["cases"]]
    assert crops == NNUNET_BRAIN_SHAPES_AFTER_CROP
    assert plan["spacing"]["target"] == pytest.approx(NNUNET_BRAIN_TARGET, abs=1e-9)
    assert "target spacing: 4 x 4 x 4.75 (median)" in out
    assert plan["spacing"]["p10"] == pytest.approx([3.5, 3.5, 4.0])
    assert plan["normalization"] == [
        {"channel": "T1", "scheme": "zscore", "use_nonzero_mask": False},
        {"channel": "T2", "scheme": "zscore", "use_nonzero_mask": False}]
    # the budget shrinks the patch (multiples of 4 at depth 2) until the estimate fits
    assert all(side % 4 == 0 for side in plan["patch"])
    assert plan["estimated_step_gb"] <= 0.02 < planning.step_memory_gb(
        [36, 44, 32], 2, 2, 4, 2)
    assert sum(plan["class_frequencies"].values()) == pytest.approx(1.0)
    with pytest.raises(SystemExit):
        cli.main(["plan", folders["decathlon"], "--output", str(output)])
    assert "already exists; pass --overwrite" in capsys.readouterr().err

    ct = planning.make_plan(folders["ct"], depth=2, features=4)
    assert ct["spacing"]["target"] == pytest.approx(NNUNET_CT_TARGET, abs=1e-9)
    rule = ct["normalization"][0]
    # the foreground voxels of every case, pooled, computed here without the sampler
    pooled = []
    for case in medical.describe(folders["ct"]).cases:
        image, labels, _ = medical.read_case(case)
        pooled.append(image[..., 0][labels > 0])
    pooled = np.concatenate(pooled)
    assert rule["scheme"] == "ct"
    assert rule["clip"] == pytest.approx(np.percentile(pooled, [0.5, 99.5]), abs=3.0)
    assert rule["mean"] == pytest.approx(pooled.mean(), abs=1.0)
    assert rule["std"] == pytest.approx(pooled.std(), rel=0.03)
    raw = np.array([[[[-1000.0], [0.0], [130.0], [2000.0]]]], "float32")
    expected = (np.clip(raw, *rule["clip"]) - rule["mean"]) / rule["std"]
    np.testing.assert_allclose(planning.normalize_case(raw, ct["normalization"]), expected,
                               rtol=1e-6)


def test_zscore_over_the_nonzero_region_leaves_the_outside_at_zero():
    image = np.zeros((20, 20, 20, 1), "float32")
    image[5:15, 5:15, 5:15, 0] = np.random.default_rng(0).normal(300, 40, (10, 10, 10))
    out = planning.normalize_case(image, [{"scheme": "zscore", "use_nonzero_mask": True}])
    inside = out[5:15, 5:15, 5:15, 0]
    assert inside.mean() == pytest.approx(0.0, abs=1e-5)
    assert inside.std() == pytest.approx(1.0, abs=1e-4)
    assert np.count_nonzero(out[..., 0]) == 1000  # outside stays 0
    whole = planning.normalize_case(image, [{"scheme": "zscore"}])
    assert whole.mean() == pytest.approx(0.0, abs=1e-5) and whole[0, 0, 0, 0] < 0


def test_labels_resampled_to_the_target_and_back_are_themselves():
    labels = np.zeros((24, 24, 12), "uint8")
    labels[4:18, 3:20, 2:10] = 1
    labels[8:14, 8:16, 4:8] = 2
    spacing, target = (2.0, 2.0, 4.0), (1.0, 1.0, 2.0)
    fine = planning.resample_labels(labels, spacing, target, n_values=3)
    assert fine.shape == (48, 48, 24) and set(np.unique(fine)) == {0, 1, 2}
    back = planning.resample_labels(fine, target, spacing, labels.shape, n_values=3)
    # equal wherever a voxel's 3x3x3 neighbourhood holds one label (the grid allows it
    # there); at label borders linear one-hot maps meet at 0.5
    from scipy import ndimage

    uniform = ndimage.maximum_filter(labels, 3) == ndimage.minimum_filter(labels, 3)
    np.testing.assert_array_equal(back[uniform], labels[uniform])
    assert (back == labels).mean() > 0.97
    # an anisotropic grid (ratio above 3) resamples its coarse axis with order 0
    assert planning._separate_axis((1.0, 1.0, 3.5), (1.0, 1.0, 1.0)) == 2
    assert planning._separate_axis((1.0, 1.0, 2.0), (1.0, 1.0, 1.0)) is None
    thick = planning.resample_labels(labels, (1.0, 1.0, 4.0), (1.0, 1.0, 2.0), n_values=3)
    np.testing.assert_array_equal(thick[:, :, ::2], labels)  # nearest along z
    # separate z with the plane down-sampled 2x: a border voxel whose one-hot value is
    # exactly 0.5 in-plane keeps its label, as nnU-Net's resize_segmentation keeps it
    # (and as the path without separate z does)
    strip = np.zeros((8, 8, 4), "uint8")
    strip[:3] = 1
    separate = planning.resample_labels(strip, (0.5, 0.5, 5.0), (1.0, 1.0, 5.0), n_values=2)
    joint = planning.resample_labels(strip, (1.0, 1.0, 1.5), (2.0, 2.0, 1.5), n_values=2)
    np.testing.assert_array_equal(separate[:, 0, 0], [1, 1, 0, 0])
    np.testing.assert_array_equal(joint[:, 0, 0], [1, 1, 0, 0])


def test_every_problem_is_listed_with_its_file_and_train_refuses(folders, tmp_path, capsys):
    folder = _copy(folders["nnunet"], tmp_path)
    os.remove(folder / "imagesTr" / "brain_002_0001.nii.gz")
    bad = nibabel.load(folder / "labelsTr" / "brain_003.nii.gz")
    labels = np.asarray(bad.dataobj).copy()
    labels[0, 0, 0] = 7
    nibabel.save(nibabel.Nifti1Image(labels, bad.affine), folder / "labelsTr" / "brain_003.nii.gz")
    other = nibabel.load(folder / "imagesTr" / "brain_004_0000.nii.gz")
    nibabel.save(nibabel.Nifti1Image(np.asarray(other.dataobj)[:-2], other.affine),
                 folder / "imagesTr" / "brain_004_0001.nii.gz")
    assert cli.main(["check-data", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "brain_002_0001.nii.gz: missing (case brain_002 needs 2 channel file(s)" in out
    # a missing file stops the listing of the others there: restore it, list the rest
    shutil.copy(folders["nnunet"] + "/imagesTr/brain_002_0001.nii.gz", folder / "imagesTr")
    assert cli.main(["check-data", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "brain_003.nii.gz: labels [7] are not in dataset.json's labels (0..2)" in out
    assert "brain_004_0001.nii.gz is 39x52x34 but" in out and "share one grid" in out
    assert "2 problem(s)" in out
    with open(folder / "dataset.json") as file:
        values = json.load(file)
    with open(folder / "dataset.json", "w") as file:
        json.dump(dict(values, numTraining=7), file)
    shutil.copy(folder / "imagesTr" / "brain_000_0000.nii.gz", folder / "imagesTr" /
                "brain_000_0002.nii.gz")
    with pytest.raises(ValueError, match=r"brain_000_0002.nii.gz: channel 2 but dataset.json "
                                         r"names 2 channel"):
        medical.describe(str(folder))
    os.remove(folder / "imagesTr" / "brain_000_0002.nii.gz")
    with pytest.raises(ValueError, match=r"numTraining is 7 but labelsTr/ holds 6 case"):
        medical.describe(str(folder))
    with open(folder / "dataset.json", "w") as file:
        json.dump(values, file)
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        cli.main(["train", "--dataset", str(folder), "--output", str(run), "--epochs", "1"])
    err = capsys.readouterr().err
    assert "brain_004_0001.nii.gz is 39x52x34" in err and not run.exists()
    with pytest.raises(SystemExit):
        cli.main(["train", "--dataset", folders["nnunet"], "--output", str(run),
                  "--n-label", "2"])
    assert "n_label=2 but" in capsys.readouterr().err and not run.exists()
    # a plan from a file read no voxel: the labels are still checked before any step
    fixed = nibabel.load(folders["nnunet"] + "/imagesTr/brain_004_0001.nii.gz")
    nibabel.save(fixed, folder / "imagesTr" / "brain_004_0001.nii.gz")
    plan = planning.make_plan(folders["nnunet"], depth=2, features=4)
    planning.write_plan(plan, tmp_path / "plan.json")
    with pytest.raises(SystemExit):
        cli.main(["train", "--dataset", str(folder), "--output", str(run), "--plan",
                  str(tmp_path / "plan.json"), "--depth", "2", "--epochs", "1"])
    assert "brain_003.nii.gz: labels [7] are not in dataset.json's labels" in \
        capsys.readouterr().err and not run.exists()


@pytest.mark.parametrize("change, match", [
    (lambda v: v["labels"].update(tumour=[1, 2]), "region-based labels"),
    (lambda v: v["labels"].update(ignore=3), "an 'ignore' label is not supported yet"),
    (lambda v: v.update(file_ending=".nrrd"), r"\.nrrd files are not supported yet"),
    (lambda v: v.update(labels={"background": 0, "a": 2}), "labels must be 0..N-1"),
])
def test_what_is_not_supported_is_refused_in_one_line(folders, tmp_path, change, match):
    folder = _copy(folders["nnunet"], tmp_path)
    with open(folder / "dataset.json") as file:
        values = json.load(file)
    change(values)
    with open(folder / "dataset.json", "w") as file:
        json.dump(values, file)
    with pytest.raises(ValueError, match=match):
        medical.describe(str(folder))


def test_a_short_run_on_a_two_channel_decathlon_folder_learns_and_predicts_on_each_grid(
        folders, tmp_path, capsys):
    """Trained on cases resampled to 4 x 4 x 4.75 mm, scored on their own grids
    (3.5-5 mm, one rotated), above Otsu's thresholds of the channel mean, which the
    contrast-reversed second channel hides the tissues from."""
    run = tmp_path / "run"
    cache = tmp_path / "cache"
    argv = ["train", "--dataset", folders["decathlon"], "--output", str(run),
            "--depth", "2", "--features", "8", "--tile", "24", "--epochs", "6",
            "--steps-per-epoch", "12", "--batch-size", "2", "--learning-rate", "0.01",
            "--val-fraction", "0.34", "--cache", str(cache), "--verbose", "0"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "cases resampled to 4 x 4 x 4.75 (median); scored on their own grids" in out
    with open(run / "summary.json") as file:
        summary = json.load(file)
    held_out = {case["case"]: case for case in summary["cases"]}
    assert len(held_out) == 2
    spacings = {name: medical_cases.BRAIN_CASES[name][0] for name in held_out}
    for name, case in held_out.items():  # HD95 and NSD in each case's own spacing
        assert case["spacing"] == pytest.approx(list(spacings[name]))
    with open(run / "result.json") as file:
        result = json.load(file)
    scores = result["evaluation"] if "evaluation" in result else result
    model, otsu = scores["model"], scores["otsu"]
    assert model["dice"] > otsu["dice"] + 0.1, (model, otsu)
    assert planning.read_plan(run / "plan.json")["spacing"]["target"] == pytest.approx(
        NNUNET_BRAIN_TARGET)
    assert len([name for name in os.listdir(cache) if name.endswith(".pair.npz")]) == 6

    # evaluate scores the same cases on their own grids
    (tmp_path / "eval").mkdir()
    assert cli.main(["evaluate", str(run), "--json", "--output", str(tmp_path / "eval")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["model"]["dice"] == pytest.approx(model["dice"], abs=1e-6)

    # predict a Decathlon test case (4D) and the same case as nnU-Net channel files
    for source, name in ((folders["decathlon"], "dec"), (folders["nnunet"], "nn")):
        output = tmp_path / name
        assert cli.main(["predict", os.path.join(source, "imagesTs"), "--run", str(run),
                         "--output", str(output)]) == 0
        written = nibabel.load(output / "brain_900.nii.gz")
        reference = nibabel.load(os.path.join(source, "imagesTs", "brain_900.nii.gz"
                                              if name == "dec" else "brain_900_0000.nii.gz"))
        assert not np.allclose(reference.affine[:3, :3], np.diag(np.diag(
            reference.affine[:3, :3])))  # the rotated case
        assert written.shape == reference.shape[:3]
        np.testing.assert_allclose(written.affine, reference.affine, atol=1e-6)
        assert int(written.header["qform_code"]) == int(reference.header["qform_code"]) == 1
        assert int(written.header["sform_code"]) == int(reference.header["sform_code"]) == 1
        assert written.get_data_dtype() == np.uint8
        labels = np.asarray(written.dataobj)
        assert set(np.unique(labels)) <= {0, 1, 2} and labels.any()
    np.testing.assert_array_equal(
        np.asarray(nibabel.load(tmp_path / "dec" / "brain_900.nii.gz").dataobj),
        np.asarray(nibabel.load(tmp_path / "nn" / "brain_900.nii.gz").dataobj))
    capsys.readouterr()

    # another normalisation is another plan: the cached cases are not reused
    other = tmp_path / "other"
    assert cli.main(["train", "--dataset", folders["decathlon"], "--output", str(other),
                     "--depth", "2", "--features", "4", "--tile", "24", "--epochs", "1",
                     "--steps-per-epoch", "1", "--batch-size", "2", "--val-fraction",
                     "0.34", "--cache", str(cache), "--normalization", "percentile",
                     "--verbose", "0"]) == 0
    assert "6 stale entries removed (their files or the plan changed)" in capsys.readouterr().out


def test_an_nnunet_folder_trains_with_a_plan_from_the_plan_command(folders, tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    assert cli.main(["plan", folders["nnunet"], "--output", str(plan_path), "--depth", "2",
                     "--features", "4", "--spacing", "5,5,5"]) == 0
    assert "target spacing: 5 x 5 x 5 (given)" in capsys.readouterr().out
    run = tmp_path / "run"
    argv = ["train", "--dataset", folders["nnunet"], "--output", str(run), "--plan",
            str(plan_path), "--depth", "2", "--features", "4", "--tile", "16", "--epochs",
            "1", "--steps-per-epoch", "2", "--batch-size", "2", "--verbose", "0"]
    assert cli.main(argv) == 0
    with open(plan_path) as file, open(run / "plan.json") as recorded:
        assert json.load(file) == json.load(recorded)
    with open(run / "summary.csv") as file:
        rows = list(csv.DictReader(file))
    assert rows and {row["case"] for row in rows} <= set(medical_cases.BRAIN_CASES)
    # --overwrite with another spacing plans again (the old run's plan is not reused)
    again = list(argv)
    again[again.index("--plan"):again.index("--plan") + 2] = ["--spacing", "6,6,6"]
    assert cli.main(again + ["--overwrite"]) == 0
    assert planning.read_plan(run / "plan.json")["spacing"]["target"] == [6.0, 6.0, 6.0]
    with pytest.raises(SystemExit):
        cli.main(argv[:-2] + ["--spacing", "2,2,2", "--output", str(tmp_path / "r2"),
                              "--verbose", "0"])
    assert "a plan fixes the spacing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--dataset", "nuclei", "--output", str(tmp_path / "r3"),
                  "--spacing", "auto"])
    assert "spacing applies to Decathlon and nnU-Net folders" in capsys.readouterr().err


def test_a_stray_test_file_blocks_neither_training_nor_the_listing(folders, tmp_path):
    folder = _copy(folders["nnunet"], tmp_path)
    shutil.copy(folder / "imagesTr" / "brain_000_0000.nii.gz", folder / "imagesTs" /
                "preview.nii.gz")
    described = medical.describe(str(folder))
    assert len(described.cases) == 6  # the training cases, as before
    plan = planning.make_plan(str(folder), depth=2, features=4)
    from attunet_keras import inference

    with pytest.raises(ValueError, match=r"preview.nii.gz: not CASE_XXXX.nii.gz"):
        inference.medical_cases(str(folder / "imagesTs"), plan)


def test_a_2d_nnunet_folder_of_rgb_pngs(tmp_path):
    """nnU-Net's natural images: one RGB PNG holds the three channels; an older
    dataset.json names them under "modality"; pixels are used as stored."""
    from PIL import Image

    root = tmp_path / "Dataset120_Rgb"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        image = (rng.random((20, 24, 3)) * 255).astype("uint8")
        Image.fromarray(image).save(root / "imagesTr" / f"road_{index:03d}_0000.png")
        labels = (image[..., 0] > 128).astype("uint8")
        Image.fromarray(labels).save(root / "labelsTr" / f"road_{index:03d}.png")
    with open(root / "dataset.json", "w") as file:
        json.dump({"modality": {"0": "R", "1": "G", "2": "B"},
                   "labels": {"background": 0, "road": 1}, "numTraining": 3,
                   "file_ending": ".png"}, file)
    folder = medical.describe(str(root))
    assert folder.dims == 2 and folder.n_label == 1 and folder.channels == ("R", "G", "B")
    image, labels, geometry = medical.read_case(folder.cases[0])
    assert image.shape == (20, 24, 3) and labels.shape == (20, 24)
    assert medical.problems(str(root))[1] == []
    plan = planning.make_plan(str(root), normalization="rgb_to_0_1", depth=2, features=4)
    assert plan["spacing"]["target"] is None and plan["dims"] == 2
    dataset = data.medical_folder(str(root), plan, tile=16, val_fraction=0.34)
    prepared, mask = dataset.read(dataset.train[0])
    assert prepared.max() <= 1.0 and prepared.shape == (20, 24, 3)
    with pytest.raises(ValueError, match=r"cases are 2D images, used pixel for pixel"):
        planning.make_plan(str(root), spacing="0.5,0.5")
