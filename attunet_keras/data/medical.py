"""Medical datasets as they are downloaded: the Decathlon and nnU-Net v2 layouts.

Two folder layouts beside `images/` + `masks/`, both a `dataset.json` beside
`imagesTr/`, `labelsTr/` and an optional `imagesTs/`:

- Medical Segmentation Decathlon: `dataset.json` with `modality` ({"0": "CT"}),
  `labels` ({"0": "background", "1": "pancreas"}), `training` ([{"image", "label"}])
  and `test`; one NIfTI file per case, 3D or 4D with the modalities on the last axis.
- nnU-Net v2 raw: `dataset.json` with `channel_names`, `labels` ({"background": 0,
  ...}), `numTraining` and `file_ending`; one file per channel,
  `imagesTr/CASE_0000.nii.gz`, `CASE_0001.nii.gz`, ... and `labelsTr/CASE.nii.gz`
  (`.nii.gz`, `.nii`, or `.png` / `.tif` for 2D cases).

`describe(path)` reads `dataset.json` and lists the cases (nothing is decoded);
`problems(path)` decodes every case once and lists every problem; `read_case` gives
a case's channels stacked on the last axis, in `dataset.json` order, with its geometry.
How a case becomes the model's input (spacing, normalisation) is `planning`'s.
"""

import dataclasses
import json
import os
import re

import numpy as np

from attunet_keras.data import files

LAYOUTS = ("decathlon", "nnunet")
FILE_ENDINGS = (".nii.gz", ".nii", ".png", ".tif")
# Endings nnU-Net reads that this package does not yet; refused in one line.
UNSUPPORTED_ENDINGS = (".nrrd", ".nhdr", ".mha", ".mhd", ".tiff", ".bmp", ".jpg")
DATASET_JSON = "dataset.json"


@dataclasses.dataclass(frozen=True)
class Case:
    """One case: its `name`, its channel files `images` (one 4D Decathlon file, or one
    file per channel) and its `label` file (None for a test case)."""

    name: str
    images: tuple
    label: str = None


@dataclasses.dataclass(frozen=True)
class MedicalFolder:
    """A Decathlon or nnU-Net folder as `describe` found it.

    `channels` are the modality names in `dataset.json` order (the model's input
    channels), `label_names` the class names by label value 0..n-1, `cases` the
    training cases and `test_cases` those of `imagesTs/` (or the Decathlon `test`
    list), `dims` 3 for NIfTI files, 2 for PNG / TIFF cases.
    """

    path: str
    layout: str
    name: str
    channels: tuple
    label_names: tuple
    cases: tuple
    test_cases: tuple
    file_ending: str
    dims: int

    @property
    def n_label(self):
        """1 (binary, sigmoid) for two labels, else the number of labels (softmax)."""
        return 1 if len(self.label_names) == 2 else len(self.label_names)

    @property
    def case_names(self):
        return [case.name for case in self.cases]


def layout(path):
    """`"decathlon"`, `"nnunet"` or None (not a folder with a `dataset.json` and
    `imagesTr/`)."""
    json_path = os.path.join(path, DATASET_JSON)
    if not (os.path.isfile(json_path) and os.path.isdir(os.path.join(path, "imagesTr"))):
        return None
    values = _read_json(json_path)
    if "channel_names" in values or "file_ending" in values:
        return "nnunet"
    if "modality" in values or "training" in values:
        return "decathlon"
    raise ValueError(f"{json_path}: neither a Decathlon dataset.json (modality, labels, "
                     "training) nor an nnU-Net v2 one (channel_names, labels, "
                     "numTraining, file_ending).")


def _read_json(path):
    try:
        with open(path) as file:
            values = json.load(file)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} cannot be read as JSON ({error}).") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path} does not hold a JSON object.")
    return values


def _visible(names):
    """File names without macOS `._*` resource forks and other hidden files."""
    return sorted(name for name in names if not name.startswith("."))


