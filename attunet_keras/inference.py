"""Prediction: whole images, sliding windows, test-time augmentation, attention maps.

A model trained on tiles runs on images of any size: `fully_convolutional` rebuilds it
with free spatial sizes and the same weights, and `predict_probabilities` pads the
image to a multiple of `2**depth`, predicts and crops back. `predict_image` makes the
choice `attunet-keras predict` makes (the whole image, or sliding windows, with or
without flips). `serving_model` does the padding inside the graph, for exports.
`attention_model` exposes the coefficient map of every attention gate (the
`*_gate_sigmoid` layers) as extra outputs. Facts about a model (its layout, channels,
depth) are in `model_info`; figures and PNGs in `visualize`.
"""

import itertools
import os

import numpy as np

from attunet_keras import data as data_lib
from attunet_keras import runs
from attunet_keras.model_info import GATE_SUFFIX  # noqa: F401  (re-exported)
from attunet_keras.model_info import gate_layers
from attunet_keras.model_info import input_channels
from attunet_keras.model_info import is_volume_model  # noqa: F401  (re-exported)
from attunet_keras.model_info import load_model  # noqa: F401  (re-exported)
from attunet_keras.model_info import model_data_format
from attunet_keras.model_info import needs_static_sizes
from attunet_keras.model_info import output_channels  # noqa: F401  (re-exported)
from attunet_keras.model_info import own_size  # noqa: F401  (re-exported)
from attunet_keras.model_info import size_multiple


