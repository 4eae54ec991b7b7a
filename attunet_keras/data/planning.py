"""How a medical case becomes the model's input: target spacing, resampling,
intensity normalisation, and the plan that records them (`plan.json`).

The rules are nnU-Net v2's (docs/data.md names each source file):

- Target spacing (`target_spacing`): `ExperimentPlanner.determine_fullres_target_spacing`:
  the per-axis median of the training cases' spacings, except on a dataset whose
  coarsest axis is anisotropic both in spacing (median more than 3x the largest
  other median) and in voxels (3x its median size, after cropping to the nonzero
  region, below the smallest other median size): that axis takes the 10th
  percentile of its spacings, raised to the largest other median (+1e-5) when below.
- Resampling (`resample_image`, `resample_labels`, `resample_probabilities`):
  `default_resampling.resample_data_or_seg`: images third-order spline, labels
  linear on each label's one-hot map (>= 0.5), probabilities linear; when the source
  or target spacing is anisotropic (ratio above 3) with one coarse axis, that axis
  is resampled separately with order 0 ("separate z"). scikit-image's `resize`
  (edge mode, no anti-aliasing) and SciPy's `map_coordinates`, as nnU-Net.
- Normalisation (`normalize_case`), per channel from its modality name
  (`map_channel_name_to_normalization`): `CT` clips to the 0.5th / 99.5th percentiles
  of the training cases' foreground voxels, then subtracts their mean and divides by
  their standard deviation (the dataset's fingerprint); any other modality is a
  z-score per image, over the nonzero region when the dataset's cases are mostly
  background around a body (median size after cropping to the nonzero region below
  3/4 of the image), the outside left at 0. `percentile` is the per-image 1st-99.8th
  percentile scaling of `images/` + `masks/` folders.

Cases are never re-oriented: the voxel order and the affine stay as stored.
"""

import math
import os

import numpy as np

from attunet_keras.data import files
from attunet_keras.data import medical

PLAN_FORMAT = 1
PLAN_FILE = "plan.json"
ANISOTROPY_THRESHOLD = 3  # nnU-Net's ANISO_THRESHOLD
IMAGE_ORDER, LABEL_ORDER, PROBABILITY_ORDER, SEPARATE_AXIS_ORDER = 3, 1, 1, 0
SCHEMES = ("ct", "zscore", "percentile", "rescale_to_0_1", "rgb_to_0_1", "none")
# Foreground voxels sampled per dataset for the CT statistics (nnU-Net samples 10e7 /
# cases per case; this bound keeps planning a large dataset within memory).
FOREGROUND_SAMPLES = 200_000
FOREGROUND_SEED = 1234
# nnU-Net uses the nonzero mask for z-scores when the median case keeps less than
# this share of its voxels after cropping to the nonzero region.
NONZERO_MASK_BELOW = 0.75
# Planning a patch: at least this many voxels per axis at the deepest level
# (nnU-Net's UNet_featuremap_min_edge_length), at most this depth.
MIN_EDGE_AT_DEPTH, MAX_DEPTH = 4, 5
DEFAULT_MEMORY_CAP_GB = 8.0
# float32 tensors kept per voxel and feature of each level for one training step of
# att_unet: the encoder's two convolutions and activations, the gate's maps, the
# up-sampled and concatenated tensors and the decoder's two convolutions, and their
# gradients (an estimate, see docs/data.md).
TENSORS_PER_LEVEL = 24


def scheme_for(modality):
    """nnU-Net's normalisation of a channel from its name: `ct` for CT, `none` for
    noNorm, `rescale_to_0_1` / `rgb_to_0_1` by name, else `zscore`."""
    name = str(modality).lower()
    return {"ct": "ct", "nonorm": "none", "rescale_to_0_1": "rescale_to_0_1",
            "rgb_to_0_1": "rgb_to_0_1", "zscore": "zscore"}.get(name, "zscore")


def parse_spacing(text):
    """`"auto"`, `"none"` or a tuple of floats from `X,Y,Z`; a ValueError otherwise."""
    if text in (None, "auto", "none"):
        return text
    try:
        values = tuple(float(part) for part in str(text).split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing={text!r} is not allowed; expected auto, none or "
                         "positive numbers X,Y,Z (mm).")
    return values


