"""Exports: SavedModel (plain, and TF Serving's layout with two signatures), ONNX, LiteRT.

Every export is written beside its target and renamed into place only once it is
complete and checked, so a failed or killed export never leaves a half-written model
at the target, and an existing target is replaced only when asked (`overwrite`) and
only when it is an export of the same format. A staging folder left behind by a
killed export is removed by the next export to the same target.

`export_model` (and so the command line) exports `inference.serving_model(model)`
to SavedModel and ONNX: the main output only (deep-supervision heads are training
aids), any batch and any image size (padded to a multiple of `2**depth` by reflection
and cropped back inside the graph). LiteRT has static shapes: its model takes one
image of the model's own size, main output only.

- `export_saved_model(model, path)`: `model.export` (endpoint `serve`), checked.
- `export_serving(model, path)`: TF Serving's versioned layout `path/1/` with the
  signatures `probabilities` (also `serving_default`) and `mask` (uint8: a threshold
  for one sigmoid channel per label, argmax over softmax classes); batch and free
  spatial sizes stay dynamic; inputs of the wrong rank or channel count fail with a
  message naming what is expected.
- `export_onnx(model, path)`: ONNX through tf2onnx (the `onnx` extra), checked with
  ONNX Runtime when it is installed; with `segment`, the end-to-end graph instead
  (raw images in, every image whole: the window loop stays outside).
- `export_litert(model, path, quantize=None | "int8", representative=...)`: a `.tflite`
  file, float32, or with int8 post-training quantization calibrated on a
  representative set of training images (float32 input and output); with `segment`,
  the end-to-end graph at the model's own size.
"""

import contextlib
import os
import shutil
import tempfile

import numpy as np

from attunet_keras import inference
from attunet_keras import runs

FORMATS = ("savedmodel", "onnx", "litert")
QUANTIZATIONS = (None, "int8")
SERVING_VERSION = "1"


# ------------------------------------------------------------------ atomic writing


def _staging_prefix(path):
    return f".{os.path.basename(path)}.staging-"


def _retired_prefix(path):
    return f".{os.path.basename(path)}.old-"


def check_target(path, format, overwrite):
    """Refuses a target that exists, unless `overwrite` and it is an export of `format`.

    A SavedModel target must be a folder holding `saved_model.pb` (or TF Serving's
    `1/saved_model.pb`); an ONNX or LiteRT target must be a file with its extension.
    Anything else (another folder, a dataset, a file of another type) is never
    replaced.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise FileExistsError(
            f"{path} already exists; choose another path or pass overwrite=True "
            "(--overwrite on the command line) to replace it."
        )
    if format == "savedmodel":
        replaceable = os.path.isdir(path) and not os.path.islink(path) and any(
            os.path.isfile(os.path.join(path, *parts))
            for parts in (("saved_model.pb",), (SERVING_VERSION, "saved_model.pb")))
        what = "a SavedModel folder (with saved_model.pb)"
    else:
        extension = {"onnx": ".onnx", "litert": ".tflite"}[format]
        replaceable = os.path.isfile(path) and path.endswith(extension)
        what = f"a {extension} file"
    if not replaceable:
        raise FileExistsError(
            f"{path} exists and is not {what}; --overwrite only replaces an earlier "
            "export of the same format. Choose another path."
        )


def remove_stale_staging(path):
    """Removes the staging and retired folders a killed export left beside `path`."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        return []
    removed = []
    for name in os.listdir(parent):
        if name.startswith((_staging_prefix(path), _retired_prefix(path))):
            stale = os.path.join(parent, name)
            if os.path.isdir(stale) and not os.path.islink(stale):
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.remove(stale)
            removed.append(stale)
    return removed


