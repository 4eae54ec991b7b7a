"""The streaming `tf.data` pipelines of training and validation.

Training: the training items' indices are shuffled every epoch -> each is read
(decoded and normalised) in parallel -> `patch_count` random patches of the tile size
are cut from it, a `foreground_fraction` share of them centred on a labelled pixel
(nnU-Net's foreground oversampling) -> patches are shuffled across images -> image
and target are augmented together (flips, and 90-degree rotations on square tiles)
-> batched -> prefetched. Only a few images and a small buffer of patches are in
memory at any time, however many files the dataset has.

Validation: a bounded set of held-out batches, the same every epoch: the held-out
images cut into non-overlapping tiles when they hold at most `--val-batches` batches
of them, else that many batches of patches drawn once (`validation_dataset`).

Reading goes through one Python reader per format (PIL, tifffile, nibabel) inside
`tf.numpy_function`: the decoders release the GIL, the per-file checks are those of
`check-data`, and `benchmarks/input_pipeline.py` measures it at several times the
model's training throughput. A file that fails mid-epoch stops the pipeline with an
error naming it (`read_failure` finds it in TensorFlow's error).
"""

import itertools
import os
import re

import numpy as np

from attunet_keras import _validation
from attunet_keras.data.files import label_dtype

FOREGROUND_FRACTION = 0.33
# Batches of held-out patches validated per epoch, at most (nnU-Net validates 50).
VAL_BATCHES = 50
PATCH_SHUFFLE_BUFFER = 64
# An environment variable naming a file: every read appends "<pid>\t<item name>" to it
# (a diagnostic of which worker read which file).
READ_LOG_ENV = "ATTUNET_KERAS_READ_LOG"
_FAILURE = "cannot read dataset item"