def _label_names(labels, json_path, nnunet):
    """Class names by label value 0..n-1; one ValueError for what is not supported."""
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"{json_path}: 'labels' must be a non-empty object.")
    if nnunet:
        if "ignore" in labels:
            raise ValueError(f"{json_path}: an 'ignore' label is not supported yet; "
                             "relabel those voxels or leave the label out.")
        regions = [name for name, value in labels.items() if isinstance(value, list)]
        if regions:
            raise ValueError(f"{json_path}: region-based labels ({regions[0]!r}: a list of "
                             "labels, as BraTS) are not supported yet; give each label "
                             "one value.")
        pairs = [(value, name) for name, value in labels.items()]
    else:
        pairs = [(key, name) for key, name in labels.items()]
    try:
        by_value = {int(value): str(name) for value, name in pairs}
    except (TypeError, ValueError):
        raise ValueError(f"{json_path}: label values must be integers; got "
                         f"{labels}.") from None
    if sorted(by_value) != list(range(len(by_value))) or len(by_value) < 2:
        raise ValueError(f"{json_path}: labels must be 0..N-1 with 0 the background and "
                         f"at least one more; got values {sorted(by_value)}.")
    return tuple(by_value[value] for value in range(len(by_value)))


def _channels(values, key, json_path):
    channels = values.get(key)
    if not isinstance(channels, dict) or not channels:
        raise ValueError(f"{json_path}: '{key}' must be a non-empty object "
                         '({"0": "CT", ...}).')
    try:
        order = sorted(channels, key=int)
    except ValueError:
        raise ValueError(f"{json_path}: the keys of '{key}' must be channel indices "
                         f"0, 1, ...; got {list(channels)}.") from None
    if [int(key) for key in order] != list(range(len(order))):
        raise ValueError(f"{json_path}: '{key}' must number the channels 0..N-1.")
    return tuple(str(channels[key]) for key in order)


def describe(path):
    """The layout, channels, labels and cases of a Decathlon or nnU-Net folder.

    Raises:
        ValueError: one line naming what is not supported (region-based or `ignore`
            labels, another file ending), or every missing file listed.
    """
    kind = layout(path)
    if kind is None:
        raise ValueError(f"{path}: no {DATASET_JSON} beside imagesTr/.")
    json_path = os.path.join(path, DATASET_JSON)
    values = _read_json(json_path)
    if kind == "nnunet":
        return _describe_nnunet(path, values, json_path)
    return _describe_decathlon(path, values, json_path)


def _describe_decathlon(path, values, json_path):
    channels = _channels(values, "modality", json_path)
    label_names = _label_names(values.get("labels"), json_path, nnunet=False)
    training = values.get("training")
    if not isinstance(training, list) or not training:
        raise ValueError(f"{json_path}: 'training' must list the cases "
                         '([{"image": ..., "label": ...}]).')
    cases, missing = [], []
    for entry in training:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise ValueError(f"{json_path}: every 'training' entry needs 'image' and "
                             f"'label'; got {entry!r}.")
        image, label = (os.path.normpath(os.path.join(path, entry[key]))
                        for key in ("image", "label"))
        missing.extend(file for file in (image, label) if not os.path.isfile(file))
        cases.append(Case(_case_name(image), (image,), label))
    test_cases = []
    for entry in values.get("test") or []:
        image = os.path.normpath(os.path.join(path, entry if isinstance(entry, str)
                                              else entry.get("image", "")))
        if os.path.isfile(image):
            test_cases.append(Case(_case_name(image), (image,)))
    ending = _ending(cases[0].images[0])
    _check_ending(ending, json_path)
    if missing:
        raise ValueError(f"{path}: {len(missing)} file(s) listed in {DATASET_JSON} are "
                         "missing:\n" + "\n".join(missing[:20]))
    _check_unique(cases, path)
    return MedicalFolder(path, "decathlon", str(values.get("name") or os.path.basename(
        os.path.normpath(path))), channels, label_names, tuple(cases), tuple(test_cases),
        ending, 2 if ending in (".png", ".tif") else 3)


