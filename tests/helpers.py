"""Small helpers for the tests: layout-aware random batches and transposes."""

import numpy as np


def image_batch(batch, channels, height, width, data_format, seed=0):
    """A random float32 batch in `data_format`."""
    rng = np.random.default_rng(seed)
    if data_format == "channels_first":
        shape = (batch, channels, height, width)
    else:
        shape = (batch, height, width, channels)
    return rng.random(shape, dtype="float32")


def to_channels_last(array):
    """NCHW to NHWC."""
    return np.transpose(array, (0, 2, 3, 1))