@contextlib.contextmanager
def _staged(path, overwrite, format="savedmodel"):
    """Yields a staging folder beside `path`; the caller leaves its result there as
    `staging/<basename of path>`, which replaces `path` only when the block succeeds."""
    path = os.path.abspath(os.fspath(path))
    check_target(path, format, overwrite)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    # One export to a target at a time: a second is refused at once, so it can neither
    # remove the first's staging folder nor replace its result without `overwrite`.
    lock = os.path.join(parent, f".{os.path.basename(path)}.lock")
    with runs.file_lock(lock, wait=False, remove=True, what=f"export target {path}"):
        check_target(path, format, overwrite)  # again: it may have appeared meanwhile
        remove_stale_staging(path)
        staging = tempfile.mkdtemp(prefix=_staging_prefix(path), dir=parent)
        try:
            _chmod_as_umask(staging)
            result = os.path.join(staging, os.path.basename(path))
            yield result
            if os.path.isdir(result):
                _chmod_as_umask(result)
            check_target(path, format, overwrite)  # written by something else meanwhile?
            _replace(result, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _replace(source, target):
    """Renames `source` to `target`; an existing `target` is moved aside first and
    removed last, so `target` is never missing a complete version for long."""
    if not os.path.lexists(target):
        os.rename(source, target)
        return
    retired = tempfile.mkdtemp(prefix=_retired_prefix(target), dir=os.path.dirname(target))
    os.rmdir(retired)
    os.rename(target, retired)
    os.rename(source, target)
    if os.path.isdir(retired) and not os.path.islink(retired):
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.remove(retired)


def _chmod_as_umask(folder):
    """Gives a `mkdtemp` folder (mode 0700) the mode a plain `mkdir` would give it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


def _check_diff(max_diff, atol, what, path):
    if not max_diff <= atol:
        raise AssertionError(
            f"the exported {what} differs from the Keras model by {max_diff:.3g} "
            f"(> atol={atol:g}); nothing was written to {path}."
        )


def _main_prediction(model, sample):
    outputs = model.predict(np.asarray(sample, dtype="float32"), verbose=0)
    return np.asarray(outputs[0] if isinstance(outputs, (list, tuple)) else outputs)


# ---------------------------------------------------------------------- SavedModel


def export_saved_model(model, path, *, sample=None, overwrite=False, atol=1e-5):
    """Exports `model` with `model.export` (endpoint `serve`), checked, atomically.

    Args:
        model: keras.Model. The model to export.
        path: str or path-like. The SavedModel folder to create.
        sample: array or None. A batch to check the reloaded model on; `None` skips
            the check.
        overwrite: bool. Replace an existing `path`. Defaults to False.
        atol: float. Largest absolute difference accepted. Defaults to 1e-5.

    Returns:
        The largest |serve(sample) - predict(sample)|, or None without a sample.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False.
        AssertionError: the reloaded model differs by more than `atol`.
    """
    with _staged(path, overwrite) as staging:
        model.export(staging, format="tf_saved_model", verbose=False)
        max_diff = None
        if sample is not None:
            max_diff = saved_model_max_diff(model, staging, sample)
            _check_diff(max_diff, atol, "SavedModel", path)
    return max_diff


def saved_model_max_diff(model, path, sample):
    """Reloads the SavedModel at `path`; the largest |serve(sample) - predict(sample)|."""
    import tensorflow as tf

    reloaded = tf.saved_model.load(os.fspath(path))
    sample = np.asarray(sample, dtype="float32")
    served = tf.nest.flatten(reloaded.serve(tf.constant(sample)))
    expected = tf.nest.flatten(model.predict(sample, verbose=0))
    if len(served) != len(expected):
        raise AssertionError(
            f"the SavedModel has {len(served)} outputs, the Keras model {len(expected)}."
        )
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(served, expected))


def _mask_rule(model):
    """`"argmax"` for a softmax (or several logit channels), else `"threshold"`."""
    import keras

    output_layer = model.get_layer(model.output_names[0])
    inner_models = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if not isinstance(output_layer, (keras.layers.Softmax, keras.layers.Activation)) \
            and len(inner_models) == 1:
        return _mask_rule(inner_models[0])  # a serving_model wraps the model
    if isinstance(output_layer, keras.layers.Softmax):
        return "argmax"
    if isinstance(output_layer, keras.layers.Activation) and output_layer.get_config()[
            "activation"] == "sigmoid":
        return "threshold"
    channels_first = inference.model_data_format(model) == "channels_first"
    channels = model.outputs[0].shape[1 if channels_first else -1]
    return "argmax" if channels > 1 else "logit_threshold"


RAW_DTYPES = ("float32", "uint8", "uint16", "int16")


def serving_module(model, threshold=0.5, segment=None):
    """A `tf.Module` with the `probabilities` and `mask` functions of `export_serving`,
    and `segment` (raw images, `serving.segment_function`) when given."""
    import tensorflow as tf

    data_format = inference.model_data_format(model)
    channel_axis = 1 if data_format == "channels_first" else -1
    input_shape = list(model.inputs[0].shape)
    channels = input_shape[channel_axis]
    rank = len(input_shape)
    expected = ("(batch, channels, " if data_format == "channels_first" else "(batch, ") + \
        ", ".join(str(size or "any") for size in (
            input_shape[2:] if data_format == "channels_first" else input_shape[1:-1])) + \
        (")" if data_format == "channels_first" else f", {channels})")
    rule = _mask_rule(model)

    class Serving(tf.Module):
        """Holds no Keras layers (saving a Keras layer tree as SavedModel objects took
        30 of an EfficientNetB0 export's 40 s on 2 cores): `export_serving` tracks the
        TensorFlow variables its signatures read instead."""

        def _checked(self, images):
            images = tf.convert_to_tensor(images, tf.float32)
            shape = tf.shape(images)
            right_rank = tf.equal(tf.rank(images), rank)
            # Every axis at least 1 (no empty batch or image) and the right channels.
            right_shape = tf.cond(
                right_rank,
                lambda: tf.logical_and(tf.equal(shape[channel_axis], channels),
                                       tf.reduce_all(shape >= 1)),
                lambda: tf.constant(False))
            check = tf.debugging.Assert(
                right_shape,
                [f"attunet_keras: expected a non-empty {rank}-D float32 batch of images "
                 f"{expected} with {channels} channel(s) on axis {channel_axis}; "
                 "received shape", shape], summarize=8)
            with tf.control_dependencies([check]):
                images = tf.identity(images)
            return tf.ensure_shape(images, [None] + input_shape[1:])

        def _predict(self, images):
            outputs = model(self._checked(images), training=False)
            return outputs[0] if isinstance(outputs, (list, tuple)) else outputs

        @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="images")])
        def probabilities(self, images):
            return {"probabilities": self._predict(images)}

        @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="images")])
        def mask(self, images):
            # One trace of the model for both signatures: mask calls probabilities.
            prediction = self.probabilities(images)["probabilities"]
            if rule == "argmax":
                labels = tf.argmax(prediction, axis=channel_axis)
                labels = tf.expand_dims(labels, channel_axis)
            elif rule == "threshold":
                labels = prediction > threshold
            else:
                labels = prediction > 0.0
            return {"mask": tf.cast(labels, tf.uint8)}

    module = Serving()
    if segment is not None:
        _add_segment(module, segment, rank, channels, model)
    return module


def _add_segment(module, segment, rank, channels, model):
    """`segment_<dtype>` for every raw dtype, and `segment_png` for 2D models."""
    import tensorflow as tf

    n_label = inference.output_channels(model)
    shape = [None] * (rank - 1) + [channels]
    # One trace of the graph: every raw dtype casts and calls the float32 function.
    module.segment_float32 = tf.function(
        segment, input_signature=[tf.TensorSpec(shape, tf.float32, name="images")])
    for dtype in RAW_DTYPES[1:]:
        setattr(module, f"segment_{dtype}", tf.function(
            lambda images: module.segment_float32(tf.cast(images, tf.float32)),
            input_signature=[tf.TensorSpec(shape, dtype, name="images")]))
    if rank != 4:
        return

    def one_png(contents):
        depth = tf.io.decode_raw(tf.strings.substr(contents, 24, 1), tf.uint8)[0]
        image = tf.cond(
            tf.equal(depth, 16),
            lambda: tf.cast(tf.io.decode_png(contents, channels=channels,
                                             dtype=tf.uint16), tf.float32),
            lambda: tf.cast(tf.io.decode_png(contents, channels=channels), tf.float32))
        mask = module.segment_float32(image[None])["mask"][0]
        if n_label == 1:
            mask = mask * 255  # as `predict` writes a binary mask: 0/255
        return tf.io.encode_png(mask)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def segment_png(image_bytes):
        return {"mask_bytes": tf.map_fn(one_png, image_bytes,
                                        fn_output_signature=tf.string)}

    module.segment_png = segment_png


def export_serving(model, path, *, sample=None, threshold=0.5, overwrite=False,
                   atol=1e-5, segment=None):
    """Exports `model` for TF Serving: `path/1/` with `probabilities` and `mask`, and
    with `segment` (`(callable, check)` of `segment_signatures`) the end-to-end
    signatures `segment` (float32), `segment_uint8`, `segment_uint16`,
    `segment_int16` and, for 2D models, `segment_png`; `check(reloaded)` compares the
    reloaded signatures with the library's prediction before the export is renamed
    into place.

    Returns:
        The largest |probabilities(sample) - predict(sample)| (None without a sample).
    """
    import tensorflow as tf

    module = serving_module(model, threshold, segment and segment[0])
    signatures = {
        "serving_default": module.probabilities.get_concrete_function(),
        "probabilities": module.probabilities.get_concrete_function(),
        "mask": module.mask.get_concrete_function(),
    }
    if segment is not None:
        for dtype in RAW_DTYPES:
            name = "segment" if dtype == "float32" else f"segment_{dtype}"
            signatures[name] = getattr(module, f"segment_{dtype}").get_concrete_function()
        if hasattr(module, "segment_png"):
            signatures["segment_png"] = module.segment_png.get_concrete_function()
    # The tf.Variables under the Keras variables the signatures read, as Keras's own
    # ExportArchive tracks them: TensorFlow 1 loaders (TF Serving, saved_model_cli)
    # find a function's variables only then.
    used = {}
    for function in signatures.values():
        for variable in function.variables:
            used[id(variable)] = variable
    module.signature_variables = list(used.values())
    with _staged(path, overwrite) as staging:
        version = os.path.join(staging, SERVING_VERSION)
        tf.saved_model.save(module, version, signatures=signatures)
        if segment is not None:
            segment[1](tf.saved_model.load(version))
        max_diff = None
        if sample is not None:
            reloaded = tf.saved_model.load(version)
            sample = np.asarray(sample, dtype="float32")
            served = reloaded.signatures["probabilities"](images=tf.constant(sample))
            expected = _main_prediction(model, sample)
            max_diff = float(np.max(np.abs(served["probabilities"].numpy() - expected)))
            _check_diff(max_diff, atol, "SavedModel", path)
            mask = reloaded.signatures["mask"](images=tf.constant(sample))["mask"]
            if mask.dtype != tf.uint8:
                raise AssertionError(f"the mask signature returned {mask.dtype}, not uint8.")
    return max_diff


# ---------------------------------------------------------------------------- ONNX


def export_onnx(model, path, *, sample=None, overwrite=False, atol=1e-4, segment=None):
    """Exports `model` to ONNX (tf2onnx); checked with ONNX Runtime when installed.

    With `segment` (`(normalisation rules, threshold, the model before serving_model,
    its patch or None)`)
    the file is instead the end-to-end graph of `serving.segment_function` without a
    patch: input `images` (raw float32, channels last, any batch and size), outputs
    `probabilities` and `mask`; every image whole (tf2onnx does not convert the
    sliding-window loop with the network inside it: see `SEGMENT_OUTSIDE`), checked
    with ONNX Runtime against `serving.reference_segment` at `segment_sizes`.

    Returns:
        The largest |onnxruntime(sample) - predict(sample)|, or None when there is no
        sample or ONNX Runtime is not installed (or for a segment graph).
    """
    try:
        import tf2onnx  # noqa: F401
    except ImportError as error:
        raise ValueError(
            "ONNX export needs tf2onnx: pip install 'attunet_keras[onnx]' "
            "(tf2onnx and onnxruntime)."
        ) from error
    if not str(path).endswith(".onnx"):
        raise ValueError(f"the ONNX file {path!r} must end in .onnx.")
    if segment is not None:
        return _export_onnx_segment(model, path, overwrite, *segment)
    with _staged(path, overwrite, "onnx") as staging:
        if sample is not None:
            model.predict(np.asarray(sample, dtype="float32"), verbose=0)  # builds it
        else:
            model.predict(_zeros_like_input(model), verbose=0)
        model.export(staging, format="onnx", verbose=False)
        max_diff = None
        if sample is not None:
            max_diff = onnx_max_diff(model, staging, sample)
            if max_diff is not None:
                _check_diff(max_diff, atol, "ONNX model", path)
    return max_diff


SEGMENT_OUTSIDE = (
    "sliding windows stay outside the {format} graph ({why}): it runs every image whole; "
    "for images larger than the patch, export without --segment and run windows with "
    "attunet_keras.inference.blend_windows on images normalised by "
    "attunet_keras.data.planning.normalize_case"
)


def _segment_whole(model, rules, threshold, runner):
    """The tf.function graph of `segment` with every image whole (2D models)."""
    from attunet_keras import serving

    serving.check_rules(rules)
    if inference.is_volume_model(model):
        raise ValueError("a 3D model's segment runs sliding windows, which ONNX and "
                         "LiteRT exports cannot hold; export --format savedmodel.")
    return serving.segment_function(model, rules, None, threshold=threshold, runner=runner)


def _check_segment_runs(model, rules, run, sizes, what, path, patch=None, overlap=0.5):
    """`run(raw)` -> `{"probabilities", "mask"}` against `serving.reference_segment`
    (sliding windows of `patch` above it, None: every image whole) on random raw
    images of each size: the largest difference, refused above 1e-4."""
    from attunet_keras import serving

    channels = inference.input_channels(model)
    rng = np.random.default_rng(0)
    worst = 0.0
    for size in sizes:
        raw = (rng.random((1,) + tuple(size) + (channels,)) * 1000).astype("float32")
        served = run(raw)
        expected = serving.reference_segment(model, raw[0], rules, patch, overlap)
        probabilities = np.asarray(served["probabilities"])[0]
        if probabilities.shape != expected.shape:
            raise AssertionError(
                f"the {what} segment graph gave {probabilities.shape} for a "
                f"{'x'.join(map(str, size))} image; nothing written at {path}.")
        difference = float(np.max(np.abs(probabilities - expected)))
        if not difference <= 1e-4:
            raise AssertionError(
                f"the {what} segment graph differs from attunet-keras predict by "
                f"{difference:.3g} on a {'x'.join(map(str, size))} image (more than "
                f"1e-4); nothing written at {path}.")
        worst = max(worst, difference)
    return worst


def _export_onnx_segment(model, path, overwrite, rules, threshold, original, patch):
    import tensorflow as tf
    import tf2onnx

    function = _segment_whole(original, rules, threshold, model)
    channels = inference.input_channels(original)
    spec = [tf.TensorSpec((None, None, None, channels), tf.float32, name="images")]
    with _staged(path, overwrite, "onnx") as staging:
        tf2onnx.convert.from_function(tf.function(function, input_signature=spec),
                                      input_signature=spec, output_path=os.fspath(staging))
        try:
            import onnxruntime
        except ImportError:
            return None
        session = onnxruntime.InferenceSession(os.fspath(staging),
                                               providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]

        def run(raw):
            return dict(zip(names, session.run(None, {"images": raw})))

        patch = patch or inference.own_size(original) or (64, 64)
        return _check_segment_runs(original, rules, run, segment_sizes(tuple(patch), 2),
                                   "ONNX", path)


def onnx_max_diff(model, path, sample):
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(os.fspath(path),
                                           providers=["CPUExecutionProvider"])
    sample = np.asarray(sample, dtype="float32")
    output = session.run(None, {session.get_inputs()[0].name: sample})[0]
    return float(np.max(np.abs(output - _main_prediction(model, sample))))


def _zeros_like_input(model):
    shape = [1] + [16 if size is None else size for size in model.inputs[0].shape[1:]]
    return np.zeros(shape, dtype="float32")


# -------------------------------------------------------------------------- LiteRT


def export_litert(model, path, *, quantize=None, representative=None, sample=None,
                  overwrite=False, atol=1e-4, segment=None):
    """Exports `model` to a LiteRT (`.tflite`) file, float32 or int8-quantized.

    Args:
        model: keras.Model with fixed image sizes (LiteRT needs a static input).
        path: str. The `.tflite` file.
        quantize: None or `"int8"`: post-training quantization of weights and
            activations, calibrated on `representative`; input and output stay float32.
        representative: array (N, ...) of training images shaped like the model's
            input. Required with `quantize="int8"`.
        sample: array or None. A batch to compare the float32 export with Keras.
        overwrite: bool. Replace an existing file.
        atol: float. Largest difference accepted for the float32 export.
        segment: None or `(normalisation rules, threshold)`: the file is instead the
            end-to-end graph of `serving.segment_function` at the model's own size
            (signature `segment`: input `images`, raw float32 `(1, *size, C)`
            channels last; outputs `probabilities` and `mask`), checked with the
            interpreter against `serving.reference_segment`.

    Returns:
        The largest |litert(sample) - predict(sample)| for float32 exports with a
        sample, else None (an int8 model is judged by its Dice, see the README).
    """
    import tensorflow as tf

    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r} is not supported; expected None or 'int8'.")
    if not str(path).endswith(".tflite"):
        raise ValueError(f"the LiteRT file {path!r} must end in .tflite.")
    input_shape = list(model.inputs[0].shape)
    if any(size is None for size in input_shape[1:]):
        raise ValueError(
            f"LiteRT export needs fixed image sizes; the model's input is "
            f"{tuple(input_shape)}. Build it with sizes (or export a training run)."
        )
    if quantize == "int8" and (representative is None or len(representative) == 0):
        raise ValueError(
            "int8 quantization needs a representative set of training images "
            "(representative=...; on the command line, --run DIR provides it)."
        )
    if segment is not None:
        if quantize is not None:
            raise ValueError("--segment with --quantize int8: an int8 LiteRT model takes "
                             "normalised images; leave out one of them.")
        return _export_litert_segment(model, path, overwrite, *segment)
    options = {}
    if quantize == "int8":
        images = np.asarray(representative, dtype="float32")

        def calibration():
            for image in images:
                yield [image[None]]

        options = dict(optimizations=[tf.lite.Optimize.DEFAULT],
                       representative_dataset=calibration,
                       target_spec={"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]})
    with _staged(path, overwrite, "litert") as staging:
        model.export(staging, format="litert", verbose=False,
                     input_signature=[tf.TensorSpec([1] + input_shape[1:], tf.float32)],
                     **options)
        max_diff = None
        if sample is not None and quantize is None:
            predicted = litert_predict(staging, sample)
            max_diff = float(np.max(np.abs(predicted - _main_prediction(model, sample))))
            _check_diff(max_diff, atol, "LiteRT model", path)
    return max_diff


def _export_litert_segment(model, path, overwrite, rules, threshold):
    """The segment graph at the model's static size, converted from a SavedModel (the
    converter's route that freezes the module's variables)."""
    import tensorflow as tf

    size = inference.own_size(model)
    channels = inference.input_channels(model)
    function = _segment_whole(model, rules, threshold, model)
    module = tf.Module()
    module.weights = [getattr(variable, "value", variable) for variable in model.variables]
    module.segment = tf.function(function, input_signature=[
        tf.TensorSpec((1,) + size + (channels,), tf.float32, name="images")])
    with _staged(path, overwrite, "litert") as staging, \
            tempfile.TemporaryDirectory() as folder:
        tf.saved_model.save(module, folder,
                            signatures={"segment": module.segment.get_concrete_function()})
        with open(staging, "wb") as file:
            file.write(tf.lite.TFLiteConverter.from_saved_model(folder).convert())
        runner = litert_interpreter(staging).get_signature_runner("segment")
        return _check_segment_runs(model, rules, lambda raw: runner(images=raw), [size],
                                   "LiteRT", path)


def litert_interpreter(path, threads=None):
    """A LiteRT interpreter for `path` (TensorFlow's, with its XNNPACK delegate)."""
    import warnings

    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tf.lite's deprecation notice
        interpreter = tf.lite.Interpreter(model_path=os.fspath(path), num_threads=threads)
    interpreter.allocate_tensors()
    return interpreter


def litert_predict(path_or_interpreter, images):
    """Runs a batch through a single-image LiteRT model, one image at a time."""
    interpreter = path_or_interpreter
    if isinstance(interpreter, (str, os.PathLike)):
        interpreter = litert_interpreter(interpreter)
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    outputs = []
    for image in np.asarray(images, dtype="float32"):
        interpreter.set_tensor(input_index, image[None])
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(output_index)[0].copy())
    return np.stack(outputs)


# --------------------------------------------------------------------------- front


def export_model(model, path, *, format="savedmodel", quantize=None, representative=None,
                 sample=None, threshold=0.5, overwrite=False, normalization=None,
                 patch=None):
    """Exports in one of `FORMATS` (SavedModel = TF Serving's layout); see the module.

    SavedModel and ONNX get `inference.serving_model(model)` (any batch and size, main
    output); LiteRT gets the main output at the model's own, static size. With
    `normalization` (the per-channel rules of `serving.normalization_rules`) the
    SavedModel also gets the end-to-end `segment` signatures (raw images in; sliding
    windows of `patch` above it, `None`: every image whole), checked against
    `serving.reference_segment` at `segment_sizes`; an ONNX or LiteRT file is then
    the end-to-end graph instead of the plain model (every image whole; LiteRT at
    the model's own size), checked the same way; the return value is then the
    largest difference from `reference_segment`.
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not supported; expected one of {FORMATS}.")
    check_backend(format)
    if quantize is not None and format != "litert":
        raise ValueError(
            f"quantize={quantize!r} applies to LiteRT only; use format='litert'."
        )
    check_target(path, format, overwrite)
    if format == "savedmodel":
        served = inference.serving_model(model)
        segment = None
        if normalization is not None and not inference.needs_static_sizes(model):
            segment = segment_signatures(model, normalization, patch, threshold,
                                         runner=served)
        return export_serving(served, path, sample=sample, threshold=threshold,
                              overwrite=overwrite, segment=segment)
    if format == "onnx":
        return export_onnx(inference.serving_model(model), path, sample=sample,
                           overwrite=overwrite,
                           segment=None if normalization is None
                           else (normalization, threshold, model, patch))
    return export_litert(main_output_model(model), path, quantize=quantize,
                         representative=representative, sample=sample,
                         overwrite=overwrite,
                         segment=None if normalization is None else (normalization, threshold))


def segment_sizes(patch, rank):
    """The sizes the export checks `segment` at: an odd size (97x131), the patch,
    3x the patch along the first axis, 1x1 and 1xN (the patch's first side)."""
    patch = tuple(patch) if patch is not None else (32,) * rank
    odd = (97, 131) if rank == 2 else (13, 17, 19)
    return [odd, patch, (3 * patch[0],) + patch[1:], (1,) * rank,
            (1,) * (rank - 1) + (patch[0] + 5,)]


def segment_signatures(model, normalization, patch=None, threshold=0.5, overlap=0.5,
                       runner=None):
    """`(segment callable, check)` for `export_serving`: the graph of
    `serving.segment_function`, and a check of the reloaded export against the
    library's prediction (`serving.reference_segment`) on random raw images at
    `segment_sizes`: probabilities within 1e-4, masks equal but for ties."""
    from attunet_keras import serving

    serving.check_rules(normalization)
    rank = 3 if inference.is_volume_model(model) else 2
    function = serving.segment_function(model, normalization, patch, overlap, threshold,
                                        runner=runner)

    def check(reloaded):
        import tensorflow as tf

        signature = reloaded.signatures["segment"]
        _check_segment_runs(model, normalization,
                            lambda raw: signature(images=tf.constant(raw)),
                            segment_sizes(patch, rank), "SavedModel", "the target",
                            patch, overlap)
    return function, check


def check_backend(format):
    """Refuses to export under another Keras backend than TensorFlow, saying what to do."""
    import keras

    current = keras.backend.backend()
    if current != "tensorflow":
        raise ValueError(
            f"export to {format} needs KERAS_BACKEND=tensorflow (the backend in use is "
            f"{current}): SavedModel, ONNX and LiteRT are written from TensorFlow graphs. "
            f"A .keras model saved under {current} loads under TensorFlow: run "
            "KERAS_BACKEND=tensorflow attunet-keras export --model MODEL.keras ..."
        )


def main_output_model(model):
    """`model` with its main output only (the first; deep-supervision heads dropped)."""
    import keras

    if len(model.outputs) == 1:
        return model
    return keras.Model(model.inputs, model.outputs[0], name=model.name)
