"""Segmentation datasets as an index of images that are read one at a time.

A `SegmentationData` lists its images (`items`: a name, a size and a reader), which
of them train and which are held out, and what the labels mean. Nothing is decoded
when it is built beyond what a header gives; `pipeline.training_dataset` and
`pipeline.validation_dataset` read the images as the batches need them, so memory
does not grow with the number of files.

- `nuclei()`: the 512x512 fluorescence image of cell nuclei with its hand-annotated
  instance mask from the 2018 Data Science Bowl (BBBC038, CC0), as shipped inside the
  `stardist` wheel. Binary target: label > 0. Training patches come from the left
  three quarters of the image; the right quarter is held out.
- `brain()`: axial slices of the MNI ICBM152 2009a symmetric T1 template with its grey
  and white matter probability maps, as shipped inside the `nilearn` wheel. Three
  classes: background, grey matter (GM map > 50%), white matter (WM map > 50%).
  Held-out slices are whole blocks of neighbouring slices, with guard slices around
  them left out of training.
- `folder(path, n_label)`: `images/` and `masks/` folders of PNG, JPEG or TIFF files
  with matching stems; masks are label images. Whole files are held out: a seeded
  draw, or the list a run recorded.
- `from_arrays(...)`: images and masks already in memory.

The wheels are only read, never imported, so `pip install --no-deps stardist nilearn`
is all they need. Images are float32 in [0, 1] after percentile normalisation,
channels_last `(H, W, C)`, and masks are integer labels `(H, W)`.
"""

import dataclasses
import functools
import os

import numpy as np

from attunet_keras import _validation
from attunet_keras.data import files

BUILTIN = ("nuclei", "brain", "brain3d")
# The patch side of folder datasets when none is given: images, volumes.
DEFAULT_TILE = {2: 128, 3: 64}


@dataclasses.dataclass(frozen=True)
class Item:
    """One image or volume of a dataset: its `name`, its spatial `shape` (`(H, W)` or
    `(D, H, W)`) and `read()`, which returns `(normalised float32 (*shape, C) image,
    (*shape) labels of files.label_dtype(n_label))`; `spacing` is the voxel size of a volume (None: pixels)."""

    name: str
    shape: tuple
    read: object
    spacing: tuple = None
    # Medical cases resampled to a plan's spacing: `truth()` gives `(labels on the
    # case's own grid, its own spacing)` and `restore(probabilities)` puts the
    # probabilities of the resampled case back on that grid (scores are computed there).
    truth: object = None
    restore: object = None


class SegmentationData:
    """A dataset: an index of images, its training/held-out split and its labels.

    Args:
        name: str. Shown in logs and results.
        items: sequence of `Item`.
        train: sequence of int. Indices of the training items.
        val: sequence of int. Indices of the held-out items.
        n_label: int. Output channels of the model: 1 for a binary mask (sigmoid), or
            the number of classes, background included (softmax).
        class_names: tuple of str. One per class, background first.
        source: str. Where the data comes from.
        in_channels: int. Channels of every image.
        tile_shape: (int, int). The model's input size: training patches and the
            tiles of the held-out images during training have this size.
        notes: tuple of str. Things the user should know (padding, cache state).
    """

    def __init__(self, name, items, train, val, n_label, class_names, source,
                 in_channels, tile_shape, notes=()):
        self.name = name
        self.items = tuple(items)
        self.train = tuple(int(index) for index in train)
        self.val = tuple(int(index) for index in val)
        self.n_label = n_label
        self.class_names = tuple(class_names)
        self.source = source
        self.in_channels = in_channels
        self.tile_shape = tuple(int(side) for side in tile_shape)
        self.notes = tuple(notes)
        if not self.train or not self.val:
            raise ValueError(f"dataset {name!r} needs at least one training and one "
                             "held-out image.")

    def __repr__(self):
        return (f"SegmentationData({self.name!r}: {len(self.train)} training and "
                f"{len(self.val)} held-out images, n_label={self.n_label}, tile "
                f"{self.tile_shape})")

    def read(self, index):
        """The normalised image and labels of item `index`."""
        return self.items[index].read()

    @property
    def dims(self):
        """2 for images, 3 for volumes."""
        return len(self.tile_shape)

    @property
    def val_names(self):
        return [self.items[index].name for index in self.val]

    @property
    def examples(self):
        """The held-out images as `(name, normalised image, mask)`, read when indexed."""
        return _Examples(self)

    def patch_count(self, index, patches_per_image=None):
        """Patches drawn from training item `index` each epoch: `patches_per_image`, or
        by default as many as its area holds tiles (at least one)."""
        if patches_per_image is not None:
            return patches_per_image
        size = np.prod(self.items[index].shape, dtype="float64")
        return max(1, int(round(size / np.prod(self.tile_shape, dtype="float64"))))

    def patches_per_epoch(self, patches_per_image=None):
        return sum(self.patch_count(index, patches_per_image) for index in self.train)


