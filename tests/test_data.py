"""Tests of attunet_keras.data: built-in datasets, folder datasets, tf.data pipelines."""

import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from attunet_keras import data


@pytest.fixture(scope="module")
def nuclei_files():
    """The image and mask read straight from the stardist wheel, not by attunet_keras."""
    import importlib.util

    root = importlib.util.find_spec("stardist").submodule_search_locations[0]
    folder = os.path.join(root, "data", "images")
    return (tifffile.imread(os.path.join(folder, "img2d.tif")),
            tifffile.imread(os.path.join(folder, "mask2d.tif")))


@pytest.fixture(scope="module")
def nuclei_64():
    return data.nuclei(tile=64, stride=64)


def test_nuclei_is_the_512x512_data_science_bowl_image(nuclei_files):
    image, mask = nuclei_files
    # stardist's example: a 512x512 fluorescence image and its instance labels.
    assert image.shape == mask.shape == (512, 512)
    assert mask.max() > 100  # an instance mask with over a hundred nuclei


def test_nuclei_held_out_tiles_are_the_right_quarter(nuclei_64, nuclei_files):
    _, mask = nuclei_files
    assert nuclei_64.n_label == 1 and nuclei_64.in_channels == 1
    assert len(nuclei_64.val) == (512 // 64) * (128 // 64)
    assert len(nuclei_64.train) == (512 // 64) * (384 // 64)
    held_out = np.concatenate(
        [np.concatenate(list(nuclei_64.val.masks[row * 2:row * 2 + 2]), axis=1)
         for row in range(8)], axis=0)
    np.testing.assert_array_equal(held_out, (mask[:, 384:] > 0).astype("uint8"))


def test_nuclei_training_tiles_never_touch_the_held_out_quarter(nuclei_files):
    image, _ = nuclei_files
    dataset = data.nuclei(tile=128, stride=32)
    normalized = data.normalize(image)
    left = normalized[:, :384]
    for tile in dataset.train.images[::7]:
        found = any(
            np.array_equal(tile, left[y:y + 128, x:x + 128])
            for y in range(0, 512 - 127, 32) for x in range(0, 384 - 127, 32)
        )
        assert found
    example_name, example_image, example_mask = dataset.examples[0]
    assert example_image.shape[:2] == example_mask.shape == (512, 128)


@pytest.mark.parametrize("tile", [256, 96])
def test_nuclei_refuses_tiles_that_do_not_divide_the_held_out_quarter(tile):
    with pytest.raises(ValueError, match=f"tile={tile} does not divide 128"):
        data.nuclei(tile=tile)


def test_split_blocks_holds_out_whole_blocks_with_guards():
    slices = np.arange(10, 90)
    train, val = data.split_blocks(slices, block=8, val_every=4, guard=2)
    assert len(val) > 0 and len(train) > 0
    assert not set(train) & set(val)
    assert min(abs(t - v) for t in train for v in val) > 2
    # held-out slices come in runs of 8 neighbours
    runs = np.split(val, np.flatnonzero(np.diff(val) > 1) + 1)
    assert all(len(run) == 8 for run in runs)


def test_brain_has_three_classes_and_disjoint_splits():
    dataset = data.brain()
    assert dataset.n_label == 3
    assert dataset.class_names == ("background", "grey_matter", "white_matter")
    height, width = dataset.tile_shape
    assert height % 16 == 0 and width % 16 == 0
    for split in (dataset.train, dataset.val):
        assert set(np.unique(split.masks)) == {0, 1, 2}
    train_images = {tile.tobytes() for tile in dataset.train.images}
    assert not any(tile.tobytes() in train_images for tile in dataset.val.images)
    # The template: white matter is brighter than grey matter in T1.
    images, masks = dataset.train.images[..., 0], dataset.train.masks
    assert images[masks == 2].mean() > images[masks == 1].mean() > images[masks == 0].mean()


def test_package_file_explains_how_to_install_a_missing_wheel():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no_such_pkg_x"):
        data.package_file("no_such_pkg_x", "data/file.tif")


# -------------------------------------------------------------------- folder data


def _write_pair(root, stem, image, mask, image_ext=".png", mask_ext=".png"):
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "masks"), exist_ok=True)
    for sub, array, ext in (("images", image, image_ext), ("masks", mask, mask_ext)):
        path = os.path.join(root, sub, stem + ext)
        if ext in (".tif", ".tiff"):
            tifffile.imwrite(path, array)
        else:
            Image.fromarray(array).save(path)


