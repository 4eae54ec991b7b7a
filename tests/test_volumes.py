"""NIfTI volumes: folder datasets, 3D patches, training att_unet_3d, predicting into
NIfTI with the input's affine, HD95 in the voxel spacing's units, and the checks."""

import json
import os
import re
import subprocess
import sys

import keras
import nibabel
import numpy as np
import pytest

from attunet_keras import cli
from attunet_keras import data
from attunet_keras import evaluation
from attunet_keras import training

# A voxel grid of 1 x 1 x 2 mm, rotated 90 degrees about z and moved: an affine that
# a lost or transposed header would not reproduce.
AFFINE = np.array([[0.0, -1.0, 0.0, 40.0],
                   [1.0, 0.0, 0.0, -12.5],
                   [0.0, 0.0, 2.0, 7.0],
                   [0.0, 0.0, 0.0, 1.0]])


def _sphere(size, centre, radius):
    grid = np.indices(size).astype("float32")
    distance = np.sqrt(sum((axis - c) ** 2 for axis, c in zip(grid, centre)))
    return (distance < radius).astype("uint8")


def _save(path, array, affine=AFFINE):
    nibabel.save(nibabel.Nifti1Image(array, affine), str(path))


def _volume_folder(root, count=5, size=(16, 16, 16), affine=AFFINE):
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        mask = _sphere(size, rng.uniform(5, 11, 3), rng.uniform(3, 5))
        image = (rng.normal(100, 10, size) + 80 * mask).astype("float32")
        _save(root / "images" / f"vol{index}.nii.gz", image, affine)
        _save(root / "masks" / f"vol{index}.nii.gz", mask, affine)
    return root


def test_a_folder_of_volumes_is_a_3d_dataset_with_3d_patches(tmp_path):
    root = _volume_folder(tmp_path / "set")
    dataset = data.folder(str(root), 1, tile=8, val_files=["vol0.nii.gz"])
    assert dataset.dims == 3 and dataset.tile_shape == (8, 8, 8)
    assert dataset.items[0].shape == (16, 16, 16) and dataset.items[0].spacing == (1, 1, 2)
    assert dataset.patches_per_epoch() == 4 * 8  # 16^3 / 8^3 patches from 4 volumes
    assert any("5 volume(s) with anisotropic voxels" in note for note in dataset.notes)
    image, mask = dataset.read(0)
    assert image.shape == (16, 16, 16, 1) and mask.shape == (16, 16, 16)
    assert 0.0 <= image.min() and image.max() <= 1.0
    images, targets = next(iter(data.training_dataset(dataset, 3, foreground_fraction=1.0)))
    assert images.shape == (3, 8, 8, 8, 1) and targets.shape == (3, 8, 8, 8, 1)
    # patches centred on the sphere, flipped with their masks: the mask is the bright part
    assert all(target.max() == 1.0 for target in targets.numpy())
    bright = images.numpy()[..., 0] > 0.5
    assert np.mean(bright == (targets.numpy()[..., 0] > 0.5)) > 0.95
    tiles = [x.numpy() for x, _ in data.validation_dataset(
        dataset, 4, data_format="channels_first")]
    assert np.concatenate(tiles).shape == (8, 1, 8, 8, 8)


def test_a_volume_whose_mask_has_another_affine_or_shape_is_refused(tmp_path):
    root = _volume_folder(tmp_path / "set", count=3)
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0
    _save(root / "masks" / "vol1.nii.gz", _sphere((16, 16, 16), (8, 8, 8), 4), shifted)
    _save(root / "masks" / "vol2.nii.gz", np.zeros((16, 16, 8), "uint8"))
    with pytest.raises(ValueError, match=r"2 problem\(s\) \(attunet-keras check-data") as error:
        data.folder(str(root), 1, tile=8)
    message = str(error.value)
    assert f"{root / 'images' / 'vol1.nii.gz'} and {root / 'masks' / 'vol1.nii.gz'} have " \
           "different affines" in message
    assert "vol2.nii.gz is 16x16x16 but" in message and "vol2.nii.gz is 16x16x8" in message