def parse_normalization(text, channels):
    """The scheme of every channel: None -> from the modality names; one scheme for
    all channels; or one per channel, comma-separated."""
    if text is None:
        return [scheme_for(name) for name in channels]
    schemes = [part.strip() for part in str(text).split(",")]
    if len(schemes) == 1:
        schemes = schemes * len(channels)
    unknown = [scheme for scheme in schemes if scheme not in SCHEMES]
    if unknown or len(schemes) != len(channels):
        raise ValueError(f"normalization={text!r} is not allowed; expected one of "
                         f"{SCHEMES}, or one per channel ({len(channels)}: "
                         f"{', '.join(channels)}) separated by commas.")
    return schemes


# ------------------------------------------------------------------- spacing


def target_spacing(spacings, shapes_after_crop, threshold=ANISOTROPY_THRESHOLD):
    """nnU-Net v2's fullres target spacing of cases with these spacings and sizes.

    Returns:
        `(target spacing as a float tuple, the rule used: "median" or
        "anisotropic axis K: 10th percentile")`.
    """
    spacings = np.vstack([np.asarray(s, "float64") for s in spacings])
    sizes = np.vstack([np.asarray(s, "float64") for s in shapes_after_crop])
    target = np.percentile(spacings, 50, 0)
    target_size = np.percentile(sizes, 50, 0)
    worst = int(np.argmax(target))
    others = [axis for axis in range(len(target)) if axis != worst]
    if not others:
        return tuple(float(v) for v in target), "median"
    other_spacings = [target[axis] for axis in others]
    other_sizes = [target_size[axis] for axis in others]
    aniso_spacing = target[worst] > threshold * max(other_spacings)
    aniso_voxels = target_size[worst] * threshold < min(other_sizes)
    rule = "median"
    if aniso_spacing and aniso_voxels:
        value = np.percentile(spacings[:, worst], 10)
        if value < max(other_spacings):
            value = max(max(other_spacings), value) + 1e-5
        target[worst] = value
        rule = f"anisotropic axis {worst}: 10th percentile of its spacings"
    return tuple(float(v) for v in target), rule


def new_shape(shape, spacing, target):
    """nnU-Net's `compute_new_shape`: each axis scaled by its spacing's zoom, rounded."""
    return tuple(int(round(old / new * side)) for side, old, new in
                 zip(shape, spacing, target))


def _separate_axis(spacing, target, threshold=ANISOTROPY_THRESHOLD):
    """The one coarse axis resampled with order 0, or None (nnU-Net's rule)."""
    for values in (spacing, target):
        values = np.asarray(values, "float64")
        if values.max() / values.min() > threshold:
            axes = np.flatnonzero(values.max() / values == 1)
            return int(axes[0]) if len(axes) == 1 else None
    return None


def _resize(array, shape, order):
    from skimage.transform import resize

    return resize(array, shape, order=order, mode="edge", anti_aliasing=False)


def _resize_separately(array, shape, axis, order, order_axis):
    """`array` (spatial only) resized in the planes across `axis` with `order`, then
    along `axis` with `order_axis` (nnU-Net's separate-z resampling)."""
    from scipy.ndimage import map_coordinates

    plane = tuple(side for index, side in enumerate(shape) if index != axis)
    slices = [_resize(np.take(array, index, axis=axis), plane, order)
              for index in range(array.shape[axis])]
    stacked = np.stack(slices, axis)
    if stacked.shape[axis] == shape[axis]:
        return stacked
    scales = [old / new for old, new in zip(stacked.shape, shape)]
    grid = np.mgrid[tuple(slice(0, side) for side in shape)].astype("float64")
    coordinates = np.array([scale * (g + 0.5) - 0.5 for scale, g in zip(scales, grid)])
    return map_coordinates(stacked, coordinates, order=order_axis, mode="nearest")


def _resample_channels(array, spacing, target, shape, order):
    """`(*spatial, C)` float array onto `shape`, each channel as nnU-Net resamples data."""
    spatial = array.shape[:-1]
    if tuple(spatial) == tuple(shape):
        return array
    axis = _separate_axis(spacing, target) if len(spatial) == 3 else None
    channels = []
    for channel in range(array.shape[-1]):
        values = array[..., channel].astype("float64")
        if axis is None:
            channels.append(_resize(values, shape, order))
        else:
            channels.append(_resize_separately(values, shape, axis, order,
                                               SEPARATE_AXIS_ORDER))
    return np.stack(channels, axis=-1)