def training_dataset(dataset, batch_size, *, seed=0, data_format="channels_last",
                     outputs=1, patches_per_image=None,
                     foreground_fraction=FOREGROUND_FRACTION, shard=None):
    """Endless, shuffled, augmented batches of random patches of the training items.

    Args:
        dataset: SegmentationData.
        batch_size: int. Patches per batch.
        seed: int. Seed of the file order, the patches and the augmentation.
        data_format: str. Layout of the batches. Defaults to `"channels_last"`.
        outputs: int. Outputs of the model; with more than one (deep supervision)
            each batch's target is repeated as a tuple. Defaults to 1.
        patches_per_image: int or None. Patches drawn from each image per epoch;
            `None`: as many as its area holds tiles (`SegmentationData.patch_count`).
        foreground_fraction: float in [0, 1]. Share of patches centred on a labelled
            (non-zero) pixel. Defaults to 0.33.
        shard: (int, int) or None. `(number of shards, this shard)`: this pipeline
            reads only its share of the files, every `shards`-th one (multi-worker
            training); there must be at least as many training images as shards.

    Returns:
        A `tf.data.Dataset` of `(images, targets)`; pass `steps_per_epoch` to `fit`.
    """
    import tensorflow as tf

    check_pipeline_arguments(batch_size, patches_per_image, foreground_fraction)
    data_format = _validation.resolve_data_format(data_format)
    tile = dataset.tile_shape
    labels = tf.as_dtype(label_dtype(dataset.n_label))
    files = tf.data.Dataset.zip((file_order(dataset, seed, patches_per_image, shard),
                                 tf.data.Dataset.random(seed=seed)))

    def cut(index, count, draw):
        image, mask = read_item(dataset, int(index))
        rng = np.random.default_rng(int(draw) % 2**63)
        return sample_patches(image, mask, tile, int(count), foreground_fraction, rng)

    def read(pair, draw):
        images, masks = tf.numpy_function(cut, [pair[0], pair[1], draw],
                                          [tf.float32, labels], stateful=False)
        images.set_shape((None,) + tile + (dataset.in_channels,))
        masks.set_shape((None,) + tile)
        return images, masks

    patches = files.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    patches = patches.unbatch().shuffle(max(PATCH_SHUFFLE_BUFFER, 4 * batch_size),
                                        seed=seed)
    patches = tf.data.Dataset.zip((patches, tf.data.Dataset.random(seed=seed + 1).batch(2)))
    patches = patches.map(
        lambda pair, pair_seed: _augment(
            pair[0], _targets(pair[1], dataset.n_label), pair_seed, tile),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _finish(patches.batch(batch_size, drop_remainder=True), data_format, outputs)


def validation_dataset(dataset, batch_size, *, data_format="channels_last", outputs=1,
                       batches=None, seed=0):
    """The held-out batches of the per-epoch validation: the same every epoch.

    When the held-out images hold at most `batches` batches of non-overlapping tiles
    (or `batches` is None), they are cut into those tiles (padded by reflection at
    their bottom and right, `grid_tiles`) and read once per epoch, in order. Otherwise
    `batches * batch_size` patches are drawn once, with `seed`, as training draws them
    (a `FOREGROUND_FRACTION` share centred on labelled pixels), from as few held-out
    images as give that many (each read once), and kept in memory: validation then
    costs the same at 400 held-out images as at 40 (nnU-Net validates a fixed 50
    batches of patches per epoch). The whole held-out images are scored at the end of
    a run, and by `evaluate`, by sliding windows.
    """
    import tensorflow as tf

    _validation.check_int("batch_size", batch_size, 1)
    if batches is not None:
        _validation.check_int("batches", batches, 1)
    data_format = _validation.resolve_data_format(data_format)
    tile = dataset.tile_shape
    labels = tf.as_dtype(label_dtype(dataset.n_label))
    count = sum(int(np.prod([-(-extent // side) for extent, side in
                             zip(dataset.items[index].shape, tile)])) for index in dataset.val)
    if batches is not None and count > batches * batch_size:
        images, masks = fixed_patches(dataset, batches * batch_size, seed)

        def patch(index):  # from the arrays in memory (no constant in the graph)
            return images[int(index)], masks[int(index)]

        def take(index):
            image, mask = tf.numpy_function(patch, [index], [tf.float32, labels],
                                            stateful=False)
            image.set_shape(tile + (dataset.in_channels,))
            mask.set_shape(tile)
            return image, mask

        count = len(images)
        tiles = tf.data.Dataset.range(count).map(take)
    else:
        def cut(index):
            image, mask = read_item(dataset, int(index))
            return grid_tiles(image, mask, tile)

        def read(index):
            images, masks = tf.numpy_function(cut, [index], [tf.float32, labels],
                                              stateful=False)
            images.set_shape((None,) + tile + (dataset.in_channels,))
            masks.set_shape((None,) + tile)
            return images, masks

        tiles = tf.data.Dataset.from_tensor_slices(np.asarray(dataset.val, "int64"))
        tiles = tiles.map(read, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=True).unbatch()
    tiles = tiles.map(lambda image, mask: (image, _targets(mask, dataset.n_label)))
    # The count of tiles follows from the items' sizes; stating it lets Keras know
    # where an epoch of validation ends.
    batched = tiles.batch(batch_size).apply(
        tf.data.experimental.assert_cardinality(-(-count // batch_size)))
    return _finish(batched, data_format, outputs)


def fixed_patches(dataset, count, seed=0):
    """`count` patches of the held-out images, drawn once with `seed`: `(images (count,
    *tile, C) float32, masks (count, *tile))`. The images are taken in a seeded order,
    each read once, and give an equal share of the patches (a third centred on
    labelled pixels), so no more images are read than `count` needs."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(np.asarray(dataset.val, "int64"))[:count]
    shares = np.full(len(order), count // len(order))
    shares[:count % len(order)] += 1
    images, masks = [], []
    for index, share in zip(order, shares):
        image, mask = read_item(dataset, int(index))
        patches = sample_patches(image, mask, dataset.tile_shape, int(share),
                                 FOREGROUND_FRACTION, rng)
        images.append(patches[0])
        masks.append(patches[1])
    return np.concatenate(images), np.concatenate(masks)


def file_order(dataset, seed=0, patches_per_image=None, shard=None):
    """The endless stream of `(training item index, patch count)`: every epoch the
    (shard's) training items once, in a new seeded order."""
    import tensorflow as tf

    indices = np.asarray(dataset.train, "int64")
    counts = np.asarray([dataset.patch_count(index, patches_per_image)
                         for index in dataset.train], "int64")
    files = tf.data.Dataset.from_tensor_slices((indices, counts))
    shard_size = len(indices)
    if shard is not None:
        if len(indices) < shard[0]:
            raise ValueError(f"{len(indices)} training image(s) cannot be shared out by "
                             f"file among {shard[0]} shards; give each at least one.")
        files = files.shard(*shard)
        shard_size = len(range(shard[1], len(indices), shard[0]))
    return files.shuffle(shard_size, seed=seed, reshuffle_each_iteration=True).repeat()


def check_pipeline_arguments(batch_size, patches_per_image, foreground_fraction):
    """Raises a ValueError naming the first bad argument of `training_dataset`."""
    _validation.check_int("batch_size", batch_size, 1)
    if patches_per_image is not None:
        _validation.check_int("patches_per_image", patches_per_image, 1)
    if not (isinstance(foreground_fraction, (int, float))
            and 0.0 <= foreground_fraction <= 1.0):
        raise ValueError(f"foreground_fraction={foreground_fraction!r} is not allowed; "
                         "expected a number from 0 to 1.")


def read_item(dataset, index):
    """`dataset.read(index)`, with an error that names the item and survives TensorFlow."""
    item = dataset.items[index]
    log = os.environ.get(READ_LOG_ENV)
    if log:
        with open(log, "a") as file:
            file.write(f"{os.getpid()}\t{item.name}\n")
    try:
        return item.read()
    except Exception as error:
        raise ValueError(f"{_FAILURE} {item.name!r}: {error}") from error


def read_failure(error):
    """The reader's message inside a TensorFlow error from a pipeline, or None."""
    match = re.search(f"{_FAILURE} .*", str(error))
    return match.group(0).strip() if match else None


def sample_patches(image, mask, tile, count, foreground_fraction, rng):
    """`count` random patches of size `tile` from one image (or volume) and its mask.

    An image smaller than the tile is padded with zeros (background) at its ends.
    Each patch is centred on a random labelled pixel with probability
    `foreground_fraction` (when the mask has any), else placed uniformly.

    Returns:
        `(images (count, *tile, C) float32, masks (count, *tile))`, the masks of
        the mask's own integer type.
    """
    tile = tuple(tile)
    pads = [max(0, side - extent) for side, extent in zip(tile, mask.shape)]
    if any(pads):
        image = np.pad(image, [(0, pad) for pad in pads] + [(0, 0)])
        mask = np.pad(mask, [(0, pad) for pad in pads])
    shape = mask.shape
    foreground = None
    images = np.empty((count,) + tile + image.shape[-1:], "float32")
    masks = np.empty((count,) + tile, mask.dtype)
    for patch in range(count):
        centred = rng.random() < foreground_fraction
        if centred and foreground is None:
            foreground = np.flatnonzero(mask)
        if centred and foreground.size:
            centre = np.unravel_index(int(foreground[rng.integers(foreground.size)]), shape)
            corner = [int(np.clip(c - side // 2, 0, extent - side))
                      for c, side, extent in zip(centre, tile, shape)]
        else:
            corner = [int(rng.integers(extent - side + 1)) for side, extent in zip(tile, shape)]
        where = tuple(slice(c, c + side) for c, side in zip(corner, tile))
        images[patch] = image[where]
        masks[patch] = mask[where]
    return images, masks


def grid_tiles(image, mask, tile):
    """Non-overlapping tiles covering an image (or volume) padded by reflection at its
    ends to multiples of `tile`; returns `(images (N, *tile, C), masks (N, *tile))`."""
    tile = tuple(tile)
    pads = [-extent % side for extent, side in zip(mask.shape, tile)]
    mode = "reflect" if all(pad < extent for pad, extent in zip(pads, mask.shape)) \
        else "symmetric"
    image = np.pad(image, [(0, pad) for pad in pads] + [(0, 0)], mode=mode)
    mask = np.pad(mask, [(0, pad) for pad in pads], mode=mode)
    corners = itertools.product(*[range(0, extent, side)
                                  for extent, side in zip(mask.shape, tile)])
    wheres = [tuple(slice(c, c + side) for c, side in zip(corner, tile)) for corner in corners]
    return (np.stack([image[where] for where in wheres]),
            np.stack([mask[where] for where in wheres]))


def targets(masks, n_label):
    """Integer masks (..., H, W) to float targets (..., H, W, n_label): binary or one-hot."""
    masks = np.asarray(masks)
    if n_label == 1:
        return (masks > 0).astype("float32")[..., None]
    return np.eye(n_label, dtype="float32")[masks]


def _targets(mask, n_label):
    import tensorflow as tf

    if n_label == 1:
        return tf.cast(mask > 0, tf.float32)[..., None]
    return tf.one_hot(tf.cast(mask, tf.int32), n_label, dtype=tf.float32)


def _finish(batches, data_format, outputs):
    import tensorflow as tf

    if data_format == "channels_first":
        def first(tensor):
            rank = len(tensor.shape)
            return tf.transpose(tensor, (0, rank - 1) + tuple(range(1, rank - 1)))

        batches = batches.map(lambda image, target: (first(image), first(target)))
    if outputs > 1:
        batches = batches.map(lambda image, target: (image, (target,) * outputs))
    return batches.prefetch(tf.data.AUTOTUNE)


def _augment(image, target, seed, tile):
    """The same random flips along every spatial axis, and (when the last two are
    equal) in-plane 90-degree rotations, for an image and its target."""
    import tensorflow as tf

    channels = tf.shape(image)[-1]
    both = tf.concat([image, target], axis=-1)
    seed = tf.cast(seed, tf.int32)
    flips = tf.random.stateless_uniform((len(tile),), seed) < 0.5
    for axis in range(len(tile)):
        both = _flip(both, flips[axis], axis)
    if tile[-1] == tile[-2]:
        turns = tf.random.stateless_uniform((), seed + 1, 0, 4, dtype=tf.int32)
        both = tf.image.rot90(both, turns)
    return both[..., :channels], both[..., channels:]


def _flip(tensor, flip, axis):
    import tensorflow as tf

    return tf.cond(flip, lambda: tf.reverse(tensor, [axis]), lambda: tensor)