class _Examples:
    def __init__(self, dataset):
        self._dataset = dataset

    def __len__(self):
        return len(self._dataset.val)

    def __getitem__(self, position):
        index = self._dataset.val[position]
        image, mask = self._dataset.read(index)
        return self._dataset.items[index].name, image, mask

    def __iter__(self):
        return (self[position] for position in range(len(self)))


# --------------------------------------------------------------------- nuclei


def nuclei(tile=128):
    """The 2018 Data Science Bowl nuclei image; the right quarter held out.

    Args:
        tile: int. Side of the training patches and of the model's input.
            Defaults to 128.

    Returns:
        A `SegmentationData` with `n_label=1` (binary: nucleus or not) and two items:
        the left three quarters (training) and the right quarter (held out).
    """
    _validation.check_int("tile", tile, 1)
    image_path = files.package_file("stardist", os.path.join("data", "images", "img2d.tif"))
    mask_path = files.package_file("stardist", os.path.join("data", "images", "mask2d.tif"))
    height, width = files.read_header(image_path)[0]
    split_x = width - 128

    @functools.lru_cache(maxsize=1)
    def whole():
        return (files.normalize(files.read_image(image_path)),
                (files.read_image(mask_path) > 0).astype("uint8"))

    def part(columns):
        image, mask = whole()
        return image[:, columns], mask[:, columns]

    items = (Item("nuclei_train", (height, split_x), functools.partial(
                 part, slice(None, split_x))),
             Item("nuclei_held_out", (height, width - split_x), functools.partial(
                 part, slice(split_x, None))))
    return SegmentationData(
        "nuclei", items, train=[0], val=[1], n_label=1,
        class_names=("background", "nucleus"),
        source="2018 Data Science Bowl (BBBC038, CC0) image and mask in the stardist wheel",
        in_channels=1, tile_shape=(tile, tile),
    )


# ---------------------------------------------------------------------- brain


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
        kind: np.asarray(nibabel.load(files.package_file("nilearn", path)).dataobj,
                         dtype="float32") / 255.0
        for kind, path in BRAIN_FILES.items()
    }
    t1 = files._scale_percentiles(volumes["t1"], 1.0, 99.8, axis=None)
    labels = np.zeros(volumes["t1"].shape, dtype="uint8")
    labels[volumes["gm"] > 0.5] = 1
    labels[volumes["wm"] > 0.5] = 2
    return t1, labels