def resample_image(image, spacing, target, shape=None):
    """A normalised `(*spatial, C)` image onto the target spacing (third-order
    spline; separate coarse axis at order 0): float32."""
    shape = shape or new_shape(image.shape[:-1], spacing, target)
    return _resample_channels(image, spacing, target, shape, IMAGE_ORDER).astype("float32")


def resample_probabilities(probabilities, spacing, target, shape):
    """`(*spatial, C)` probabilities from the spacing `spacing` onto `shape` (linear;
    separate coarse axis at order 0), as nnU-Net exports its predictions."""
    resampled = _resample_channels(probabilities, spacing, target, shape, PROBABILITY_ORDER)
    return np.clip(resampled, 0.0, 1.0).astype("float32")


def resample_labels(labels, spacing, target, shape=None, n_values=None):
    """Integer labels onto the target grid: each label's one-hot map resampled
    linearly, the label set where its map is at least 0.5 (nnU-Net's
    `resize_segmentation`; separate coarse axis at order 0)."""
    shape = shape or new_shape(labels.shape, spacing, target)
    if tuple(labels.shape) == tuple(shape):
        return labels
    axis = _separate_axis(spacing, target) if labels.ndim == 3 else None
    result = np.zeros(shape, labels.dtype)
    values = range(n_values) if n_values else np.unique(labels)
    for value in values:
        if value == 0:
            continue
        one_hot = (labels == value).astype("float64")
        if not one_hot.any():
            continue
        if axis is None:
            resized = _resize(one_hot, shape, LABEL_ORDER)
        else:
            # order 0 along the coarse axis keeps the in-plane values; a half stays
            # in, as nnU-Net's resize_segmentation keeps it in-plane
            resized = _resize_separately(one_hot, shape, axis, LABEL_ORDER,
                                         SEPARATE_AXIS_ORDER)
        result[resized >= 0.5] = value
    return result


# ------------------------------------------------------------- normalisation


def nonzero_mask(image):
    """nnU-Net's nonzero mask: voxels nonzero in any channel, holes filled."""
    from scipy.ndimage import binary_fill_holes

    return binary_fill_holes(np.any(image != 0, axis=-1))


def normalize_case(image, normalization):
    """A raw `(*spatial, C)` case normalised channel by channel as `normalization`
    (the plan's list of `{"scheme", ...}`) says: float32."""
    image = np.asarray(image, "float32")
    out = np.empty_like(image)
    mask = None
    for channel, rule in enumerate(normalization):
        values = image[..., channel]
        scheme = rule["scheme"]
        if scheme == "ct":
            clipped = np.clip(values, rule["clip"][0], rule["clip"][1])
            out[..., channel] = (clipped - rule["mean"]) / max(rule["std"], 1e-8)
        elif scheme == "zscore":
            if rule.get("use_nonzero_mask"):
                mask = nonzero_mask(image) if mask is None else mask
                inside = values[mask]
                normalized = np.zeros_like(values)
                if inside.size:
                    normalized[mask] = (inside - inside.mean()) / max(inside.std(), 1e-8)
                out[..., channel] = normalized
            else:
                out[..., channel] = (values - values.mean()) / max(values.std(), 1e-8)
        elif scheme == "percentile":
            out[..., channel] = files.normalize_channels(
                values[..., None], tuple(range(values.ndim)))[..., 0]
        elif scheme == "rescale_to_0_1":
            low, high = values.min(), values.max()
            out[..., channel] = (values - low) / max(high - low, 1e-8)
        elif scheme == "rgb_to_0_1":
            out[..., channel] = np.clip(values / 255.0, 0.0, 1.0)
        elif scheme == "none":
            out[..., channel] = values
        else:
            raise ValueError(f"normalization scheme {scheme!r} is not one of {SCHEMES}.")
    return out


# --------------------------------------------------------------- fingerprint


def _crop_shape(image):
    """The nonzero region's bounding-box shape (nnU-Net crops to it before planning)."""
    mask = nonzero_mask(image)
    if not mask.any():
        return tuple(image.shape[:-1])
    bounds = [np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim)
                                                      if a != axis)))
              for axis in range(mask.ndim)]
    return tuple(int(b[-1] - b[0] + 1) for b in bounds)