def _describe_nnunet(path, values, json_path):
    # nnU-Net v2 reads an older dataset.json's "modality" too (with a warning)
    channels = _channels(values, "channel_names" if "channel_names" in values
                         else "modality", json_path)
    label_names = _label_names(values.get("labels"), json_path, nnunet=True)
    ending = values.get("file_ending")
    if not isinstance(ending, str):
        raise ValueError(f"{json_path}: 'file_ending' must name the files' ending, e.g. "
                         "\".nii.gz\".")
    _check_ending(ending, json_path)
    problems = []
    cases = _nnunet_cases(path, "imagesTr", "labelsTr", ending, len(channels), problems)
    expected = values.get("numTraining")
    if isinstance(expected, int) and expected != len(cases) and not problems:
        problems.append(f"{json_path}: numTraining is {expected} but labelsTr/ holds "
                        f"{len(cases)} case(s).")
    if problems:
        raise ValueError(f"{path}: {len(problems)} problem(s):\n" + listing(problems))
    if not cases:
        raise ValueError(f"{path}: labelsTr/ holds no *{ending} cases.")
    test_cases = ()
    if os.path.isdir(os.path.join(path, "imagesTs")):
        try:  # a stray file there concerns predict, not the training cases
            test_cases = tuple(test_cases_of(os.path.join(path, "imagesTs"), ending,
                                             len(channels)))
        except ValueError:
            test_cases = ()
    return MedicalFolder(path, "nnunet", str(values.get("name") or os.path.basename(
        os.path.normpath(path))), channels, label_names, tuple(cases), test_cases, ending,
        2 if ending in (".png", ".tif") else 3)


CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _nnunet_cases(path, images_dir, labels_dir, ending, n_channels, problems):
    labels = os.path.join(path, labels_dir)
    if not os.path.isdir(labels):
        problems.append(f"{labels}: missing; an nnU-Net folder holds labelsTr/.")
        return []
    grouped = _channel_files(os.path.join(path, images_dir), ending, problems)
    cases = []
    for name in _visible(os.listdir(labels)):
        if not name.endswith(ending):
            continue
        case = name[:-len(ending)]
        found = grouped.pop(case, {})
        wanted = [f"{case}_{channel:04d}{ending}" for channel in range(n_channels)]
        if sorted(found) == [0] and ending in (".png", ".tif"):
            # one RGB image may hold every channel (nnU-Net's natural images);
            # read_header checks the channel count
            cases.append(Case(case, (found[0],), os.path.join(labels, name)))
            continue
        absent = [file for channel, file in enumerate(wanted) if channel not in found]
        if absent:
            problems.append(f"{os.path.join(path, images_dir, absent[0])}: missing (case "
                            f"{case} needs {n_channels} channel file(s), {', '.join(wanted)}).")
            continue
        extra = sorted(set(found) - set(range(n_channels)))
        if extra:
            problems.append(f"{found[extra[0]]}: channel {extra[0]} but dataset.json "
                            f"names {n_channels} channel(s).")
        cases.append(Case(case, tuple(found[channel] for channel in range(n_channels)),
                          os.path.join(labels, name)))
    for case, found in sorted(grouped.items()):
        problems.append(f"{next(iter(found.values()))}: image without a label (no "
                        f"{labels_dir}/{case}{ending}).")
    return cases


def _channel_files(folder, ending, problems):
    """`{case: {channel: path}}` of the `CASE_XXXX<ending>` files in `folder`."""
    grouped = {}
    if not os.path.isdir(folder):
        problems.append(f"{folder}: missing.")
        return grouped
    for name in _visible(os.listdir(folder)):
        if not name.endswith(ending):
            continue
        match = CHANNEL_SUFFIX.match(name[:-len(ending)])
        if match is None:
            problems.append(f"{os.path.join(folder, name)}: not CASE_XXXX{ending} (the "
                            "channel index as four digits).")
            continue
        grouped.setdefault(match["case"], {})[int(match["channel"])] = os.path.join(
            folder, name)
    return grouped