def brain(scale=2, block=8, val_every=4, guard=2, min_brain_fraction=0.02):
    """Axial slices of the MNI ICBM152 2009a template; blocks of slices held out.

    The volume (a few MB at 2 mm) is read once; each item is one slice, padded to
    multiples of 16, and the model's input is the whole slice.

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
        A `SegmentationData` with `n_label=3` (background, grey matter, white matter).
    """
    t1, labels, train_slices, val_slices = _brain_slices(
        scale, block, val_every, guard, min_brain_fraction)

    def read(index):
        return np.ascontiguousarray(t1[..., index, None]), np.ascontiguousarray(
            labels[..., index])

    shape = t1.shape[:2]
    items = [Item(f"brain_slice_{index}", shape, functools.partial(read, index))
             for index in range(t1.shape[-1])]
    return SegmentationData(
        "brain", items, train=train_slices, val=val_slices, n_label=3,
        class_names=("background", "grey_matter", "white_matter"),
        source="MNI ICBM152 2009a symmetric template in the nilearn wheel",
        in_channels=1, tile_shape=shape,
    )


BRAIN3D_PATCH_DEPTH = 16


def brain3d(scale=2, block=8, val_every=4, guard=2, min_brain_fraction=0.02,
            patch_depth=BRAIN3D_PATCH_DEPTH):
    """The `brain` template as a volume: 3D patches, the same held-out slices.

    The voxels, labels and split are `brain`'s: axial slices (1 mm apart, `scale` mm
    in-plane), every `val_every`-th block of `block` slices held out and `guard`
    slices on each side of it left out of training. Each training item is a run of
    neighbouring training slices (a slab), each held-out item one held-out block, so
    2D and 3D models are scored on the same voxels. The model's input is
    `patch_depth` slices of whole axial planes.

    Returns:
        A 3D `SegmentationData` with `n_label=3`, voxel spacing `(1, scale, scale)` mm.
    """
    _validation.check_int("patch_depth", patch_depth, 1)
    t1, labels, train_slices, val_slices = _brain_slices(
        scale, block, val_every, guard, min_brain_fraction)

    def read(start, stop):
        image = np.moveaxis(t1[..., start:stop], -1, 0)[..., None]
        return np.ascontiguousarray(image), np.ascontiguousarray(
            np.moveaxis(labels[..., start:stop], -1, 0))

    items, train, val = [], [], []
    for slices, indices in ((train_slices, train), (val_slices, val)):
        for run in np.split(slices, np.flatnonzero(np.diff(slices) > 1) + 1):
            start, stop = int(run[0]), int(run[-1]) + 1
            indices.append(len(items))
            items.append(Item(f"brain_slab_{start}-{stop - 1}",
                              (stop - start,) + t1.shape[:2],
                              functools.partial(read, start, stop),
                              spacing=(1.0, float(scale), float(scale))))
    return SegmentationData(
        "brain3d", items, train=train, val=val, n_label=3,
        class_names=("background", "grey_matter", "white_matter"),
        source="MNI ICBM152 2009a symmetric template in the nilearn wheel, as a volume",
        in_channels=1, tile_shape=(patch_depth,) + t1.shape[:2],
    )


def _brain_slices(scale, block, val_every, guard, min_brain_fraction):
    """The template's T1 and labels as `(H, W, Z)` axial slices (padded in-plane to
    multiples of 16), and the training and held-out slice indices."""
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
    # the share of brain in each slice before padding
    fraction = (labels > 0).mean(axis=(1, 2))
    slices = np.flatnonzero(fraction >= min_brain_fraction)
    t1 = files.pad_to_multiple(np.moveaxis(t1, 0, -1), 16, "constant")[0]
    labels = files.pad_to_multiple(np.moveaxis(labels, 0, -1), 16, "constant")[0]
    train_slices, val_slices = split_blocks(slices, block, val_every, guard)
    return t1, labels, train_slices, val_slices


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


# --------------------------------------------------------------------- folders


