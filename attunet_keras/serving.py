"""The end-to-end serving graph: raw intensities in, probabilities and masks out.

`segment_function(model, rules, patch)` is one TensorFlow function that does, inside
the graph, what `attunet-keras predict --patch PATCH` does in NumPy for a run:

1. the run's intensity normalisation per image and channel (`rules`, one per channel:
   `percentile` 1st-99.8th as numpy's linear percentile, `zscore` over the whole image,
   `ct` clip and statistics, `rescale_to_0_1`, `rgb_to_0_1`, `none`);
2. an image (2D) no side of which is longer than the patch: padded at its end to a multiple
   of `2**depth` by reflection, as `numpy.pad(mode="reflect")` (an axis shorter than
   its padding reflected again and again), predicted whole and cropped back;
3. a larger image, and every volume (as `predict` runs volumes): padded to at least the patch (reflection, then zeros), cut into
   windows of the patch at `overlap` (the last flush with the border), each window's
   probabilities weighted by the same Gaussian importance map as
   `inference.predict_sliding_window` (sigma patch / 8, floor 1e-3) and summed in a
   `tf.while_loop`, four windows per model call (as predict), so memory follows the
   windows, not the image;
4. the mask: threshold 0.5 of one channel, or the argmax of several (uint8; uint16
   above 256 classes).

Images are channels_last `(batch, *spatial, channels)` whatever the model's layout.
What has no TensorFlow op stays outside the graph, and `export` says so: the z-score
over a nonzero region (it fills holes in the region, `scipy.ndimage`), resampling to a
run's voxel spacing, and largest-component post-processing
(`attunet_keras.postprocess.apply(labels, decisions, n_label)` is the client's
function for it, the one `predict --postprocess` calls).
"""

import numpy as np

from attunet_keras import inference

OUTSIDE_THE_GRAPH = {
    "zscore_nonzero": "the z-score over the nonzero region (holes filled with "
                      "scipy.ndimage): normalise with attunet_keras.data.planning."
                      "normalize_case and call the `probabilities` signature",
}


def normalization_rules(run_dir=None, normalization=None, channels=1):
    """The per-channel normalisation of a run (its plan's, else the per-image
    percentile scaling every other dataset uses), or `normalization` (a scheme name,
    or one per channel separated by commas) for a model without a run."""
    import os

    from attunet_keras.data import planning

    if normalization is not None:
        schemes = planning.parse_normalization(normalization, ["channel"] * channels)
        if "ct" in schemes:
            raise ValueError("--normalization ct needs the CT statistics of a plan; "
                             "export the run (--run) that recorded them.")
        return [{"scheme": scheme} for scheme in schemes]
    if run_dir is not None and os.path.isfile(os.path.join(run_dir, planning.PLAN_FILE)):
        return planning.read_plan(os.path.join(run_dir, planning.PLAN_FILE))["normalization"]
    return [{"scheme": "percentile"} for _ in range(channels)]


def check_rules(rules):
    """Refuses a step with no TensorFlow op, naming it and what to do instead."""
    for rule in rules:
        if rule["scheme"] == "zscore" and rule.get("use_nonzero_mask"):
            raise ValueError("segment cannot normalise inside the graph: "
                             + OUTSIDE_THE_GRAPH["zscore_nonzero"] + ".")


def _percentile(values, q):
    """numpy's linear percentile `q` of `values` (batch, n) along its last axis."""
    import tensorflow as tf

    n = tf.shape(values)[-1]
    ordered = tf.sort(values, axis=-1)
    position = tf.cast(n - 1, tf.float64) * (q / 100.0)
    low = tf.cast(tf.floor(position), tf.int32)
    high = tf.minimum(low + 1, n - 1)
    fraction = tf.cast(position - tf.floor(position), values.dtype)
    below = tf.gather(ordered, low, axis=-1)
    above = tf.gather(ordered, high, axis=-1)
    return below + fraction * (above - below)