def fingerprint(folder, say=None):
    """The dataset's fingerprint, one case in memory at a time: per case its shape,
    spacing and shape after cropping to the nonzero region; the foreground
    intensities' statistics per channel (from a bounded, seeded sample); voxel counts
    per label."""
    per_case = max(1, FOREGROUND_SAMPLES // len(folder.cases))
    samples = [[] for _ in folder.channels]
    counts = np.zeros(len(folder.label_names), "int64")
    cases, problems = [], []
    medical.headers(folder)  # every header problem first, in one error
    for index, case in enumerate(folder.cases):
        try:
            image, labels, geometry = medical.read_case(case)
        except ValueError as error:
            problems.append(str(error))
            continue
        found = medical.label_problems(labels, case.label, len(folder.label_names))
        if found:
            problems.extend(found)
            continue
        if say and index % 20 == 0:
            say(f"  fingerprint: case {index + 1} of {len(folder.cases)}")
        crop = _crop_shape(image)
        cases.append({"case": case.name, "shape": list(geometry.shape),
                      "spacing": list(geometry.spacing), "shape_after_crop": list(crop),
                      "relative_size_after_crop": float(np.prod(crop) / np.prod(
                          geometry.shape))})
        foreground = labels > 0
        rng = np.random.RandomState(FOREGROUND_SEED)
        for channel in range(image.shape[-1]):
            values = image[..., channel][foreground]
            if values.size:
                samples[channel].append(rng.choice(values, per_case, replace=True))
        counts += np.bincount(labels.ravel().astype("int64"),
                              minlength=len(counts))[:len(counts)]
    if problems:
        raise ValueError(f"{folder.path}: {len(problems)} problem(s) in the cases (attunet-"
                         f"keras check-data {folder.path} lists the same):\n"
                         + medical.listing(problems))
    intensities = []
    for channel, name in enumerate(folder.channels):
        values = (np.concatenate(samples[channel]) if samples[channel]
                  else np.zeros(1, "float32"))
        intensities.append({
            "channel": name, "mean": float(values.mean()), "std": float(values.std()),
            "median": float(np.median(values)), "min": float(values.min()),
            "max": float(values.max()), "percentile_00_5": float(np.percentile(values, 0.5)),
            "percentile_99_5": float(np.percentile(values, 99.5))})
    return {"cases": cases, "intensities": intensities,
            "label_voxels": {name: int(count) for name, count in
                             zip(folder.label_names, counts)}}


# ---------------------------------------------------------------------- plan


def step_memory_gb(patch, batch_size, depth, features, channels=1):
    """Estimated memory of one training step of att_unet on `patch`, in GB: the
    activations of each level (`TENSORS_PER_LEVEL` float32 maps of its features)
    and Adam's copies of the weights."""
    dims = len(patch)
    voxels = float(np.prod(patch))
    activations = sum(TENSORS_PER_LEVEL * features * 2 ** level * voxels / (2 ** dims) ** level
                      for level in range(depth + 1))
    activations += voxels * channels
    kernel = 3 ** dims
    weights = sum(kernel * features ** 2 * 4 ** level * 4 for level in range(depth + 1))
    return (batch_size * activations * 4 + weights * 4 * 4) / 1e9


def choose_patch(median_shape, spacing, memory_gb, batch_size, depth=None, features=16,
                 channels=1):
    """A patch no larger than the median shape, each side a multiple of 2**depth, the
    sides in proportion to the millimetres they cover, shrunk (the side largest
    against the median first) until `step_memory_gb` fits `memory_gb`; depth (when
    None) as deep as `MIN_EDGE_AT_DEPTH` voxels at the bottom allow, at most
    `MAX_DEPTH`.

    Returns:
        `(patch, depth)`.
    """
    median = np.maximum(np.asarray(median_shape, "float64"), 1)
    if depth is None:
        depth = int(max(1, min(MAX_DEPTH, math.floor(math.log2(
            max(median.min() / MIN_EDGE_AT_DEPTH, 2))))))
    multiple = 2 ** depth
    # as nnU-Net: an initial patch in proportion to 1 / spacing, clipped to the median
    inverse = 1.0 / np.asarray(spacing, "float64")
    start = inverse * (256 ** len(median) / np.prod(inverse)) ** (1 / len(median))
    patch = np.minimum(start, median)
    patch = np.maximum(multiple, np.floor(patch / multiple) * multiple).astype(int)
    while step_memory_gb(patch, batch_size, depth, features, channels) > memory_gb:
        ratios = patch / median
        shrinkable = [axis for axis in range(len(patch)) if patch[axis] > multiple]
        if not shrinkable:
            break
        axis = max(shrinkable, key=lambda a: ratios[a])
        patch[axis] -= multiple
    return tuple(int(side) for side in patch), depth


def available_memory_gb():
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return DEFAULT_MEMORY_CAP_GB


def make_plan(path, *, spacing="auto", normalization=None, memory_gb=None,
              batch_size=None, depth=None, features=16, say=None):
    """The plan of a Decathlon or nnU-Net folder (a dict, `plan.json`'s content).

    Args:
        path: str. The dataset folder.
        spacing: `"auto"` (nnU-Net's target spacing), `"none"` (voxels as stored) or
            the target spacing `(x, y, z)`.
        normalization: None (from the modality names), a scheme or one per channel.
        memory_gb: float or None. Budget of one training step; None: the memory
            available now, at most `DEFAULT_MEMORY_CAP_GB`.
        batch_size, depth: int or None. Fixed, or chosen (batch 2 for volumes, 12
            for images, as nnU-Net; depth from the patch).
        features: int. att_unet's base features the estimate assumes.
    """
    folder = medical.describe(path)
    spacing = parse_spacing(spacing or "auto")
    schemes = parse_normalization(normalization, folder.channels)
    print_ = say or (lambda line: None)
    found = fingerprint(folder, say)
    spacings = [case["spacing"] for case in found["cases"]]
    crops = [case["shape_after_crop"] for case in found["cases"]]
    shapes = [case["shape"] for case in found["cases"]]
    if folder.dims == 2 and spacing not in ("auto", "none"):
        raise ValueError(f"spacing={','.join(map(str, spacing))}: {folder.name}'s cases are "
                         "2D images, used pixel for pixel; leave --spacing out.")
    if folder.dims == 2 or spacing == "none":
        target, rule = None, "none: voxels as stored"
    elif spacing == "auto":
        target, rule = target_spacing(spacings, crops)
    else:
        if len(spacing) != folder.dims:
            raise ValueError(f"spacing={','.join(map(str, spacing))} gives {len(spacing)} "
                             f"axes; the cases have {folder.dims}.")
        target, rule = tuple(spacing), "given"
    resampled = [new_shape(shape, own, target) if target else shape
                 for shape, own in zip(shapes, spacings)]
    median_shape = [int(v) for v in np.median(np.asarray(resampled), 0)]
    relative = float(np.median([case["relative_size_after_crop"]
                                for case in found["cases"]]))
    use_mask = relative < NONZERO_MASK_BELOW
    rules = []
    for scheme, stats in zip(schemes, found["intensities"]):
        rule_ = {"channel": stats["channel"], "scheme": scheme}
        if scheme == "ct":
            rule_.update(clip=[stats["percentile_00_5"], stats["percentile_99_5"]],
                         mean=stats["mean"], std=stats["std"])
        if scheme == "zscore":
            rule_["use_nonzero_mask"] = use_mask
        rules.append(rule_)
    budget = memory_gb if memory_gb is not None else min(DEFAULT_MEMORY_CAP_GB,
                                                         available_memory_gb())
    if budget <= 0:
        raise ValueError(f"memory_gb={memory_gb!r} must be positive.")
    batch = batch_size or (2 if folder.dims == 3 else 12)
    patch, depth = choose_patch(median_shape, target or (1.0,) * folder.dims, budget,
                                batch, depth, features, len(folder.channels))
    total = sum(found["label_voxels"].values()) or 1
    spacing_array = np.asarray(spacings, "float64")
    plan = {
        "format": PLAN_FORMAT, "dataset": os.path.abspath(path), "layout": folder.layout,
        "name": folder.name, "dims": folder.dims, "cases": len(folder.cases),
        "channels": list(folder.channels), "labels": list(folder.label_names),
        "n_label": folder.n_label,
        "spacing": {"median": np.median(spacing_array, 0).tolist(),
                    "p10": np.percentile(spacing_array, 10, 0).tolist(),
                    "p90": np.percentile(spacing_array, 90, 0).tolist(),
                    "target": list(target) if target else None, "rule": rule},
        "median_shape": [int(v) for v in np.median(np.asarray(shapes), 0)],
        "median_shape_resampled": median_shape,
        "median_relative_size_after_crop": relative,
        "interpolation": {"image": IMAGE_ORDER, "label": f"{LABEL_ORDER} (one-hot)",
                          "probabilities": PROBABILITY_ORDER,
                          "separate_axis": SEPARATE_AXIS_ORDER,
                          "anisotropy_threshold": ANISOTROPY_THRESHOLD},
        "normalization": rules,
        "patch": list(patch), "batch_size": batch, "depth": depth, "features": features,
        "memory_gb": budget,
        "estimated_step_gb": step_memory_gb(patch, batch, depth, features,
                                            len(folder.channels)),
        "class_frequencies": {name: count / total
                              for name, count in found["label_voxels"].items()},
        "fingerprint": found,
    }
    print_(f"planned {folder.name}: {len(folder.cases)} cases")
    return plan


def plan_key(plan):
    """What a cached case depends on: the target spacing, the interpolation and the
    normalisation (with its statistics)."""
    import json

    return json.dumps({key: plan[key] for key in ("spacing", "interpolation",
                                                  "normalization", "format")},
                      sort_keys=True)


def write_plan(plan, path):
    import json

    from attunet_keras import runs

    with runs.atomic_path(path, suffix=".json") as temporary:
        with open(temporary, "w") as file:
            json.dump(plan, file, indent=2)


def read_plan(path):
    import json

    try:
        with open(path) as file:
            plan = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} cannot be read as a plan ({error}).") from error
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT or not all(
            key in plan for key in ("spacing", "normalization", "patch", "channels")):
        raise ValueError(f"{path} is not an attunet-keras plan.json (format "
                         f"{PLAN_FORMAT}); write one with attunet-keras plan.")
    return plan


