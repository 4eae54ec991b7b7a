"""Tests of attunet_keras.data: built-in datasets, folder datasets, tf.data pipelines."""

import os
import re

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
    return data.nuclei(tile=64)


def test_nuclei_is_the_512x512_data_science_bowl_image(nuclei_files):
    image, mask = nuclei_files
    # stardist's example: a 512x512 fluorescence image and its instance labels.
    assert image.shape == mask.shape == (512, 512)
    assert mask.max() > 100  # an instance mask with over a hundred nuclei


def test_nuclei_holds_out_the_right_quarter_whole(nuclei_64, nuclei_files):
    image, mask = nuclei_files
    assert nuclei_64.n_label == 1 and nuclei_64.in_channels == 1
    assert [nuclei_64.items[i].name for i in nuclei_64.train] == ["nuclei_train"]
    assert nuclei_64.val_names == ["nuclei_held_out"]
    name, held_out_image, held_out_mask = nuclei_64.examples[0]
    np.testing.assert_array_equal(held_out_mask, (mask[:, 384:] > 0).astype("uint8"))
    train_image, train_mask = nuclei_64.read(nuclei_64.train[0])
    # the training item is the left three quarters, normalised over the whole image
    np.testing.assert_array_equal(train_image, data.normalize(image)[:, :384])
    np.testing.assert_array_equal(train_mask, (mask[:, :384] > 0).astype("uint8"))
    assert nuclei_64.patches_per_epoch() == 512 * 384 // 64**2