def normalize(images, rules):
    """`images` (batch, *spatial, C) float32 normalised per image and channel."""
    import tensorflow as tf

    channels = []
    for index, rule in enumerate(rules):
        values = images[..., index]
        flat = tf.reshape(values, [tf.shape(values)[0], -1])
        shape = [-1] + [1] * (len(values.shape) - 1)
        scheme = rule["scheme"]
        if scheme == "percentile":
            low = tf.reshape(_percentile(flat, 1.0), shape)
            high = tf.reshape(_percentile(flat, 99.8), shape)
            values = tf.clip_by_value((values - low) / tf.maximum(high - low, 1e-6), 0.0, 1.0)
        elif scheme == "zscore":
            mean = tf.reshape(tf.reduce_mean(flat, -1), shape)
            std = tf.reshape(tf.math.reduce_std(flat, -1), shape)
            values = (values - mean) / tf.maximum(std, 1e-8)
        elif scheme == "ct":
            values = tf.clip_by_value(values, rule["clip"][0], rule["clip"][1])
            values = (values - rule["mean"]) / max(rule["std"], 1e-8)
        elif scheme == "rescale_to_0_1":
            low = tf.reshape(tf.reduce_min(flat, -1), shape)
            high = tf.reshape(tf.reduce_max(flat, -1), shape)
            values = (values - low) / tf.maximum(high - low, 1e-8)
        elif scheme == "rgb_to_0_1":
            values = tf.clip_by_value(values / 255.0, 0.0, 1.0)
        elif scheme != "none":
            raise ValueError(f"normalization scheme {scheme!r} has no graph version.")
        channels.append(values)
    return tf.stack(channels, axis=-1)


def _reflect_indices(size, total):
    """Indices of `numpy.pad(mode="reflect")` of an axis of `size` to `total`."""
    import tensorflow as tf

    positions = tf.range(total)
    period = tf.maximum(2 * (size - 1), 1)
    folded = positions % period
    reflected = tf.where(folded < size, folded, period - folded)
    return tf.where(size > 1, reflected, tf.zeros_like(positions))


def pad_reflect_to(images, sizes):
    """Pads each spatial axis at its end to `sizes` as numpy's reflect mode does."""
    import tensorflow as tf

    for axis, size in enumerate(sizes, start=1):
        images = tf.gather(images, _reflect_indices(tf.shape(images)[axis], size), axis=axis)
    return images


def pad_to_at_least(images, patch):
    """`inference._pad_to_at_least`: reflection as far as it goes (size - 1), then
    zeros, at the end of each spatial axis shorter than the patch."""
    import tensorflow as tf

    shape = tf.shape(images)
    rank = len(patch)
    reflected = [[0, 0]] * (rank + 2)
    zeros = [[0, 0]] * (rank + 2)
    reflected, zeros = list(reflected), list(zeros)
    for axis, side in enumerate(patch, start=1):
        short = tf.maximum(side - shape[axis], 0)
        reach = tf.minimum(short, shape[axis] - 1)
        reflected[axis] = [0, reach]
        zeros[axis] = [0, short - reach]
    return tf.pad(tf.pad(images, reflected, mode="REFLECT"), zeros)


def _window_starts(extent, side, overlap):
    """`inference._window_starts` in the graph."""
    import tensorflow as tf

    step = max(1, int(round(side * (1.0 - overlap))))
    count = (extent - side) // step + 1
    starts = tf.range(count) * step
    last = extent - side
    return tf.cond(starts[-1] < last, lambda: tf.concat([starts, [last]], 0),
                   lambda: starts)