def folder(path, n_label, tile=None, val_fraction=0.2, seed=0, val_files=None, cache=None,
           dims=None):
    """Image/mask pairs from `path/images` and `path/masks`, matched by file stem.

    The files are 2D images (PNG, JPEG, TIFF) or NIfTI volumes (`.nii`, `.nii.gz`, for
    `att_unet_3d`), not both. Only the pairing and the files' headers are read here
    (all their problems are reported in one error); the pixels are decoded by the
    pipeline, a pair at a time. Images smaller than `tile` are padded with zeros
    (background in the mask) when a patch is cut.

    Args:
        path: str. Folder holding `images/` and `masks/`.
        n_label: int. 1 for binary masks (values 0/1, or 0/255), else the number of
            classes, background included (labels 0..n_label-1).
        tile: int or None. Side of the training patches (the model's input); `None`:
            128 for images, 64 for volumes.
        val_fraction: float. Fraction of the files held out (at least one), drawn
            with `seed`. Defaults to 0.2.
        seed: int. Seed of the draw of held-out files. Defaults to 0.
        val_files: list of str or None. The held-out image file names (in
            `images/`), e.g. as a run's config.json recorded them; overrides the draw.
        cache: str or None. A folder for decoded, normalised pairs (`PairCache`):
            later epochs read them instead of decoding. Off by default.
        dims: int or None. 2 or 3, checked against the files; `None`: from the files.

    Returns:
        A `SegmentationData`.
    """
    _validation.check_int("n_label", n_label, 1)
    if tile is not None:
        _validation.check_int("tile", tile, 1)
    if dims not in (None, 2, 3):
        raise ValueError(f"dims={dims!r} is not supported; expected 2, 3 or None.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must be between 0 and 1.")
    try:
        pairs = files.find_pairs(path)
        found_shapes = None
        if len(pairs) >= 2 and len({files.is_volume_file(f) for p in pairs for f in p}) == 1:
            found_shapes = _index_headers(path, pairs)
    except ValueError as error:
        _raise_every_problem(path, n_label, error)
    if len(pairs) < 2:
        raise ValueError(
            f"{path}: found {len(pairs)} image/mask pair(s); at least 2 are needed "
            "so that one can be held out."
        )
    volumes = {files.is_volume_file(file) for pair in pairs for file in pair}
    if len(volumes) > 1:
        raise ValueError(f"{path}: mixes 2D images and NIfTI volumes; a dataset is one or "
                         "the other (attunet-keras check-data names the files).")
    found = 3 if volumes == {True} else 2
    if dims is not None and dims != found:
        raise ValueError(f"dims={dims} but {path} holds "
                         f"{'NIfTI volumes' if found == 3 else '2D images'}.")
    tile = tile or DEFAULT_TILE[found]
    shapes, channels, spacings = found_shapes
    names = [os.path.basename(image) for image, _ in pairs]
    if val_files is None:
        order = np.random.default_rng(seed).permutation(len(pairs))
        val = sorted(order[:max(1, int(round(val_fraction * len(pairs))))].tolist())
    else:
        missing = sorted(set(val_files) - set(names))
        if missing:
            raise ValueError(
                f"{path}: the held-out files {missing[:5]} recorded for this run are no "
                "longer in images/; restore them or start a new run.")
        val = sorted(names.index(name) for name in val_files)
    held_out = set(val)
    train = [index for index in range(len(pairs)) if index not in held_out]
    if not train:
        raise ValueError(f"{path}: every file is held out; keep at least one for training.")
    notes = []
    tile_shape = (tile,) * found
    small = [name for name, shape in zip(names, shapes) if min(shape) < tile]
    if small:
        notes.append(f"{len(small)} image(s) smaller than the "
                     f"{'x'.join([str(tile)] * found)} tile (e.g. {small[0]}) are padded "
                     "with zeros, labelled background.")
    anisotropic = [files.anisotropy_note(name, spacing)
                   for name, spacing in zip(names, spacings) if spacing]
    anisotropic = [note for note in anisotropic if note]
    if anisotropic:
        notes.append(f"{len(anisotropic)} volume(s) with anisotropic voxels, e.g. "
                     f"{anisotropic[0]}")
    load = functools.partial(files.load_pair, n_label=n_label)
    if cache is not None:
        pair_cache = files.PairCache(cache, n_label)
        kept, removed = pair_cache.prune(pairs)
        load = pair_cache.load
        notes.append(f"cache {pair_cache.folder}: {kept} of {len(pairs)} pairs cached"
                     + (f"; {removed} stale entr{'y' if removed == 1 else 'ies'} removed "
                        "(their files changed or are gone)" if removed else ""))
    items = [Item(name, shape, functools.partial(load, image, mask), spacing)
             for name, shape, spacing, (image, mask) in zip(names, shapes, spacings, pairs)]
    return SegmentationData(
        os.path.basename(os.path.normpath(path)), items, train, val, n_label,
        default_class_names(n_label),
        source=os.path.abspath(path), in_channels=channels, tile_shape=tile_shape,
        notes=notes,
    )