def test_cases_of(folder, ending, n_channels):
    """The cases of an nnU-Net `imagesTs/`-like folder (channel files grouped)."""
    problems = []
    grouped = _channel_files(folder, ending, problems)
    cases = []
    for case, found in sorted(grouped.items()):
        if sorted(found) != list(range(n_channels)):
            problems.append(f"{os.path.join(folder, case)}_*{ending}: channels "
                            f"{sorted(found)}, expected 0..{n_channels - 1}.")
            continue
        cases.append(Case(case, tuple(found[channel] for channel in range(n_channels))))
    if problems:
        raise ValueError(f"{folder}: {len(problems)} problem(s):\n" + "\n".join(problems[:20]))
    return cases


def listing(problems, shown=20):
    """The first `shown` problems, one per line, and how many more there are."""
    more = f"\n... and {len(problems) - shown} more" if len(problems) > shown else ""
    return "\n".join(problems[:shown]) + more


def label_values_problems(folder):
    """Every label file's values outside dataset.json's labels (each label read once,
    no image): what a run given a plan checks before its first step."""
    problems = []
    for case in folder.cases:
        try:
            labels = read_labels(case.label)
        except ValueError as error:
            problems.append(str(error))
            continue
        problems.extend(label_problems(labels, case.label, len(folder.label_names)))
    return problems


def _case_name(path):
    return files.split_name(os.path.basename(path))[0]


def _ending(path):
    name = os.path.basename(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]


def _check_ending(ending, json_path):
    if ending in FILE_ENDINGS:
        return
    if ending in UNSUPPORTED_ENDINGS:
        raise ValueError(f"{json_path}: {ending} files are not supported yet; convert the "
                         f"cases to one of {', '.join(FILE_ENDINGS)}.")
    raise ValueError(f"{json_path}: file ending {ending!r} is not one of "
                     f"{', '.join(FILE_ENDINGS)}.")


def _check_unique(cases, path):
    seen = {}
    for case in cases:
        if case.name in seen:
            raise ValueError(f"{path}: two cases are named {case.name!r} ({seen[case.name]} "
                             f"and {case.images[0]}).")
        seen[case.name] = case.images[0]