def segment_function(model, rules, patch, overlap=0.5, threshold=0.5, runner=None):
    """The `segment` computation for `model` (2D or 3D, either layout) as a Python
    callable on `(batch, *spatial, C)` float32 raw intensities, to wrap in a
    `tf.function`: returns `{"probabilities", "mask"}`. `runner` is the model of free
    sizes that predicts (default: `inference.serving_model(model)`); an export passes
    the one its other signatures use, so that the SavedModel holds one copy of the
    weights (TensorFlow 1 loaders, as TF Serving and saved_model_cli, find a variable
    by name)."""
    import tensorflow as tf

    check_rules(rules)
    main = runner if runner is not None else inference.serving_model(model)
    channels_first = inference.model_data_format(model) == "channels_first"
    multiple = inference.size_multiple(model)
    rank = 3 if inference.is_volume_model(model) else 2
    if patch is None and rank == 3:
        raise ValueError("a 3D model's segment runs sliding windows: give the patch.")
    patch = None if patch is None else tuple(int(side) for side in patch)
    importance = (None if patch is None
                  else tf.constant(inference._importance_map(patch, "gaussian")))
    n_label = inference.output_channels(model)

    def run(batch):
        if channels_first:
            batch = tf.transpose(batch, [0, rank + 1] + list(range(1, rank + 1)))
        outputs = main(batch, training=False)
        outputs = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        if channels_first:
            outputs = tf.transpose(outputs, [0] + list(range(2, rank + 2)) + [1])
        return tf.cast(outputs, tf.float32)

    def whole(images, size):
        # the ceiling of positive numbers only: ONNX divides integers towards zero
        target = [(size[axis] + multiple - 1) // multiple * multiple for axis in range(rank)]
        probabilities = run(pad_reflect_to(images, target))
        return tf.slice(probabilities, [0] * (rank + 2), [-1] + [size[a] for a in range(rank)]
                        + [-1])

    def windows(images, size):
        padded = pad_to_at_least(images, patch)
        extents = tf.shape(padded)[1:rank + 1]
        starts = [_window_starts(extents[axis], patch[axis], overlap) for axis in range(rank)]
        grids = tf.meshgrid(*starts, indexing="ij")
        corners = tf.stack([tf.reshape(grid, [-1]) for grid in grids], axis=1)
        batch = tf.shape(padded)[0]
        # Windows four at a time (as predict_sliding_window's batch_size), gathered and
        # summed with the *_nd ops, which touch a window's pixels only (adding each window
        # padded to the image's size cost the image's size per window: 3.6x slower than
        # predict at 4096x4096). Spatial axes first, so that indices name pixels and
        # every image of the batch is read and summed at once.
        per_step = 4
        spatial_first = list(range(1, rank + 1)) + [0, rank + 1]
        source = tf.transpose(padded, spatial_first)  # (*extents, batch, C)
        total = tf.zeros(tf.concat([extents, [batch, n_label]], 0), tf.float32)
        weights = tf.zeros(extents, tf.float32)
        offsets = tf.stack(tf.meshgrid(*[tf.range(side) for side in patch], indexing="ij"),
                           axis=-1)
        count = tf.shape(corners)[0]

        def body(index, total, weights):
            chunk = corners[index:tf.minimum(index + per_step, count)]
            where = offsets[None] + tf.reshape(chunk, [-1] + [1] * rank + [rank])
            windows = tf.gather_nd(source, where)  # (n, *patch, batch, C)
            n = tf.shape(chunk)[0]
            flat = tf.reshape(tf.transpose(windows, [0, rank + 1] + list(range(1, rank + 1))
                                           + [rank + 2]),
                              tf.concat([[n * batch], patch, [-1]], 0))
            predicted = run(flat) * importance[None, ..., None]  # (n * batch, *patch, K)
            predicted = tf.reshape(predicted, tf.concat([[n, batch], patch, [n_label]], 0))
            predicted = tf.transpose(predicted, [0] + list(range(2, rank + 2)) + [1, rank + 2])
            total = tf.tensor_scatter_nd_add(total, where, predicted)
            weights = tf.tensor_scatter_nd_add(
                weights, where, tf.tile(importance[None], [n] + [1] * rank))
            return index + per_step, total, weights

        _, total, weights = tf.while_loop(
            lambda index, *_: index < count, body,
            [tf.constant(0), total, weights],
            shape_invariants=[tf.TensorShape([]), tf.TensorShape([None] * (rank + 2)),
                              tf.TensorShape([None] * rank)])
        probabilities = tf.transpose(total / weights[..., None, None],
                                     [rank] + list(range(rank)) + [rank + 1])
        return tf.slice(probabilities, [0] * (rank + 2),
                        [-1] + [size[a] for a in range(rank)] + [-1])

    def segment(images):
        images = tf.cast(images, tf.float32)
        images = normalize(images, rules)
        size = tf.shape(images)[1:rank + 1]
        if rank == 3:  # volumes always by windows, as predict_nifti
            probabilities = windows(images, size)
        elif patch is None:  # no patch: every image whole
            probabilities = whole(images, size)
        else:
            larger = tf.reduce_any(size > tf.constant(patch))
            probabilities = tf.cond(larger, lambda: windows(images, size),
                                    lambda: whole(images, size))
        if n_label == 1:
            mask = tf.cast(probabilities > threshold, tf.uint8)
        else:
            dtype = tf.uint8 if n_label <= 256 else tf.uint16
            mask = tf.cast(tf.argmax(probabilities, axis=-1), dtype)[..., None]
        return {"probabilities": probabilities, "mask": mask}

    return segment


def reference_segment(model, image, rules, patch=None, overlap=0.5):
    """What `attunet-keras predict` gives for one raw `(*spatial, C)` image: the
    rules' normalisation in NumPy (`data.planning.normalize_case`), then, for an
    image, `inference.predict_image`'s choice (whole, or sliding windows of `patch`
    when a side is longer) and, for a volume, sliding windows always (as
    `predict_nifti`): the library's probabilities `segment` must equal."""
    from attunet_keras.data import planning

    normalized = planning.normalize_case(np.asarray(image, "float32"), rules)
    rank = normalized.ndim - 1
    larger = patch is not None and any(s > p for s, p in zip(normalized.shape, patch))
    if rank == 3 or larger:
        return inference.predict_sliding_window(model, normalized, tuple(patch),
                                                overlap=overlap, normalized=True)
    return inference.predict_probabilities(model, normalized, normalized=True)