def test_check_data_names_volume_problems_and_notes_anisotropy(tmp_path, capsys):
    root = _volume_folder(tmp_path / "set", count=3)
    shifted = AFFINE.copy()
    shifted[2, 3] += 1.0
    _save(root / "masks" / "vol1.nii.gz", _sphere((16, 16, 16), (8, 8, 8), 4), shifted)
    _save(root / "masks" / "vol2.nii.gz", np.full((16, 16, 16), 3, "uint8"))
    assert cli.main(["check-data", str(root), "--n-label", "2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert sum("anisotropic voxels (1 x 1 x 2; the coarsest axis is 2.0x the finest)"
               in line for line in lines) == 3
    assert any("vol1.nii.gz have different affines" in line for line in lines)
    assert any("vol2.nii.gz: labels [3] are outside 0..1" in line for line in lines)
    assert lines[-1] == f"2 problem(s) in {root} (3 pair(s) read)."


def test_hd95_of_volumes_is_in_the_spacing_s_units(tmp_path):
    """A model that returns its input, given each mask moved one voxel along the third
    axis as the image: HD95 is one voxel, 2.0 in the 2 mm spacing of that axis."""
    root = tmp_path / "set"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for index in range(2):
        mask = np.zeros((16, 16, 16), "uint8")
        mask[4:12, 4:12, 4:10] = 1
        _save(root / "masks" / f"v{index}.nii.gz", mask)
        _save(root / "images" / f"v{index}.nii.gz", np.roll(mask, 1, axis=2).astype("float32"))
    dataset = data.folder(str(root), 1, tile=16, val_files=["v1.nii.gz"])
    inputs = keras.Input((16, 16, 16, 1))
    identity = keras.layers.Conv3D(1, 1, use_bias=False)
    model = keras.Model(inputs, identity(inputs))
    identity.set_weights([np.ones((1, 1, 1, 1, 1), "float32")])
    config = training.TrainConfig(dataset=str(root), n_label=1, batch_size=2)
    scores = evaluation.evaluate_model(model, dataset, config)["model"]
    assert scores["hd95"] == pytest.approx(2.0)
    assert scores["dice"] == pytest.approx(2 * 8 * 8 * 5 / (2 * 8 * 8 * 6))


def test_train_a_3d_model_on_nifti_and_predict_into_nifti_with_the_affine(tmp_path):
    """The command line end to end: train picks att_unet_3d from the files, and predict
    writes uint8 labels that keep the input's affine, spacing and orientation codes."""
    root = _volume_folder(tmp_path / "set", count=4)
    script = os.path.join(os.path.dirname(sys.executable), "attunet-keras")
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    trained = subprocess.run(
        [script, "train", "--dataset", str(root), "--n-label", "1", "--output",
         str(tmp_path / "run"), "--tile", "16", "--depth", "2", "--features", "4",
         "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--verbose", "0"],
        capture_output=True, text=True, timeout=600, env=environment)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "3 training and 1 held-out images, 3 random 16x16x16 patches" in trained.stdout
    assert "hd95" in trained.stdout
    model = keras.saving.load_model(tmp_path / "run" / "best.keras")
    assert len(model.inputs[0].shape) == 5  # att_unet_3d

    source = nibabel.load(str(root / "images" / "vol2.nii.gz"))
    predicted = subprocess.run(
        [script, "predict", str(root / "images" / "vol2.nii.gz"), "--run",
         str(tmp_path / "run"), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=environment)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    written = nibabel.load(str(tmp_path / "out" / "vol2_mask.nii.gz"))
    labels = np.asarray(written.dataobj)
    assert labels.dtype == np.uint8 and labels.shape == source.shape
    assert set(np.unique(labels)) <= {0, 1}
    np.testing.assert_array_equal(written.affine, source.affine)
    assert written.header.get_zooms() == source.header.get_zooms()
    assert written.header["qform_code"] == source.header["qform_code"]
    assert written.header["sform_code"] == source.header["sform_code"]
    assert [name for name in os.listdir(tmp_path / "out")] == ["vol2_mask.nii.gz"]


def test_predict_refuses_a_volume_for_a_2d_model_before_writing(tmp_path, capsys):
    from attunet_keras import models

    path = tmp_path / "flat.keras"
    models.att_unet(16, 16, 1, depth=2, features=4).save(path)
    root = _volume_folder(tmp_path / "set", count=1)
    with pytest.raises(SystemExit):
        cli.main(["predict", str(root / "images" / "vol0.nii.gz"), "--model", str(path),
                  "--output", str(tmp_path / "out")])
    assert "a 2D model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_runs_on_brain3d(tmp_path, capsys):
    assert cli.main(["train", "--dataset", "brain3d", "--output", str(tmp_path / "run"),
                     "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "1",
                     "--depth", "2", "--features", "4", "--verbose", "0"]) == 0
    out = capsys.readouterr().out
    assert "Dataset brain3d: 5 training and 4 held-out images" in out
    assert "Model att_unet_3d depth=2" in out
    assert training.read_config(str(tmp_path / "run")).dataset == "brain3d"
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["held_out_images"] == 4
    assert {"dice_grey_matter", "dice_white_matter", "hd95"} <= set(result["model"])


def test_attention_on_a_volume_writes_the_gates_as_nifti_on_their_grids(tmp_path, capsys):
    from attunet_keras import models

    path = tmp_path / "volume.keras"
    models.att_unet_3d(None, None, None, 1, depth=2, features=4,
                       data_format="channels_last").save(path)
    root = _volume_folder(tmp_path / "set", count=1)
    figure = tmp_path / "gates.png"
    assert cli.main(["attention", str(root / "images" / "vol0.nii.gz"), "--model",
                     str(path), "--output", str(figure)]) == 0
    assert figure.read_bytes()[:4] == b"\x89PNG"
    gates = sorted(name for name in os.listdir(tmp_path) if name.endswith(".nii.gz"))
    assert len(gates) == 2  # depth 2: two gates
    factors = []
    for name in gates:
        gate = nibabel.load(str(tmp_path / name))
        values = np.asarray(gate.dataobj)
        # the gate of decoder level k lies on the grid of that level's skip: 2**(k-1)
        factor = 2 ** (int(re.search(r"dec(\d)", name).group(1)) - 1)
        factors.append(factor)
        assert values.shape == (16 // factor,) * 3
        assert 0.0 <= values.min() and values.max() <= 1.0
        # a gate voxel spans `factor` input voxels: its spacing is factor x the input's
        assert gate.header.get_zooms() == pytest.approx((factor, factor, 2 * factor))
        # the first gate voxel's centre is the centre of the input voxels it covers
        centre = AFFINE @ np.array([(factor - 1) / 2] * 3 + [1.0])
        np.testing.assert_allclose(gate.affine @ np.array([0, 0, 0, 1.0]), centre)
    # the gates of levels 1 and 2 lie on the grids of the skips they gate
    assert sorted(factors) == [1, 2]