# ------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where a case's voxels lie: its spatial `shape`, `spacing` (mm, or 1 per pixel),
    `affine` (None for 2D files) and the file whose header a written mask copies."""

    shape: tuple
    spacing: tuple
    affine: object
    reference: str


def read_header(case, channels):
    """`Geometry` of a case from its headers, and every problem found (channel files of
    another shape or affine, a label of another grid, a channel count that is not the
    dataset's) as lines naming the files."""
    problems = []
    geometries = []
    for path in case.images:
        if files.is_volume_file(path):
            shape, count, affine, spacing = files.read_volume_header(path)
        else:
            (shape, count), affine, spacing = files.read_header(path), None, (1.0, 1.0)
        geometries.append((path, tuple(shape), count, affine, tuple(spacing)))
    total = sum(count for _, _, count, _, _ in geometries)
    if total != channels:
        problems.append(f"{case.images[0]}: {total} channel(s), but dataset.json names "
                        f"{channels}.")
    first = geometries[0]
    for path, shape, _, affine, _ in geometries[1:]:
        if shape != first[1]:
            problems.append(f"{path} is {'x'.join(map(str, shape))} but {first[0]} is "
                            f"{'x'.join(map(str, first[1]))}; a case's channels share one grid.")
        elif affine is not None and not np.allclose(affine, first[3], atol=1e-4):
            problems.append(f"{path} and {first[0]} have different affines; a case's "
                            "channels share one grid.")
    if case.label is not None:
        if files.is_volume_file(case.label):
            shape, _, affine, _ = files.read_volume_header(case.label)
        else:
            (shape, _), affine = files.read_header(case.label), None
        size = files.size_problem(first[1], shape, first[0], case.label)
        if size:
            problems.append(size)
        elif affine is not None:
            problem = files.affine_problem(first[0], first[3], case.label, affine)
            if problem:
                problems.append(problem)
    return Geometry(first[1], first[4], first[3], first[0]), problems


def headers(folder):
    """`Geometry` of every training case from its headers; one ValueError listing every
    problem they show (`read_header`)."""
    problems, geometries = [], []
    for case in folder.cases:
        try:
            geometry, found = read_header(case, len(folder.channels))
        except ValueError as error:
            problems.append(str(error))
            continue
        problems.extend(found)
        geometries.append(geometry)
    if problems:
        raise ValueError(f"{folder.path}: {len(problems)} problem(s) in the cases' headers "
                         f"(attunet-keras check-data {folder.path} lists every problem of "
                         "the voxels too):\n" + listing(problems))
    return geometries


def read_case(case, with_label=True):
    """`(raw image (*shape, C) float32, labels (*shape) int or None, Geometry)`: the
    channels stacked in `dataset.json` order, intensities as stored (Hounsfield units
    stay HU)."""
    arrays, geometry = [], None
    for path in case.images:
        if files.is_volume_file(path):
            array, affine, spacing = files.read_volume(path)
            if geometry is None:
                geometry = Geometry(tuple(array.shape[:3]), spacing, affine, path)
            array = array if array.ndim == 4 else array[..., None]
        else:
            array = files.read_image(path)
            if geometry is None:
                geometry = Geometry(tuple(array.shape[:2]), (1.0, 1.0), None, path)
            array = array if array.ndim == 3 else array[..., None]
        arrays.append(np.asarray(array, "float32"))
    shapes = {array.shape[:-1] for array in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{case.images[0]}: the case's channel files have different "
                         f"shapes {sorted(shapes)}.")
    image = np.concatenate(arrays, axis=-1)
    labels = None
    if with_label and case.label is not None:
        labels = read_labels(case.label)
        if labels.ndim == image.ndim:
            labels = labels[..., 0]
        size = files.size_problem(image.shape[:-1], labels.shape, case.images[0], case.label)
        if size:
            raise ValueError(size)
    return image, labels, geometry


def read_labels(path):
    """A label file (NIfTI, PNG or TIFF) as integers: whole-number floats converted
    (`files.volume_mask`), others left for `label_problems` to name."""
    return files.volume_mask(files.read_volume(path)[0] if files.is_volume_file(path)
                             else files.read_image(path, mask=True))


def label_problems(labels, path, n_values):
    """Lines for labels outside 0..n_values-1 (the labels of dataset.json)."""
    if labels.dtype.kind not in "uib":
        return [f"{path}: labels must be integers; this file holds {labels.dtype} values "
                "that are not whole numbers."]
    values = np.unique(labels)
    bad = values[(values < 0) | (values >= n_values)]
    if bad.size:
        return [f"{path}: labels {bad[:10].tolist()} are not in dataset.json's labels "
                f"(0..{n_values - 1})."]
    return []


def problems(path):
    """Decodes every training case of a Decathlon or nnU-Net folder once: `(cases
    checked, problems, notes)`, each line naming its file (as `files.check_folder`)."""
    try:
        folder = describe(path)
    except ValueError as error:
        return 0, [str(error)], []
    found, notes = [], []
    for case in folder.cases:
        try:
            geometry, header_problems = read_header(case, len(folder.channels))
            found.extend(header_problems)
            if header_problems:
                continue
            image, labels, geometry = read_case(case)
        except ValueError as error:
            found.append(str(error))
            continue
        found.extend(label_problems(labels, case.label, len(folder.label_names)))
        if folder.dims == 3:
            note = files.anisotropy_note(case.images[0], geometry.spacing)
            if note:
                notes.append(note.split("Patches are")[0].strip()
                             + " Resampled to the plan's target spacing.")
    return len(folder.cases), found, notes