def _raise_every_problem(path, n_label, error):
    """Raises one ValueError listing every problem `check_folder` finds in `path` (so
    that one run of `train` reports them all), or `error` itself if it finds none."""
    _, problems, _ = files.check_folder(path, n_label)
    if not problems:
        raise error
    shown = problems[:20]
    more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise ValueError(f"{path}: {len(problems)} problem(s) (attunet-keras check-data "
                     f"{path} --n-label {n_label} lists the same):\n"
                     + "\n".join(shown) + more) from None


def _index_headers(path, pairs):
    """Sizes, the channel count and the voxel spacings (None for 2D images) of every
    pair from the headers; one ValueError listing every problem found (unreadable
    header, sizes, affines, channel counts)."""
    problems, shapes, spacings, channels = [], [], [], {}
    for image_path, mask_path in pairs:
        try:
            if files.is_volume_file(image_path):
                image_shape, image_channels, image_affine, spacing = \
                    files.read_volume_header(image_path)
                mask_shape, _, mask_affine, _ = files.read_volume_header(mask_path)
                affine = files.affine_problem(image_path, image_affine, mask_path,
                                              mask_affine)
                if affine and image_shape == mask_shape:
                    problems.append(affine)
            else:
                (image_shape, image_channels), (mask_shape, _) = (
                    files.read_header(image_path), files.read_header(mask_path))
                spacing = None
        except ValueError as error:
            problems.append(str(error))
            shapes.append(None)
            spacings.append(None)
            continue
        size = files.size_problem(image_shape, mask_shape, image_path, mask_path)
        if size:
            problems.append(size)
        shapes.append(image_shape)
        spacings.append(spacing)
        channels.setdefault(image_channels, image_path)
    if len(channels) > 1:
        examples = ", ".join(f"{count} channel(s): {file}"
                             for count, file in sorted(channels.items()))
        problems.append(f"{path}: images have different channel counts ({examples}).")
    if problems:
        shown = problems[:10]
        more = f"\n... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(
            f"{path}: {len(problems)} problem(s) in the files' headers "
            "(attunet-keras check-data lists every problem of the pixels too):\n"
            + "\n".join(shown) + more)
    return shapes, next(iter(channels)), spacings


# ------------------------------------------------------- Decathlon and nnU-Net