def fully_convolutional(model):
    """The same functional model and weights with free spatial input sizes."""
    import keras

    config = model.get_config()
    input_configs = [layer for layer in config["layers"]
                     if layer["class_name"] == "InputLayer"]
    if len(input_configs) != 1:
        raise ValueError(f"model {model.name!r} must have exactly one input.")
    shape = list(input_configs[0]["config"]["batch_shape"])
    if model_data_format(model) == "channels_first":
        shape[2:] = [None] * (len(shape) - 2)
    else:
        shape[1:-1] = [None] * (len(shape) - 2)
    input_configs[0]["config"]["batch_shape"] = shape
    rebuilt = keras.Model.from_config(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def serving_model(model):
    """`model` for any image size: free sizes, padded and cropped inside the graph.

    The main output only (deep-supervision heads are training aids), the same weights,
    spatial sizes free, the image padded at its end to a multiple of `2**depth` by
    reflection (`layers.PadToMultiple`) and the prediction cropped back to the image's
    size (`layers.CropToReference`). Any batch and any size of at least one pixel.

    One exception: Keras's bilinear `UpSampling2D` cannot take sizes known only at run
    time (`keras.ops.image.resize` tests them in Python), so a model built with
    `upsampling="bilinear"` is returned with its own input size (check
    `model.inputs[0].shape`).
    """
    import keras

    from attunet_keras import layers as layers_lib

    data_format = model_data_format(model)
    main = keras.Model(model.inputs, model.outputs[0], name=model.name)
    if needs_static_sizes(main):
        return main
    free = _with_free_sizes(main)
    shape = list(free.inputs[0].shape[1:])
    images = keras.Input(shape=shape, name="images")
    padded = layers_lib.PadToMultiple(size_multiple(model), data_format,
                                      name="pad_to_multiple")(images)
    cropped = layers_lib.CropToReference(data_format, name="crop_to_image")(
        [free(padded), images])
    return keras.Model(images, cropped, name=f"{model.name}_serving")


def convert_channels(image, channels, conversion=None, path="the image"):
    """An (H, W, C) image with the model's `channels`, converted or refused.

    Args:
        image: array (H, W) or (H, W, C).
        channels: int. The model's input channels.
        conversion: None, `"gray"` or `"rgb"`. `"gray"` averages the colour channels
            (an alpha channel is dropped first); `"rgb"` repeats a gray image to 3
            channels and drops an alpha channel. None refuses a mismatch.
        path: str. Named in the error.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"{path}: expected an image (H, W) or (H, W, C), got shape "
                         f"{image.shape}.")
    if image.shape[-1] == channels:
        return image
    if conversion == "gray" and channels == 1:
        colour = image[..., :3] if image.shape[-1] == 4 else image
        return colour.astype("float32").mean(axis=-1, keepdims=True)
    if conversion == "rgb" and channels == 3 and image.shape[-1] in (1, 2, 4):
        if image.shape[-1] == 4:
            return image[..., :3]
        return np.repeat(image[..., :1], 3, axis=-1)
    hint = {1: "--channels gray converts colour images to gray",
            3: "--channels rgb repeats a gray image to RGB and drops alpha"}.get(
        channels, "convert the images first")
    raise ValueError(
        f"{path} has {image.shape[-1]} channel(s) but the model takes {channels}; "
        f"{hint}."
    )


def _with_free_sizes(model, patch=None):
    """`model` when its spatial sizes are free already or equal `patch`, else
    `fully_convolutional(model)`."""
    shape = tuple(model.inputs[0].shape)
    spatial = shape[2:] if model_data_format(model) == "channels_first" else shape[1:-1]
    if all(size is None for size in spatial) or tuple(spatial) == tuple(patch or ()):
        return model
    return fully_convolutional(model)


def attention_model(model):
    """A model with outputs `[prediction, gate maps...]`, deepest gate first.

    Each gate map is the sigmoid attention coefficient of one `attn_block_2d` (one
    channel, on the grid of the skip connection it gates).
    """
    import keras

    gates = gate_layers(model)
    if not gates:
        raise ValueError(
            f"model {model.name!r} has no attention gate: no layer is named "
            f"'*{GATE_SUFFIX}' (att_unet names them dec{{k}}{GATE_SUFFIX})."
        )
    return keras.Model(model.inputs, [model.outputs[0]] + [gate.output for gate in gates],
                       name=f"{model.name}_attention")


def _check_image(model, image, rank=2):
    channels = model.inputs[0].shape[1 if model_data_format(model) == "channels_first" else -1]
    image = np.asarray(image)
    if image.ndim == rank:
        image = image[..., None]
    if image.ndim != rank + 1 or image.shape[-1] != channels:
        kind = ("volumes", "a volume") if rank == 3 else ("images", "an image")
        raise ValueError(
            f"the model takes {kind[0]} with {channels} channel(s); received {kind[1]} of "
            f"shape {image.shape}."
        )
    return image


def _run(model, image, normalized):
    """Pads, predicts with a fully convolutional copy, crops: outputs channels_last.

    An image `(H, W[, C])` for 2D models, a volume `(D, H, W[, C])` for 3D models.
    """
    rank = 3 if is_volume_model(model) else 2
    image = _check_image(model, image, rank)
    if not normalized:
        image = data_lib.normalize_channels(image, spatial_axes=tuple(range(rank)))
    size = image.shape[:rank]
    padded, _ = data_lib.pad_to_multiple(image.astype("float32"), size_multiple(model),
                                         axes=rank)
    batch = padded[None]
    data_format = model_data_format(model)
    if data_format == "channels_first":
        batch = np.moveaxis(batch, -1, 1)
    outputs = _with_free_sizes(model).predict(batch, verbose=0)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    results = []
    for output in outputs:
        output = np.asarray(output)[0]
        if data_format == "channels_first":
            output = np.moveaxis(output, 0, -1)
        scale = padded.shape[0] // output.shape[0]
        results.append(output[tuple(slice(0, -(-side // scale)) for side in size)])
    return results


def predict_probabilities(model, image, *, normalized=False):
    """Per-pixel probabilities (H, W, n_label) for one image (H, W) or (H, W, C).

    Args:
        model: keras.Model. A model from `att_unet` (any input size).
        image: array. The image; percentile-normalised here unless `normalized`.
        normalized: bool. The image is already in the model's input range.
    """
    return _run(model, image, normalized)[0]


BLENDS = ("gaussian", "constant")


def predict_sliding_window(model, image, patch_size, *, overlap=0.5, blend="gaussian",
                           batch_size=4, tta=False, normalized=False):
    """Probabilities of a large 2D image or 3D volume, patch by patch, blended.

    Patches of `patch_size` lie on a grid with the given overlap (the last patch of
    each axis flush with the border; an image smaller than a patch is padded, by
    reflection then zeros, and the result cropped back). They are predicted
    `batch_size` at a time and summed with an importance map: a Gaussian centred on
    the patch with sigma patch/8 per axis (as MONAI and nnU-Net blend), or constant
    weights. Peak memory follows the patch batch, not the image: only the summed
    probabilities and weights are image-sized.

    Args:
        model: keras.Model. An `att_unet` (2D) or `att_unet_3d` (3D), either layout.
        image: array. `(H, W)` or `(H, W, C)` for 2D, `(D, H, W)` or `(D, H, W, C)`
            for 3D, channels last.
        patch_size: int or tuple. Patch size per spatial axis; each a multiple of the
            model's size multiple (`size_multiple(model)`).
        overlap: float. Fraction of a patch shared with its neighbour, in [0, 1).
        blend: str. `"gaussian"` or `"constant"`.
        batch_size: int. Patches per model call.
        tta: bool. Test-time augmentation: the mean over every combination of flips
            of the spatial axes (4 passes in 2D, 8 in 3D).
        normalized: bool. The image is already in the model's input range;
            otherwise it is percentile-normalised per channel here.

    Returns:
        float32 probabilities of the image's spatial size, channels last.
    """
    volume = is_volume_model(model)
    rank = 3 if volume else 2
    image = np.asarray(image)
    if image.ndim == rank:
        image = image[..., None]
    channels = input_channels(model)
    if image.ndim != rank + 1 or image.shape[-1] != channels or min(image.shape[:rank]) < 1:
        kind = "(D, H, W[, C]) volume" if volume else "(H, W[, C]) image"
        raise ValueError(
            f"the model takes a {kind} with {channels} channel(s); received shape "
            f"{image.shape}."
        )
    patch = check_patch_size(model, patch_size, rank)
    if not (isinstance(overlap, (int, float)) and 0.0 <= overlap < 1.0):
        raise ValueError(f"overlap={overlap!r} is not allowed; expected a number in [0, 1).")
    if blend not in BLENDS:
        raise ValueError(f"blend={blend!r} is not supported; expected one of {BLENDS}.")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r} is not allowed; expected an int >= 1.")
    if not normalized:
        image = data_lib.normalize_channels(image, spatial_axes=tuple(range(rank)))
    runner = _with_free_sizes(model, patch)
    channels_first = model_data_format(model) == "channels_first"
    flips = [()]
    if tta:
        flips = [axes for count in range(rank + 1)
                 for axes in itertools.combinations(range(1, rank + 1), count)]

    def predict(batch):
        return np.mean([_predict_flipped(runner, batch, axes, channels_first)
                        for axes in flips], axis=0)

    return blend_windows(predict, image, patch, overlap=overlap, blend=blend,
                         batch_size=batch_size)


def blend_windows(predict, image, patch, *, overlap=0.5, blend="gaussian", batch_size=4):
    """Sliding windows over a normalised image with any predictor: the blending of
    `predict_sliding_window`, for clients of an export that runs windows outside it.

    `predict` maps a float32 batch of windows `(n, *patch, C)` (channels last) to their
    probabilities `(n, *patch, K)`, e.g. an ONNX Runtime session or a LiteRT
    interpreter of the model's plain export; `image` is `(*spatial, C)`, already
    normalised, `patch` a tuple of the window's sides. Returns float32 probabilities
    of the image's spatial size. The code needs NumPy only: a client may copy it with
    `_pad_to_at_least`, `_window_starts`, `_importance_map` and `_window_batches`.
    """
    image = np.asarray(image, "float32")
    patch = tuple(int(side) for side in patch)
    rank = len(patch)
    size = image.shape[:rank]
    padded = _pad_to_at_least(image, patch)
    starts = [_window_starts(extent, side, overlap)
              for extent, side in zip(padded.shape[:rank], patch)]
    importance = _importance_map(patch, blend)
    total = weights = None
    for chunk, batch in _window_batches(padded, patch, starts, batch_size):
        predicted = np.asarray(predict(batch), "float32")
        if total is None:
            total = np.zeros(padded.shape[:rank] + predicted.shape[-1:], "float32")
            weights = np.zeros(padded.shape[:rank], "float32")
        for corner, probabilities in zip(chunk, predicted):
            where = tuple(slice(c, c + p) for c, p in zip(corner, patch))
            total[where] += probabilities * importance[..., None]
            weights[where] += importance
    crop = tuple(slice(0, extent) for extent in size)
    return (total[crop] / weights[crop][..., None]).astype("float32")


def _window_batches(padded, patch, starts, batch_size):
    """Yields `(corners, patches)` of the windows at every combination of `starts`,
    `batch_size` windows at a time."""
    corners = list(itertools.product(*starts))
    for first in range(0, len(corners), batch_size):
        chunk = corners[first:first + batch_size]
        yield chunk, np.stack([padded[tuple(slice(c, c + p) for c, p in zip(corner, patch))]
                               for corner in chunk])


def predict_image(model, image, *, patch_size=None, overlap=0.5, tta=False,
                  normalized=False):
    """Probabilities of one image as `attunet-keras predict` computes them.

    Whole (`predict_probabilities`) unless a side is longer than `patch_size`, then
    by Gaussian-blended sliding windows of `patch_size` (`predict_sliding_window`);
    with `tta`, a whole image is one window of the image padded to the model's size
    multiple, so its flips are averaged too.
    """
    larger = patch_size is not None and max(np.shape(image)[:2]) > patch_size
    if not (larger or tta):
        return predict_probabilities(model, image, normalized=normalized)
    if larger:
        patch = patch_size
    else:
        multiple = size_multiple(model)
        patch = tuple(-(-side // multiple) * multiple for side in np.shape(image)[:2])
    return predict_sliding_window(model, image, patch, overlap=overlap, tta=tta,
                                  normalized=normalized)


def check_patch_size(model, patch_size, rank):
    """`patch_size` as a tuple of `rank` sizes; a ValueError unless the model takes it."""
    patch = (patch_size,) * rank if isinstance(patch_size, int) else tuple(patch_size)
    multiple = size_multiple(model)
    if len(patch) != rank or not all(isinstance(p, int) and p >= multiple and p % multiple == 0
                                     for p in patch):
        raise ValueError(
            f"patch_size={patch_size!r} is not allowed; expected an int or {rank} ints, "
            f"each a positive multiple of {multiple} (the model's size multiple)."
        )
    if needs_static_sizes(model):
        own = tuple(model.inputs[0].shape[2:] if model_data_format(model) == "channels_first"
                    else model.inputs[0].shape[1:-1])
        if patch != own:
            raise ValueError(
                f"patch_size={patch} must be the model's own size {own}: its bilinear "
                "up-sampling cannot take other sizes."
            )
    return patch


def _pad_to_at_least(image, patch):
    """Pads the spatial axes at their end to at least `patch`: reflection, then zeros."""
    rank = len(patch)
    short = [max(side - extent, 0) for extent, side in zip(image.shape[:rank], patch)]
    if not any(short):
        return image
    reach = [min(pad, extent - 1) for pad, extent in zip(short, image.shape[:rank])]
    image = np.pad(image, [(0, r) for r in reach] + [(0, 0)], mode="reflect")
    return np.pad(image, [(0, s - r) for s, r in zip(short, reach)] + [(0, 0)])


def _window_starts(extent, side, overlap):
    """Starts of windows of `side` over `extent`, `overlap` apart, the last flush."""
    step = max(1, int(round(side * (1.0 - overlap))))
    starts = list(range(0, extent - side + 1, step))
    if starts[-1] != extent - side:
        starts.append(extent - side)
    return starts


def _importance_map(patch, blend):
    if blend == "constant":
        return np.ones(patch, "float32")
    grids = np.meshgrid(*[np.arange(side, dtype="float64") for side in patch], indexing="ij")
    exponent = sum(((grid - (side - 1) / 2.0) / (side / 8.0)) ** 2
                   for grid, side in zip(grids, patch))
    gaussian = np.exp(-0.5 * exponent)
    gaussian /= gaussian.max()
    # The corners of a Gaussian are almost 0; a floor keeps every pixel's weight
    # positive where a single patch covers it (at the image's corners).
    return np.maximum(gaussian, 1e-3).astype("float32")


def _predict_flipped(runner, batch, axes, channels_first):
    """The runner's main output on `batch` flipped along `axes` (and flipped back)."""
    flipped = np.flip(batch, axes) if axes else batch
    if channels_first:
        flipped = np.moveaxis(flipped, -1, 1)
    # predict_on_batch runs the compiled predict function (traced once per batch size)
    outputs = runner.predict_on_batch(np.ascontiguousarray(flipped))
    output = np.asarray(outputs[0] if isinstance(outputs, (list, tuple)) else outputs)
    if channels_first:
        output = np.moveaxis(output, 1, -1)
    return np.flip(output, axes) if axes else output


def labels_from_probabilities(probabilities, threshold=0.5):
    """Integer labels (H, W): threshold for one channel, argmax for several (uint8, or
    wider above 256 classes: `data.files.label_dtype`)."""
    if probabilities.shape[-1] == 1:
        return (probabilities[..., 0] > threshold).astype("uint8")
    return probabilities.argmax(axis=-1).astype(
        data_lib.files.label_dtype(probabilities.shape[-1]))


def attention_maps(model, image, *, normalized=False):
    """The prediction and every gate's coefficient map for one image (or, for a 3D
    model, one volume).

    Returns:
        `(probabilities, {gate name: map (h, w) or (d, h, w)})`, gate maps on their
        own grids.
    """
    model = _with_free_sizes(model)
    outputs = _run(attention_model(model), image, normalized)
    gate_names = [layer.name[: -len(GATE_SUFFIX)] for layer in gate_layers(model)]
    return outputs[0], {name: output[..., 0] for name, output in zip(gate_names, outputs[1:])}


def attention_maps_sliding_window(model, image, patch_size, *, overlap=0.5,
                                  batch_size=4, normalized=False):
    """`attention_maps` of a large image (or volume) by Gaussian-blended sliding windows.

    The image is padded to a multiple of the model's size multiple, and every window
    starts on that multiple, so each gate's grid lines up across windows; each output
    (the prediction and every gate's map, on its own grid) is blended with the
    Gaussian importance map sampled on that grid. Memory follows the patch batch.

    Returns:
        As `attention_maps`: `(probabilities, {gate name: map})`, cropped to the image.
    """
    rank = 3 if is_volume_model(model) else 2
    image = _check_image(model, image, rank)
    if not normalized:
        image = data_lib.normalize_channels(image, spatial_axes=tuple(range(rank)))
    patch = check_patch_size(model, patch_size, rank)
    if not (isinstance(overlap, (int, float)) and 0.0 <= overlap < 1.0):
        raise ValueError(f"overlap={overlap!r} is not allowed; expected a number in [0, 1).")
    multiple = size_multiple(model)
    size = image.shape[:rank]
    padded = data_lib.pad_to_multiple(image.astype("float32"), multiple, axes=rank)[0]
    padded = _pad_to_at_least(padded, patch)
    starts = [sorted({start - start % multiple
                      for start in _window_starts(extent, side, overlap)})
              for extent, side in zip(padded.shape[:rank], patch)]
    importance = _importance_map(patch, "gaussian")
    runner = attention_model(_with_free_sizes(model, patch))
    channels_first = model_data_format(model) == "channels_first"
    totals = weights = None
    for chunk, batch in _window_batches(padded, patch, starts, batch_size):
        if channels_first:
            batch = np.moveaxis(batch, -1, 1)
        outputs = [np.asarray(output) for output in runner.predict_on_batch(batch)]
        if channels_first:
            outputs = [np.moveaxis(output, 1, -1) for output in outputs]
        if totals is None:
            factors = [patch[0] // output.shape[1] for output in outputs]
            totals = [np.zeros(tuple(-(-extent // factor) for extent in padded.shape[:rank])
                               + output.shape[-1:], "float32")
                      for factor, output in zip(factors, outputs)]
            weights = [np.zeros(total.shape[:-1], "float32") for total in totals]
        for index, corner in enumerate(chunk):
            for total, weight, factor, output in zip(totals, weights, factors, outputs):
                where = tuple(slice(c // factor, (c + p) // factor)
                              for c, p in zip(corner, patch))
                sampled = importance[tuple(slice(None, None, factor) for _ in patch)]
                total[where] += output[index] * sampled[..., None]
                weight[where] += sampled
    results = []
    for total, weight, factor in zip(totals, weights, factors):
        crop = tuple(slice(0, -(-side // factor)) for side in size)
        results.append(total[crop] / weight[crop][..., None])
    gate_names = [layer.name[: -len(GATE_SUFFIX)] for layer in gate_layers(model)]
    return results[0], {name: result[..., 0]
                        for name, result in zip(gate_names, results[1:])}




def image_files(path):
    """`path` itself when it is a file, else the images (and NIfTI volumes) in the
    folder, sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such file or folder.")
    extensions = data_lib.IMAGE_EXTENSIONS + data_lib.VOLUME_EXTENSIONS
    files = [os.path.join(path, name) for name in sorted(os.listdir(path))
             if data_lib.files.split_name(name)[1] in extensions]
    if not files:
        raise ValueError(f"{path} holds no {', '.join(extensions)} files.")
    return files


# The patch of `predict_nifti` for a model with free spatial sizes and no --patch.
DEFAULT_VOLUME_PATCH = 64


def predict_nifti(model, path, output, patch_size, *, overlap=0.5, tta=False,
                  threshold=0.5, batch_size=2, postprocessing=None):
    """Segments a NIfTI volume with `predict_sliding_window` and writes the labels.

    `model` is a model or an `Ensemble` (the members' probabilities averaged).

    `output` (`.nii` or `.nii.gz`) gets uint8 labels (0/1, or class indices; wider above
    256 classes) with the input's affine and a copy of its header (data type set to
    the labels', no scaling), post-processed as `postprocessing` (`postprocess.decide`'s
    decisions) says; it
    is written under a temporary name and renamed, so it is whole or absent.

    Returns:
        The labels, `(X, Y, Z)`.
    """
    array, _, _ = data_lib.read_volume(path)
    image = array[..., None] if array.ndim == 3 else array
    first = model.model if isinstance(model, Ensemble) else model
    if image.shape[-1] != input_channels(first):
        raise ValueError(f"{path}: {image.shape[-1]} channel(s), but the model takes "
                         f"{input_channels(first)}.")
    image = image.astype("float32")

    def predict(member):
        return predict_sliding_window(member, image, patch_size, overlap=overlap, tta=tta,
                                      batch_size=batch_size)

    probabilities = model.average(predict) if isinstance(model, Ensemble) else predict(model)
    labels = labels_from_probabilities(probabilities, threshold)
    if postprocessing:
        from attunet_keras import postprocess

        labels = postprocess.apply(labels, postprocessing, output_channels(first))
    write_nifti_labels(labels, path, output)
    return labels


def medical_cases(path, plan):
    """The cases to predict in `path` (a folder like `imagesTs/`, or one file) for a run
    planned on a Decathlon / nnU-Net folder: nnU-Net's `CASE_XXXX` channel files
    grouped into cases when every file is one, else one (4D) file per case."""
    from attunet_keras.data import medical

    channels = len(plan["channels"])
    if os.path.isdir(path):
        folder, names = path, medical._visible(os.listdir(path))
    elif os.path.isfile(path):
        folder, names = os.path.dirname(path) or ".", [os.path.basename(path)]
    else:
        raise FileNotFoundError(f"{path}: no such file or folder.")
    names = [name for name in names if medical._ending(name) in medical.FILE_ENDINGS]
    if not names:
        raise ValueError(f"{path} holds no {', '.join(medical.FILE_ENDINGS)} cases.")
    endings = {medical._ending(name) for name in names}
    if len(endings) > 1:
        raise ValueError(f"{path} mixes {', '.join(sorted(endings))} files; predict one "
                         "kind of case at a time.")
    ending = endings.pop()
    stems = [name[:-len(ending)] for name in names]
    suffixed = [bool(medical.CHANNEL_SUFFIX.match(stem)) for stem in stems]
    if any(suffixed) and (channels > 1 or plan["layout"] == "nnunet"):
        stray = [name for name, ok in zip(names, suffixed) if not ok]
        if stray:
            raise ValueError(f"{os.path.join(folder, stray[0])}: not CASE_XXXX{ending} (the "
                             "channel index as four digits) among nnU-Net channel files.")
        wanted = {medical.CHANNEL_SUFFIX.match(stem)["case"] for stem in stems}
        return [case for case in medical.test_cases_of(folder, ending, channels)
                if case.name in wanted]
    return [medical.Case(stem, (os.path.join(folder, name),))
            for stem, name in zip(stems, names)]


def predict_medical_case(model, case, plan, output, patch_size, *, overlap=0.5, tta=False,
                         threshold=0.5, batch_size=2, postprocessing=None):
    """Segments one case of a planned run and writes its labels on the case's own grid.

    The case's channels are normalised and resampled as the plan says
    (`data.planning.prepare_case`), predicted by sliding windows, the probabilities
    resampled back onto the case's grid (linear, as nnU-Net exports), and the labels
    written with the case's affine and header (NIfTI) or as a PNG (2D cases).

    Returns:
        The labels on the case's own grid.
    """
    from attunet_keras.data import medical
    from attunet_keras.data import planning

    image, _, geometry = medical.read_case(case, with_label=False)
    if image.shape[-1] != len(plan["channels"]):
        raise ValueError(f"{case.images[0]}: {image.shape[-1]} channel(s), but the run "
                         f"was trained on {len(plan['channels'])} ({', '.join(plan['channels'])}).")
    prepared, _, _ = planning.prepare_case(image, None, geometry, plan)

    def predict(member):
        return predict_sliding_window(member, prepared, patch_size, overlap=overlap,
                                      tta=tta, batch_size=batch_size, normalized=True)

    first = model.model if isinstance(model, Ensemble) else model
    probabilities = model.average(predict) if isinstance(model, Ensemble) else predict(model)
    probabilities = planning.restore_probabilities(probabilities, geometry, plan)
    labels = labels_from_probabilities(probabilities, threshold)
    if postprocessing:
        from attunet_keras import postprocess

        labels = postprocess.apply(labels, postprocessing, output_channels(first))
    if data_lib.is_volume_file(geometry.reference):
        write_nifti_labels(labels, geometry.reference, output)
    else:  # a 2D case: its label values as a PNG (8-bit, 16-bit above 256 classes)
        from PIL import Image

        with runs.atomic_path(output, suffix=".png") as temporary:
            Image.fromarray(labels).save(temporary, format="PNG")
    return labels


def write_nifti_labels(labels, reference, output):
    """`labels` as a NIfTI file with the affine and a copy of the header of
    `reference` (data type the labels', no scaling), whole or absent."""
    import nibabel

    source = nibabel.load(reference)
    header = source.header.copy()
    header.set_data_dtype(labels.dtype)
    written = type(source)(labels, source.affine, header)
    written.header.set_slope_inter(1.0, 0.0)
    extension = data_lib.files.split_name(os.path.basename(output))[1]
    with runs.atomic_path(output, suffix=extension) as temporary:  # nibabel reads the suffix
        nibabel.save(written, temporary)


# The share of the available memory an ensemble's models may hold at once; above it
# they are loaded one at a time for every image.
ENSEMBLE_MEMORY_FRACTION = 0.25


class Ensemble:
    """Several models that predict as one: their probabilities averaged.

    The models must take the same input (2D or 3D, channels) and give the same classes
    (output channels); one that does not is refused naming it and what differs. They
    are kept in memory together when their weights fit in
    `ENSEMBLE_MEMORY_FRACTION` of the available memory, else loaded one at a time.
    Each predicts with its own layout and sizes (sliding windows by model).

    Args:
        paths: the `.keras` files (or a run's best checkpoint) of the members.
        load: callable `path -> model` (default `load_model`).
        prepare: callable `model -> model` applied after loading (e.g.
            `fully_convolutional`).
    """

    def __init__(self, paths, load=None, prepare=None):
        import os

        if len(paths) < 2:
            raise ValueError("an ensemble needs at least two models.")
        self.paths = [os.fspath(path) for path in paths]
        self._load = load or load_model
        self._prepare = prepare or (lambda model: model)
        facts, sizes, kept = None, 0, []
        for path in self.paths:
            model = self._load(path)
            found = {"volumes": is_volume_model(model), "input channels":
                     input_channels(model), "output channels": output_channels(model)}
            if facts is None:
                facts = found
            differing = [f"{key} {found[key]} (not {facts[key]})" for key in facts
                         if found[key] != facts[key]]
            if differing:
                raise ValueError(f"{path} cannot join the ensemble of {self.paths[0]}: "
                                 f"{', '.join(differing)}; an ensemble's models must take "
                                 "the same input and give the same classes.")
            sizes += sum(int(np.prod(weight.shape)) * 4 for weight in model.weights)
            kept.append(self._prepare(model))
        self.facts = facts
        self.kept = kept if sizes <= ENSEMBLE_MEMORY_FRACTION * _available_memory() else None
        self.model = kept[0]  # for the facts callers read off "the model"

    def models(self):
        """The members, in order (loaded now when they are not kept)."""
        if self.kept is not None:
            yield from self.kept
            return
        for path in self.paths:
            yield self._prepare(self._load(path))

    def average(self, predict):
        """The mean of `predict(model)` (an array) over the members."""
        total = None
        for model in self.models():
            values = np.asarray(predict(model), "float64")
            total = values if total is None else total + values
        return (total / len(self.paths)).astype("float32")


def _available_memory():
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**31