def describe_plan(plan):
    """Readable lines: every choice the plan made."""
    spacing = plan["spacing"]

    def mm(values):
        return " x ".join(f"{v:.3g}" for v in values) if values else "-"

    lines = [
        f"{plan['name']} ({plan['layout']}): {plan['cases']} training cases, "
        f"{plan['dims']}D, channels {', '.join(plan['channels'])}",
        f"labels: {', '.join(f'{v} {n}' for v, n in enumerate(plan['labels']))}",
        f"spacing: median {mm(spacing['median'])}, 10th percentile {mm(spacing['p10'])}, "
        f"90th {mm(spacing['p90'])}",
        f"target spacing: {mm(spacing['target'])} ({spacing['rule']})",
        f"median shape: {'x'.join(map(str, plan['median_shape']))} as stored, "
        f"{'x'.join(map(str, plan['median_shape_resampled']))} resampled",
        f"patch {'x'.join(map(str, plan['patch']))}, batch {plan['batch_size']}, depth "
        f"{plan['depth']} (features {plan['features']}): about "
        f"{plan['estimated_step_gb']:.2f} GB a step, budget {plan['memory_gb']:.1f} GB",
    ]
    for rule in plan["normalization"]:
        detail = ""
        if rule["scheme"] == "ct":
            detail = (f": clip {rule['clip'][0]:.1f}..{rule['clip'][1]:.1f}, mean "
                      f"{rule['mean']:.1f}, std {rule['std']:.1f} (foreground of every "
                      "training case)")
        elif rule["scheme"] == "zscore":
            detail = (" per image" + (" over the nonzero region"
                                      if rule.get("use_nonzero_mask") else ""))
        lines.append(f"normalization {rule['channel']}: {rule['scheme']}{detail}")
    lines.append("class frequencies: " + ", ".join(
        f"{name} {value:.4f}" for name, value in plan["class_frequencies"].items()))
    return lines


# --------------------------------------------------------- cases as the model sees


def prepare_case(image, labels, geometry, plan):
    """A raw case as the model sees it: `(normalised image on the target grid, labels
    on it or None, the target spacing)`."""
    normalized = normalize_case(image, plan["normalization"])
    target = plan["spacing"]["target"]
    if not target:
        return normalized, labels, geometry.spacing
    shape = new_shape(geometry.shape, geometry.spacing, target)
    resampled = resample_image(normalized, geometry.spacing, target, shape)
    if labels is not None:
        labels = resample_labels(labels, geometry.spacing, target, shape,
                                 len(plan["labels"]))
    return resampled, labels, tuple(target)


def restore_probabilities(probabilities, geometry, plan):
    """Probabilities on the target grid back onto the case's own grid."""
    target = plan["spacing"]["target"]
    if not target or tuple(probabilities.shape[:-1]) == tuple(geometry.shape):
        return probabilities
    return resample_probabilities(probabilities, target, geometry.spacing, geometry.shape)