def medical_folder(path, plan, tile=None, val_fraction=0.2, seed=0, val_files=None,
                   cache=None, n_label=None):
    """A Decathlon or nnU-Net v2 folder (`medical.describe`) as the model sees it.

    Each case is read, normalised channel by channel and resampled to the plan's
    target spacing when the pipeline needs it (`planning.prepare_case`), so memory
    does not grow with the number of cases; `cache` keeps the prepared cases, keyed by
    the files and the plan's spacing, interpolation and normalisation. The held-out
    cases are a seeded draw of `val_fraction`, or `val_files` (case names). Scores are
    computed on each case's own grid (`Item.truth`, `Item.restore`).

    Args:
        path: str. The folder (dataset.json, imagesTr/, labelsTr/).
        plan: dict. `planning.make_plan(path, ...)` or `planning.read_plan(file)`.
        tile: int or None. A cubic patch instead of the plan's.
        n_label: int or None. Checked against the labels of dataset.json.
    """
    from attunet_keras.data import medical
    from attunet_keras.data import planning

    folder = medical.describe(path)
    if n_label is not None and n_label != folder.n_label:
        raise ValueError(
            f"n_label={n_label} but {path}/dataset.json has {len(folder.label_names)} "
            f"labels ({', '.join(folder.label_names)}): n_label {folder.n_label}. Leave "
            "--n-label out for these folders.")
    if list(plan["channels"]) != list(folder.channels) or list(plan["labels"]) != list(
            folder.label_names):
        raise ValueError(f"the plan is for channels {plan['channels']} and labels "
                         f"{plan['labels']}, but {path} has {list(folder.channels)} and "
                         f"{list(folder.label_names)}; plan this folder again.")
    geometries = medical.headers(folder)
    names = folder.case_names
    if len(names) < 2:
        raise ValueError(f"{path}: {len(names)} case(s); at least 2 are needed so that "
                         "one can be held out.")
    val = _held_out(names, val_fraction, seed, val_files, path)
    train = [index for index in range(len(names)) if index not in set(val)]
    target = plan["spacing"]["target"]
    n_values = len(folder.label_names)
    pair_cache = None
    notes = []
    if cache is not None:
        pair_cache = files.PairCache(cache, folder.n_label, tag=planning.plan_key(plan))
        keys = [pair_cache.key(case.label, *case.images, stem=case.name)
                for case in folder.cases]
        kept, removed = pair_cache.prune(None, keys=keys)
        notes.append(f"cache {pair_cache.folder}: {kept} of {len(names)} cases prepared"
                     + (f"; {removed} stale entr{'y' if removed == 1 else 'ies'} removed "
                        "(their files or the plan changed)" if removed else ""))

    def prepare(case):
        image, labels, geometry = medical.read_case(case)
        problems = medical.label_problems(labels, case.label, n_values)
        if problems:
            raise ValueError(problems[0])
        image, labels, _ = planning.prepare_case(image, labels, geometry, plan)
        return image, _labels_of(labels, folder.n_label)

    def read(index):
        case = folder.cases[index]
        if pair_cache is None:
            return prepare(case)
        return pair_cache.cached(keys[index], case.images[0], case.label,
                                 lambda: prepare(case))

    def truth(index):
        case = folder.cases[index]
        labels = medical.read_case(case)[1]
        return _labels_of(labels, folder.n_label), tuple(geometries[index].spacing)

    def restore(index, probabilities):
        return planning.restore_probabilities(probabilities, geometries[index], plan)

    items = []
    for index, (case, geometry) in enumerate(zip(folder.cases, geometries)):
        shape = (planning.new_shape(geometry.shape, geometry.spacing, target) if target
                 else geometry.shape)
        items.append(Item(case.name, tuple(shape), functools.partial(read, index),
                          tuple(target) if target else (
                              tuple(geometry.spacing) if folder.dims == 3 else None),
                          truth=functools.partial(truth, index),
                          restore=functools.partial(restore, index)))
    tile_shape = (tile,) * folder.dims if tile else tuple(plan["patch"])
    small = [item.name for item in items if any(
        side < patch for side, patch in zip(item.shape, tile_shape))]
    if small:
        notes.append(f"{len(small)} case(s) smaller than the "
                     f"{'x'.join(map(str, tile_shape))} patch after resampling (e.g. "
                     f"{small[0]}) are padded with zeros, labelled background.")
    if target:
        notes.append("cases resampled to " + " x ".join(f"{v:.3g}" for v in target)
                     + f" ({plan['spacing']['rule']}); scored on their own grids")
    notes.append("normalization: " + ", ".join(
        f"{rule['channel']} {rule['scheme']}" for rule in plan["normalization"]))
    return SegmentationData(
        folder.name, items, train, val, folder.n_label,
        folder.label_names if folder.n_label > 1 else folder.label_names[:2],
        source=os.path.abspath(path), in_channels=len(folder.channels),
        tile_shape=tile_shape, notes=notes)