def test_held_out_tiles_cover_the_held_out_image_once(nuclei_64, nuclei_files):
    _, mask = nuclei_files
    tiles = np.concatenate([targets.numpy()[..., 0] for _, targets in
                            data.validation_dataset(nuclei_64, 5)])
    assert len(tiles) == (512 // 64) * (128 // 64)
    rows = [np.concatenate(list(tiles[row * 2:row * 2 + 2]), axis=1) for row in range(8)]
    np.testing.assert_array_equal(np.concatenate(rows), (mask[:, 384:] > 0))


def test_grid_tiles_pad_by_reflection_to_whole_tiles():
    image = np.arange(5 * 7, dtype="float32").reshape(5, 7, 1)
    mask = (image[..., 0] % 3).astype("uint8")
    images, masks = data.grid_tiles(image, mask, (4, 4))
    assert images.shape == (4, 4, 4, 1) and masks.shape == (4, 4, 4)
    top_left, bottom_right = images[0, ..., 0], images[3, ..., 0]
    np.testing.assert_array_equal(top_left, image[:4, :4, 0])
    # rows 4..7 of the padded image are rows 4, 3, 2, 1 (reflection about row 4)
    np.testing.assert_array_equal(bottom_right[:, 0], image[[4, 3, 2, 1], 4, 0])
    np.testing.assert_array_equal(masks[3], (bottom_right % 3).astype("uint8"))


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
    assert not set(dataset.train) & set(dataset.val)
    pairs = [dataset.read(index) for index in dataset.train[::10]]
    images = np.stack([image[..., 0] for image, _ in pairs])
    masks = np.stack([mask for _, mask in pairs])
    assert images.shape[1:] == dataset.tile_shape
    assert set(np.unique(masks)) == {0, 1, 2}
    # The template: white matter is brighter than grey matter in T1.
    assert images[masks == 2].mean() > images[masks == 1].mean() > images[masks == 0].mean()
    # one patch per slice: the slice is the model's input
    assert dataset.patches_per_epoch() == len(dataset.train)


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


def test_folder_dataset_indexes_pairs_and_holds_out_whole_files(tmp_path):
    for index in range(5):
        image, mask = _random_pair(seed=index, n_label=3)
        _write_pair(tmp_path, f"img{index}", image, mask,
                    image_ext=".tif" if index % 2 else ".png")
    dataset = data.folder(str(tmp_path), n_label=3, tile=32, val_fraction=0.2)
    assert dataset.n_label == 3 and dataset.in_channels == 1
    assert len(dataset.val) == 1 and len(dataset.train) == 4
    assert dataset.patches_per_epoch() == 4 * 4  # four 64x64 files, tiles of 32
    assert len(dataset.examples) == 1
    name, image, mask = dataset.examples[0]
    assert name == dataset.val_names[0] and image.shape == (64, 64, 1)
    assert image.min() >= 0 and image.max() <= 1
    # the held-out file is a seeded draw, and a recorded list overrides it
    again = data.folder(str(tmp_path), n_label=3, tile=32, val_fraction=0.2)
    assert again.val_names == dataset.val_names
    other = data.folder(str(tmp_path), n_label=3, tile=32, val_files=["img3.tif"])
    assert other.val_names == ["img3.tif"] and len(other.train) == 4
    with pytest.raises(ValueError, match=r"held-out files \['gone.png'\] recorded"):
        data.folder(str(tmp_path), n_label=3, tile=32, val_files=["gone.png"])


def test_images_smaller_than_a_patch_are_padded_and_said_so(tmp_path):
    for index in range(3):
        image, mask = _random_pair(size=(50, 70), seed=index)
        _write_pair(tmp_path, f"img{index}", image, mask * 255)
    dataset = data.folder(str(tmp_path), n_label=1, tile=64)
    assert any("3 image(s) smaller than the 64x64 tile" in note for note in dataset.notes)
    images, targets = next(iter(data.training_dataset(dataset, 4, foreground_fraction=0)))
    assert images.shape == (4, 64, 64, 1) and targets.shape == (4, 64, 64, 1)
    # a 50x70 image in a 64x64 patch: 14 rows of zero padding (columns, once rotated)
    for image, target in zip(images.numpy()[..., 0], targets.numpy()[..., 0]):
        empty = max((image.max(axis=1) == 0).sum(), (image.max(axis=0) == 0).sum())
        assert empty == 14
        assert target[image.max(axis=1) == 0].max(initial=0) == 0
    assert set(np.unique(targets.numpy())) <= {0.0, 1.0}


@pytest.mark.parametrize(
    "setup, match",
    [
        ("missing_mask", r"images/b\.png: image without a mask"),
        ("missing_image", r"masks/c\.png: mask without an image"),
        ("size_mismatch", r"a\.png is 64x64 but .*a\.png is 32x32"),
        ("unreadable", r"a\.png: cannot be read as an image"),
        ("one_pair", r"found 1 image/mask pair\(s\); at least 2"),
        ("no_masks_folder", r"no masks/ folder"),
    ],
)
def test_folder_dataset_names_the_file_at_fault(tmp_path, setup, match):
    image, mask = _random_pair()
    _write_pair(tmp_path, "a", image, mask)
    _write_pair(tmp_path, "z", image, mask)
    if setup == "missing_mask":
        Image.fromarray(image).save(tmp_path / "images" / "b.png")
    elif setup == "missing_image":
        Image.fromarray(mask).save(tmp_path / "masks" / "c.png")
    elif setup == "size_mismatch":
        Image.fromarray(mask[:32, :32]).save(tmp_path / "masks" / "a.png")
    elif setup == "unreadable":
        (tmp_path / "images" / "a.png").write_bytes(b"not a png")
    elif setup == "one_pair":
        os.remove(tmp_path / "images" / "z.png")
        os.remove(tmp_path / "masks" / "z.png")
    elif setup == "no_masks_folder":
        for name in os.listdir(tmp_path / "masks"):
            os.remove(tmp_path / "masks" / name)
        os.rmdir(tmp_path / "masks")
    error = FileNotFoundError if setup == "no_masks_folder" else ValueError
    with pytest.raises(error, match=match):
        data.folder(str(tmp_path), n_label=3, tile=32)


def test_every_header_problem_is_listed_in_one_error(tmp_path):
    image, mask = _random_pair()
    for stem in ("a", "b", "c"):
        _write_pair(tmp_path, stem, image, mask)
    Image.fromarray(mask[:32]).save(tmp_path / "masks" / "a.png")
    (tmp_path / "images" / "c.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"2 problem\(s\) \(attunet-keras check-data") as error:
        data.folder(str(tmp_path), n_label=2, tile=32)
    assert "a.png is 64x64 but" in str(error.value)
    assert "c.png: cannot be read as an image" in str(error.value)


def test_train_lists_pairing_header_and_label_problems_in_one_error(tmp_path):
    """What check-data lists, train lists too, in one error (it used to take a run per
    kind of problem: the pairing, then the headers, then the pixels)."""
    image, mask = _random_pair()
    for stem in ("a", "b", "c", "d"):
        _write_pair(tmp_path, stem, image, mask)
    Image.fromarray(image).save(tmp_path / "images" / "lonely.png")  # no mask
    Image.fromarray(mask[:32]).save(tmp_path / "masks" / "a.png")  # other size
    Image.fromarray(np.full_like(mask, 7)).save(tmp_path / "masks" / "b.png")  # label 7
    with pytest.raises(ValueError, match=r"3 problem\(s\)") as error:
        data.folder(str(tmp_path), n_label=2, tile=32)
    text = str(error.value)
    assert "lonely.png: image without a mask" in text
    assert "a.png is 64x64 but" in text
    assert "labels [7] are outside 0..1" in text
    _, problems, _ = data.check_folder(str(tmp_path), 2)
    assert all(problem in text for problem in problems)


def _first_read_failure(dataset):
    """The reader's message that stops a pass over the training pipeline."""
    with pytest.raises(Exception) as error:
        for _ in data.training_dataset(dataset, 2).take(50):
            pass
    failure = data.read_failure(error.value)
    assert failure is not None, str(error.value)[-2000:]
    return failure


def _pair_folder(root, image, mask, name="a"):
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(root / "images" / f"{name}.tif", image)
    tifffile.imwrite(root / "masks" / f"{name}.tif", mask)


@pytest.mark.parametrize("problem, match", [
    ("labels", r"'bad.tif': .*bad.tif: labels \[5\] are outside 0\.\.2"),
    ("binary", r"'bad.tif': .*bad.tif: a binary mask \(n_label=1\) holds 0/1 or 0/255"),
    ("nan", r"'bad.tif': .*bad.tif: 1 pixel\(s\) are NaN or infinite"),
    ("float_mask", r"'bad.tif': .*bad.tif: masks must be integer label images; this one "
                   r"is float32"),
])
def test_a_file_that_fails_to_decode_stops_the_pipeline_naming_it(tmp_path, problem, match):
    image = np.random.default_rng(0).random((32, 32)).astype("float32")
    mask = np.zeros((32, 32), "uint8")
    _pair_folder(tmp_path, image, mask, "good")
    _pair_folder(tmp_path, image, mask, "good_too")
    bad_image, bad_mask, n_label = image.copy(), mask.copy(), 3
    if problem == "labels":
        bad_mask[0, 0] = 5
    elif problem == "binary":
        bad_mask[0, 0], n_label = 2, 1
    elif problem == "nan":
        bad_image[3, 4] = np.nan
    else:
        bad_mask = np.full((32, 32), 0.7, "float32")
    _pair_folder(tmp_path, bad_image, bad_mask, "bad")
    dataset = data.folder(str(tmp_path), n_label, tile=32, val_files=["good_too.tif"])
    assert re.search(match, _first_read_failure(dataset))


# ------------------------------------------------------------------------ tf.data


def _threshold_arrays(count=6, size=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((count, size, size, 1)).astype("float32")
    masks = (images[..., 0] > 0.5).astype("uint8")
    return data.from_arrays("threshold", images[:-1], masks[:-1], images[-1:], masks[-1:],
                            n_label=1), images


def test_augmentation_moves_image_and_mask_together():
    dataset, originals = _threshold_arrays()
    moved = False
    for images, targets in data.training_dataset(dataset, 3, seed=3).take(8):
        images, targets = images.numpy(), targets.numpy()
        np.testing.assert_array_equal(targets, (images > 0.5).astype("float32"))
        moved |= not any(np.array_equal(images[0], image) for image in originals)
    assert moved  # some tiles were flipped or rotated


def test_training_pipeline_is_seeded():
    dataset, _ = _threshold_arrays()

    def first_batches(seed):
        return [images.numpy() for images, _ in data.training_dataset(
            dataset, 2, seed=seed).take(3)]

    same = zip(first_batches(5), first_batches(5))
    assert all(np.array_equal(a, b) for a, b in same)
    assert not all(np.array_equal(a, b) for a, b in zip(first_batches(5), first_batches(6)))


def test_pipeline_layouts_and_one_hot_targets():
    masks = np.tile(np.array([0, 1, 2, 1], "uint8"), (4, 16, 8))
    images = np.zeros((4, 16, 32, 2), "float32")
    dataset = data.from_arrays("stripes", images[:2], masks[:2], images[2:], masks[2:], 3)
    images, targets = next(iter(data.validation_dataset(
        dataset, 4, data_format="channels_first")))
    assert images.shape == (2, 2, 16, 32)
    assert targets.shape == (2, 3, 16, 32)
    np.testing.assert_array_equal(targets.numpy().sum(axis=1), 1.0)
    np.testing.assert_array_equal(targets.numpy()[0, :, 0, :4], np.eye(3)[[0, 1, 2, 1]].T)
    images, targets = next(iter(data.training_dataset(
        dataset, 2, data_format="channels_first", outputs=2)))
    assert images.shape == (2, 2, 16, 32) and len(targets) == 2


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_foreground_fraction_centres_patches_on_labelled_pixels(fraction):
    """One 8x8 labelled square in a 256x256 image: a uniform 32x32 patch holds some of
    it with probability (32 + 8 - 1)**2 / (256 - 32 + 1)**2, about 3%; a patch centred
    on a labelled pixel always does."""
    image = np.zeros((256, 256, 1), "float32")
    mask = np.zeros((256, 256), "uint8")
    mask[200:208, 40:48] = 1
    _, masks = data.sample_patches(image, mask, (32, 32), 200, fraction,
                                   np.random.default_rng(0))
    with_foreground = (masks.reshape(200, -1).max(axis=1) > 0).mean()
    if fraction == 1.0:
        assert with_foreground == 1.0
    else:
        assert with_foreground < 0.1


def test_the_default_foreground_share_is_a_third_of_the_patches():
    image = np.zeros((512, 512, 1), "float32")
    mask = np.zeros((512, 512), "uint8")
    mask[300:302, 100:102] = 1  # too small for uniform patches to find often (~0.4%)
    _, masks = data.sample_patches(image, mask, (32, 32), 600, data.FOREGROUND_FRACTION,
                                   np.random.default_rng(1))
    share = (masks.reshape(600, -1).max(axis=1) > 0).mean()
    assert 0.28 < share < 0.40  # 0.33 + ~0.4% drawn uniformly, binomial sd 0.02


def test_the_pipeline_streams_instead_of_reading_every_file_first(tmp_path, monkeypatch):
    for index in range(60):
        image, mask = _random_pair(seed=index)
        _write_pair(tmp_path, f"img{index:02d}", image, mask)
    log = tmp_path / "reads.log"
    monkeypatch.setenv(data.pipeline.READ_LOG_ENV, str(log))
    dataset = data.folder(str(tmp_path), n_label=2, tile=32, val_fraction=0.1)
    assert not log.exists()  # indexing reads headers only
    next(iter(data.training_dataset(dataset, 2, patches_per_image=4)))
    reads = log.read_text().splitlines()
    # the patch buffer (64) needs 16 files of 4 patches, plus what is prefetched
    assert 16 <= len(reads) < 54


def test_every_epoch_reads_each_training_file_once_in_a_new_order():
    dataset, _ = _threshold_arrays(count=9)
    order = data.pipeline.file_order(dataset, seed=4, patches_per_image=3)
    stream = [(int(index), int(count)) for index, count in order.take(24)]
    assert {count for _, count in stream} == {3}
    epochs = [[index for index, _ in stream[start:start + 8]] for start in range(0, 24, 8)]
    assert all(sorted(epoch) == list(dataset.train) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1
    # a shard: every second training file, each epoch
    shard = data.pipeline.file_order(dataset, seed=4, shard=(2, 1))
    assert sorted(int(index) for index, _ in shard.take(4)) == list(dataset.train[1::2])


def test_the_cache_is_used_and_a_changed_file_is_rebuilt(tmp_path, monkeypatch):
    root, cache = tmp_path / "set", tmp_path / "cache"
    for index in range(3):
        image, mask = _random_pair(seed=index)
        _write_pair(str(root), f"img{index}", image, mask)
    dataset = data.folder(str(root), n_label=2, tile=32, cache=str(cache))
    assert "0 of 3 pairs cached" in dataset.notes[-1]
    first = [dataset.read(index) for index in range(3)]
    assert len([name for name in os.listdir(cache) if name.endswith(".pair.npz")]) == 3

    # a cached pair is not decoded again
    monkeypatch.setattr(data.files, "load_pair",
                        lambda *args, **kwargs: pytest.fail("decoded a cached pair"))
    cached = data.folder(str(root), n_label=2, tile=32, cache=str(cache))
    assert "3 of 3 pairs cached" in cached.notes[-1]
    for index in range(3):
        np.testing.assert_array_equal(cached.read(index)[0], first[index][0])
    monkeypatch.undo()

    changed = np.zeros((64, 64), "uint8")
    changed[:, 32:] = 200
    Image.fromarray(changed).save(root / "images" / "img1.png")
    os.utime(root / "images" / "img1.png", ns=(1, 1))  # also a new modification time
    rebuilt = data.folder(str(root), n_label=2, tile=32, cache=str(cache))
    assert "2 of 3 pairs cached; 1 stale entry removed" in rebuilt.notes[-1]
    image, _ = rebuilt.read(1)
    assert image[:, :32].max() == 0.0 and image[:, 32:].min() == 1.0


def test_normalize_maps_percentiles_to_unit_range():
    image = np.linspace(0, 1000, 10000).reshape(100, 100)
    normalized = data.normalize(image)
    assert normalized.shape == (100, 100, 1) and normalized.dtype == np.float32
    assert normalized.min() == 0.0 and normalized.max() == 1.0
    assert abs(float(np.median(normalized)) - 0.5) < 0.01


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


def test_brain_keeps_its_published_split():
    """The split the quality figures were measured on: 92 training slices and 32 held
    out, the share of brain counted on the unpadded slices. The in-memory `brain()`
    before the streaming pipeline (commit 7b69fb7) gave 92 and 32 tiles and named its
    middle held-out slice brain_slice_90, the start of the third of four blocks of 8
    every 32 slices."""
    dataset = data.brain()
    assert len(dataset.train) == 92 and len(dataset.val) == 32
    starts = [index for index in dataset.val if index - 1 not in dataset.val]
    assert starts == [26, 58, 90, 122]
    assert dataset.val_names[16] == "brain_slice_90"


def test_brain3d_holds_out_the_slices_brain_holds_out():
    flat, volume = data.brain(), data.brain3d()
    assert volume.dims == 3 and volume.tile_shape == (16,) + flat.tile_shape
    assert volume.n_label == 3 and volume.class_names == flat.class_names

    def slices(dataset, indices):
        covered = []
        for index in indices:
            first, last = dataset.items[index].name.split("_")[-1].split("-")
            covered += list(range(int(first), int(last) + 1))
        return covered

    assert slices(volume, volume.val) == list(flat.val)
    assert slices(volume, volume.train) == list(flat.train)
    image, mask = volume.read(volume.val[0])
    assert image.shape == (8,) + flat.tile_shape + (1,) and mask.shape == (8,) + flat.tile_shape
    # the slab's first slice is brain's slice of the same index
    flat_image, flat_mask = flat.read(flat.val[0])
    np.testing.assert_array_equal(image[0], flat_image)
    np.testing.assert_array_equal(mask[0], flat_mask)
    assert volume.items[volume.val[0]].spacing == (1.0, 2.0, 2.0)


def test_masks_keep_labels_above_255_and_n_label_is_checked_against_their_type(tmp_path):
    """A uint16 mask with labels 0, 5 and 256 (n_label 300): the label 256 used to be
    read through a uint8 cast as background, in silence."""
    image, _ = _random_pair()
    mask = np.zeros((64, 64), "uint16")
    mask[:20] = 5
    mask[40:] = 256
    for stem in ("a", "b"):
        _write_pair(tmp_path, stem, image, mask)
    assert Image.open(tmp_path / "masks" / "a.png").mode == "I;16"
    checked, problems, _ = data.check_folder(str(tmp_path), 300)
    assert (checked, problems) == (2, [])
    dataset = data.folder(str(tmp_path), n_label=300, tile=32)
    labels = dataset.read(0)[1]
    assert labels.dtype == np.uint16 and set(np.unique(labels)) == {0, 5, 256}
    np.testing.assert_array_equal(labels, mask)
    patches = next(iter(data.training_dataset(dataset, 2)))[1].numpy()
    assert patches.shape == (2, 32, 32, 300)  # one-hot over all 300 classes
    # Only masks that can hold labels up to n_label - 1 pass: an 8-bit mask cannot.
    Image.fromarray(mask.astype("uint8")).save(tmp_path / "masks" / "b.png")
    _, problems, _ = data.check_folder(str(tmp_path), 300)
    assert len(problems) == 1 and "b.png: a uint8 mask holds labels up to 255" in problems[0]
    assert "(n_label=300) cannot be in it" in problems[0]


def _palette_image(path, indices, colours):
    image = Image.fromarray(np.asarray(indices, "uint8"), mode="P")
    image.putpalette([value for colour in colours for value in colour])
    image.save(path)


def test_palette_images_are_read_as_their_colours_and_palette_masks_as_indices(tmp_path):
    indices = np.array([[0, 1], [2, 1]])
    # A gray palette: index 1 is white, index 2 is dark gray (10); as indices 2 > 1.
    _palette_image(tmp_path / "gray.png", indices, [(0, 0, 0), (255, 255, 255), (10, 10, 10)])
    gray = data.read_image(str(tmp_path / "gray.png"))
    np.testing.assert_array_equal(gray, [[0, 255], [10, 255]])
    assert data.read_header(str(tmp_path / "gray.png")) == ((2, 2), 1)
    _palette_image(tmp_path / "colour.png", indices, [(0, 0, 0), (255, 0, 0), (0, 0, 200)])
    colour = data.read_image(str(tmp_path / "colour.png"))
    assert colour.shape == (2, 2, 3)
    np.testing.assert_array_equal(colour[1, 0], [0, 0, 200])
    assert data.read_header(str(tmp_path / "colour.png")) == ((2, 2), 3)
    # The same file as a mask: the palette indices are the labels.
    np.testing.assert_array_equal(data.read_image(str(tmp_path / "colour.png"), mask=True),
                                  indices)


@pytest.mark.parametrize("mode, values, expected", [
    ("LA", [[(10, 255), (200, 0)]], [[10, 200]]),          # alpha dropped
    ("RGBA", [[(1, 2, 3, 0), (4, 5, 6, 255)]], [[(1, 2, 3), (4, 5, 6)]]),
    ("1", [[0, 1]], [[0, 255]]),                            # 1-bit: black and white
    ("I;16", [[0, 40000]], [[0, 40000]]),                   # 16-bit kept whole
])
def test_other_png_modes_are_read_as_intensities(tmp_path, mode, values, expected):
    path = tmp_path / "image.png"
    array = np.asarray(values, "uint16" if mode == "I;16" else "uint8")
    if mode == "1":
        Image.fromarray(array.astype(bool)).save(path)
    elif mode == "I;16":
        Image.fromarray(array).save(path)
    else:
        Image.fromarray(array, mode=mode).save(path)
    assert Image.open(path).mode == mode
    read = data.read_image(str(path))
    np.testing.assert_array_equal(read, expected)
    channels = 1 if read.ndim == 2 else read.shape[-1]
    assert data.read_header(str(path)) == (read.shape[:2], channels)


def test_a_broken_cache_entry_is_reported_removed_and_rebuilt(tmp_path):
    root, cache = tmp_path / "set", tmp_path / "cache"
    for index in range(2):
        _write_pair(str(root), f"img{index}", *_random_pair(seed=index))
    pairs = data.find_pairs(str(root))
    said = []
    entries = data.PairCache(str(cache), 2, say=said.append)
    entries.prune(pairs)
    expected = [entries.load(*pair) for pair in pairs]
    names = sorted(os.listdir(cache))
    assert len(names) == 2 and all(name.endswith(".pair.npz") for name in names)
    with open(cache / names[0], "r+b") as file:  # cut short, as a full disk or a kill would
        file.truncate(100)
    (cache / names[1]).write_bytes(b"not a zip")
    again = data.PairCache(str(cache), 2, say=said.append)
    for pair, (image, mask) in zip(pairs, expected):
        reread_image, reread_mask = again.load(*pair)
        np.testing.assert_array_equal(reread_image, image)
        np.testing.assert_array_equal(reread_mask, mask)
    assert len(said) == 2
    assert f"cache entry {cache / names[0]} cannot be read" in said[0]
    assert "removed, and rebuilt from" in said[0] and "img0.png" in said[0]
    # Rebuilt whole: read back without a word, and nothing else left in the folder.
    said.clear()
    for pair in pairs:
        again.load(*pair)
    assert said == [] and sorted(os.listdir(cache)) == names


def test_validation_is_bounded_and_the_same_every_epoch(tmp_path, monkeypatch):
    """Held-out images that hold more tiles than the budget: a fixed draw of
    `batches * batch_size` patches, each image read once, seeded."""
    for index in range(6):
        _write_pair(str(tmp_path), f"img{index}", *_random_pair(seed=index))
    dataset = data.folder(str(tmp_path), n_label=2, tile=32, val_fraction=0.5)
    assert len(dataset.val) == 3  # 3 held-out 64x64 images: 12 tiles of 32x32
    reads = []
    read = data.pipeline.read_item
    monkeypatch.setattr(data.pipeline, "read_item",
                        lambda dataset, index: reads.append(index) or read(dataset, index))
    batches = data.validation_dataset(dataset, 2, batches=2, seed=4)  # 4 patches
    assert sorted(reads) == sorted(dataset.val)  # each held-out image once, up front
    epochs = [[(x.numpy(), y.numpy()) for x, y in batches] for _ in range(2)]
    assert len(reads) == 3  # and never again
    assert [x.shape for x, _ in epochs[0]] == [(2, 32, 32, 1)] * 2
    for (x0, y0), (x1, y1) in zip(*epochs):
        np.testing.assert_array_equal(x0, x1)
        np.testing.assert_array_equal(y0, y1)
    again = [x.numpy() for x, _ in data.validation_dataset(dataset, 2, batches=2, seed=4)]
    np.testing.assert_array_equal(np.concatenate(again), np.concatenate(
        [x for x, _ in epochs[0]]))
    other = [x.numpy() for x, _ in data.validation_dataset(dataset, 2, batches=2, seed=5)]
    assert not np.array_equal(np.concatenate(other), np.concatenate(again))
    # Within the budget the held-out images are cut into their tiles, as before.
    tiles = [x.numpy() for x, _ in data.validation_dataset(dataset, 2, batches=6)]
    assert np.concatenate(tiles).shape == (12, 32, 32, 1)
    # the patches are the images' own pixels: each one appears in some held-out image
    images = [dataset.read(index)[0] for index in dataset.val]
    for patch in np.concatenate(again):
        assert any(np.array_equal(patch, image[y:y + 32, x:x + 32])
                   for image in images for y in range(33) for x in range(33))