def _random_pair(size=(64, 64), n_label=2, seed=0):
    rng = np.random.default_rng(seed)
    image = (rng.random(size) * 255).astype("uint8")
    mask = rng.integers(0, n_label, size).astype("uint8")
    return image, mask


def test_folder_dataset_reads_pairs_and_holds_out_whole_files(tmp_path):
    for index in range(5):
        image, mask = _random_pair(seed=index, n_label=3)
        _write_pair(tmp_path, f"img{index}", image, mask,
                    image_ext=".tif" if index % 2 else ".png")
    dataset = data.folder(str(tmp_path), n_label=3, tile=32, val_fraction=0.2)
    assert dataset.n_label == 3 and dataset.in_channels == 1
    assert len(dataset.val) == 4          # one 64x64 file, 4 tiles of 32
    assert len(dataset.train) == 4 * 9    # four files, tiles every 16 pixels
    assert len(dataset.examples) == 1
    assert dataset.val.images.min() >= 0 and dataset.val.images.max() <= 1


def test_folder_dataset_resizes_when_asked(tmp_path):
    for index in range(3):
        image, mask = _random_pair(size=(50, 70), seed=index)
        _write_pair(tmp_path, f"img{index}", image, mask * 255)
    dataset = data.folder(str(tmp_path), n_label=1, tile=32, fit="resize")
    assert dataset.train.images.shape[1:] == (32, 32, 1)
    assert set(np.unique(dataset.train.masks)) <= {0, 1}


@pytest.mark.parametrize(
    "setup, match",
    [
        ("missing_mask", r"images without a mask: b\.png"),
        ("missing_image", r"masks without an image: c\.png"),
        ("size_mismatch", r"a\.png is 64x64 but .*a\.png is 32x32"),
        ("unreadable", r"a\.png: cannot be read as an image"),
        ("label_too_large", r"a\.png: labels \[5\] are outside 0\.\.2"),
        ("one_pair", r"found 1 image/mask pair\(s\); at least 2"),
        ("no_masks_folder", r"no masks/ folder"),
        ("smaller_than_tile", r"a\.png: image 64x64 is smaller than the tile 128x128"),
    ],
)
def test_folder_dataset_names_the_file_at_fault(tmp_path, setup, match):
    image, mask = _random_pair()
    _write_pair(tmp_path, "a", image, mask)
    _write_pair(tmp_path, "z", image, mask)
    tile = 32
    if setup == "missing_mask":
        Image.fromarray(image).save(tmp_path / "images" / "b.png")
    elif setup == "missing_image":
        Image.fromarray(mask).save(tmp_path / "masks" / "c.png")
    elif setup == "size_mismatch":
        Image.fromarray(mask[:32, :32]).save(tmp_path / "masks" / "a.png")
    elif setup == "unreadable":
        (tmp_path / "images" / "a.png").write_bytes(b"not a png")
    elif setup == "label_too_large":
        bad = mask.copy()
        bad[0, 0] = 5
        Image.fromarray(bad).save(tmp_path / "masks" / "a.png")
    elif setup == "one_pair":
        os.remove(tmp_path / "images" / "z.png")
        os.remove(tmp_path / "masks" / "z.png")
    elif setup == "no_masks_folder":
        for name in os.listdir(tmp_path / "masks"):
            os.remove(tmp_path / "masks" / name)
        os.rmdir(tmp_path / "masks")
    elif setup == "smaller_than_tile":
        tile = 128
    error = FileNotFoundError if setup == "no_masks_folder" else ValueError
    with pytest.raises(error, match=match):
        data.folder(str(tmp_path), n_label=3, tile=tile)