def _labels_of(labels, n_label):
    return np.asarray(labels).astype(files.label_dtype(max(n_label, 2)))


def _held_out(names, val_fraction, seed, val_files, path):
    if val_files is None:
        order = np.random.default_rng(seed).permutation(len(names))
        return sorted(order[:max(1, int(round(val_fraction * len(names))))].tolist())
    missing = sorted(set(val_files) - set(names))
    if missing:
        raise ValueError(f"{path}: the held-out cases {missing[:5]} recorded for this run "
                         "are no longer in the dataset; restore them or start a new run.")
    val = sorted(names.index(name) for name in val_files)
    if len(val) == len(names):
        raise ValueError(f"{path}: every case is held out; keep at least one for training.")
    return val


def case_names(path):
    """The names the held-out split and the folds are drawn over: a medical folder's
    case names, else the image file names of `images/`."""
    from attunet_keras.data import medical

    if medical.layout(path):
        return medical.describe(path).case_names
    return [os.path.basename(image) for image, _ in files.find_pairs(path)]


# ---------------------------------------------------------------------- arrays


def from_arrays(name, train_images, train_masks, val_images, val_masks, n_label,
                class_names=None, tile_shape=None):
    """A dataset of images already in memory.

    Args:
        name: str. The dataset's name.
        train_images, val_images: sequences of float32 `(H, W, C)` images, already
            normalised (e.g. with `normalize`).
        train_masks, val_masks: sequences of integer `(H, W)` label images.
        n_label: int. 1 for binary masks (0/1), else the number of classes.
        class_names: tuple of str or None. Defaults to background/foreground or
            class_0, class_1, ...
        tile_shape: (int, int) or None. Patch size; defaults to the first training
            image's size.

    Returns:
        A `SegmentationData`.
    """
    _validation.check_int("n_label", n_label, 1)
    images = [np.asarray(image, "float32") for image in list(train_images) + list(val_images)]
    masks = [np.asarray(mask) for mask in list(train_masks) + list(val_masks)]
    highest = 255 if n_label == 1 else n_label - 1  # binary: any value > 0 is foreground
    for index, mask in enumerate(masks):
        if mask.dtype.kind not in "uib" or (mask.size and (
                mask.min() < 0 or mask.max() > highest)):
            raise ValueError(
                f"mask {index} must hold integer labels 0..{highest} (n_label={n_label}); "
                f"it is {mask.dtype} with values {mask.min() if mask.size else '-'}.."
                f"{mask.max() if mask.size else '-'}.")
    masks = [mask.astype(files.label_dtype(n_label)) for mask in masks]
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks.")
    for index, (image, mask) in enumerate(zip(images, masks)):
        if image.ndim != 3 or image.shape[:2] != mask.shape:
            raise ValueError(
                f"image {index} {image.shape} and mask {mask.shape} are not an (H, W, C) "
                "image and its (H, W) labels.")
    if len({image.shape[-1] for image in images}) > 1:
        raise ValueError("the images have different channel counts.")
    n_train = len(train_images)
    items = [Item(f"{name}_{index}", image.shape[:2],
                  functools.partial(_pair, image, mask))
             for index, (image, mask) in enumerate(zip(images, masks))]
    return SegmentationData(
        name, items, range(n_train), range(n_train, len(items)), n_label,
        class_names or default_class_names(n_label),
        source="arrays", in_channels=images[0].shape[-1],
        tile_shape=tile_shape or images[0].shape[:2],
    )


def default_class_names(n_label):
    """background/foreground for a binary mask, else class_0, class_1, ..."""
    if n_label == 1:
        return ("background", "foreground")
    return tuple(f"class_{label}" for label in range(n_label))


def _pair(image, mask):
    return image, mask