def test_binary_folder_masks_must_be_0_1_or_0_255(tmp_path):
    image, mask = _random_pair(n_label=3)
    _write_pair(tmp_path, "a", image, mask)
    _write_pair(tmp_path, "b", image, mask)
    with pytest.raises(ValueError, match=r"binary mask \(n_label=1\) holds 0/1 or 0/255"):
        data.folder(str(tmp_path), n_label=1, tile=32)


# ------------------------------------------------------------------------ tf.data


def _threshold_split(count=6, size=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((count, size, size, 1)).astype("float32")
    masks = (images[..., 0] > 0.5).astype("uint8")
    return data.Split(images, masks)


def test_augmentation_moves_image_and_mask_together():
    split = _threshold_split()
    dataset = data.make_dataset(split, 1, 3, training=True, seed=3)
    moved = False
    for images, targets in dataset.take(8):
        images, targets = images.numpy(), targets.numpy()
        np.testing.assert_array_equal(targets, (images > 0.5).astype("float32"))
        moved |= not any(np.array_equal(images[0], tile) for tile in split.images)
    assert moved  # some tiles were flipped or rotated


def test_training_pipeline_is_seeded():
    split = _threshold_split()

    def first_batches(seed):
        return [images.numpy() for images, _ in data.make_dataset(
            split, 1, 2, training=True, seed=seed).take(3)]

    same = zip(first_batches(5), first_batches(5))
    assert all(np.array_equal(a, b) for a, b in same)
    assert not all(np.array_equal(a, b) for a, b in zip(first_batches(5), first_batches(6)))


def test_pipeline_layouts_and_one_hot_targets():
    split = data.Split(np.zeros((4, 16, 32, 2), "float32"),
                       np.tile(np.array([0, 1, 2, 1], "uint8"), (4, 16, 8)))
    images, targets = next(iter(data.make_dataset(
        split, 3, 4, training=False, data_format="channels_first")))
    assert images.shape == (4, 2, 16, 32)
    assert targets.shape == (4, 3, 16, 32)
    np.testing.assert_array_equal(targets.numpy().sum(axis=1), 1.0)
    np.testing.assert_array_equal(targets.numpy()[0, :, 0, :4], np.eye(3)[[0, 1, 2, 1]].T)


def test_normalize_maps_percentiles_to_unit_range():
    image = np.linspace(0, 1000, 10000).reshape(100, 100)
    normalized = data.normalize(image)
    assert normalized.shape == (100, 100, 1) and normalized.dtype == np.float32
    assert normalized.min() == 0.0 and normalized.max() == 1.0
    assert abs(float(np.median(normalized)) - 0.5) < 0.01


def _pair_folder(root, image, mask, name="a"):
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(root / "images" / f"{name}.tif", image)
    tifffile.imwrite(root / "masks" / f"{name}.tif", mask)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_pixels_are_refused_naming_the_file(tmp_path, bad):
    image = np.random.default_rng(0).random((32, 32)).astype("float32")
    image[3, 4] = bad
    mask = np.zeros((32, 32), "uint8")
    _pair_folder(tmp_path, image, mask, "bad")
    _pair_folder(tmp_path, np.full((32, 32), 0.5, "float32"), mask, "good")
    with pytest.raises(ValueError, match=r"bad.tif: 1 pixel\(s\) are NaN or infinite"):
        data.folder(str(tmp_path), 1, tile=32)


def test_float_masks_are_refused_naming_the_file(tmp_path):
    image = np.random.default_rng(0).random((32, 32)).astype("float32")
    mask = np.full((32, 32), 0.7, "float32")
    _pair_folder(tmp_path, image, mask, "a")
    _pair_folder(tmp_path, image, np.zeros((32, 32), "uint8"), "b")
    with pytest.raises(ValueError, match=r"a.tif: masks must be integer label images; this "
                                         r"one is float32"):
        data.folder(str(tmp_path), 1, tile=32)


# ------------------------------------------------------------------ check-data


def _bad_folder(root):
    """A folder with one of each problem check-data must report, and two good pairs."""
    image, mask = _random_pair(n_label=3)
    _write_pair(root, "good", image, mask)
    _write_pair(root, "good_too", image, mask, image_ext=".tif", mask_ext=".tif")
    _write_pair(root, "no_mask", image, mask)
    os.remove(os.path.join(root, "masks", "no_mask.png"))
    _write_pair(root, "no_image", image, mask)
    os.remove(os.path.join(root, "images", "no_image.png"))
    _write_pair(root, "garbage", image, mask)
    with open(os.path.join(root, "images", "garbage.png"), "wb") as file:
        file.write(b"not a png at all")
    _write_pair(root, "truncated", image, mask)
    path = os.path.join(root, "images", "truncated.png")
    with open(path, "rb") as file:
        whole = file.read()
    with open(path, "wb") as file:
        file.write(whole[: len(whole) // 2])
    _write_pair(root, "smaller_mask", image, mask[:32, :40])
    _write_pair(root, "labels", image, (mask + 3).astype("uint8"))  # 3..5 for n_label=3
    nan_image = image.astype("float32")
    nan_image[5, 5] = np.nan
    _write_pair(root, "nan", nan_image, mask, image_ext=".tif")
    _write_pair(root, "rgb_mask", image, np.stack([mask, mask * 0, mask], axis=-1))
    _write_pair(root, "float_mask", image, mask.astype("float32"), mask_ext=".tif")
    _write_pair(root, "color", np.stack([image] * 3, axis=-1), mask)
    tifffile.imwrite(os.path.join(root, "images", "good.tif"), image)  # a second "good"
    return {
        "images/good.tif": "shares the stem 'good' with good.png",
        "images/no_mask.png": "image without a mask",
        "masks/no_image.png": "mask without an image",
        "images/garbage.png": "cannot be read as an image",
        "images/truncated.png": "cannot be read as an image",
        "images/smaller_mask.png": "is 64x64 but",
        "masks/labels.png": "labels [3, 4, 5] are outside 0..2",
        "images/nan.tif": "1 pixel(s) are NaN or infinite",
        "masks/rgb_mask.png": "3 different channels (an RGB mask?)",
        "masks/float_mask.tif": "masks must be integer label images",
        "images/color.png": "different channel counts",
    }


def test_check_data_lists_every_problem_of_a_folder_at_once(tmp_path, capsys):
    from attunet_keras import cli

    expected = _bad_folder(str(tmp_path))
    status = cli.main(["check-data", str(tmp_path), "--n-label", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert status == 1
    for file, reason in expected.items():
        assert any(os.path.join(str(tmp_path), file) in line and reason in line
                   for line in lines), (file, reason, lines)
    assert lines[-1] == f"{len(expected)} problem(s) in {tmp_path} (10 pair(s) read)."
    # the good pairs are read without a problem; only the extra good.tif is named
    assert [line for line in lines[:-1] if "good" in line] == [
        f"{os.path.join(str(tmp_path), 'images', 'good.tif')}: shares the stem 'good' with "
        "good.png; rename one."]


def test_check_data_passes_a_good_folder_and_names_a_missing_one(tmp_path, capsys):
    from attunet_keras import cli

    image, mask = _random_pair(n_label=2)
    for stem in ("a", "b", "c"):
        _write_pair(str(tmp_path / "good"), stem, image, mask)
    assert cli.main(["check-data", str(tmp_path / "good"), "--n-label", "2"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"{tmp_path / 'good'}: 3 pair(s) read, no problems (n_label=2).")
    # the labels are 0/1: binary (n_label=1) passes too
    assert cli.main(["check-data", str(tmp_path / "good"), "--n-label", "1"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["check-data", str(tmp_path / "missing"), "--n-label", "2"])
    assert exit_info.value.code == 2
