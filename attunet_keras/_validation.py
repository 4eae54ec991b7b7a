"""Argument checks shared by the builders.

Every check raises one `ValueError` that names the argument, echoes the value it
received and says what is allowed. Builders call these before they create any layer.
"""

import numbers

import keras

DATA_FORMATS = ("channels_first", "channels_last")


def resolve_data_format(data_format):
    """Returns `data_format`, with `None` read from `keras.config.image_data_format()`."""
    if data_format is None:
        data_format = keras.config.image_data_format()
    if data_format not in DATA_FORMATS:
        raise ValueError(
            f"data_format={data_format!r} is not supported; "
            f"expected one of {DATA_FORMATS} or None "
            "(None means keras.config.image_data_format())."
        )
    return data_format


def check_data_format(data_format):
    """Returns `data_format` checked, `None` kept (a layout found at call time)."""
    return None if data_format is None else resolve_data_format(data_format)


def channel_axis_of(shape, n_label, data_format, name):
    """The channel axis of a batch of maps (`y_true`/`y_pred` of a loss or metric).

    An explicit `data_format` decides. Otherwise the axis is found from the static
    `shape`: of axis 1 (channels_first) and the last axis (channels_last), the one whose
    size is `n_label` (the model's output channels). A single channel (binary maps)
    reduces the same over either axis, so `n_label == 1` needs no layout (either
    size-1 axis is returned). `n_label=None` is read as binary when one of the two
    axes has size 1. Anything that cannot be decided raises one `ValueError` naming
    the shape and the remedy; a spatial axis is never taken for the channels.
    """
    if data_format is not None:
        return channel_axis_for(data_format)
    shape = tuple(shape)
    rank = len(shape)
    wanted = 1 if n_label is None else n_label
    fits = [axis for axis in dict.fromkeys((1, rank - 1)) if shape[axis] == wanted]
    if len(fits) == 1 or (wanted == 1 and fits):
        return fits[0]
    if n_label is None:
        raise ValueError(
            f"{name} cannot tell the channel axis of maps of shape {shape}: pass "
            "n_label= (the model's output channels) or data_format='channels_first' "
            "or 'channels_last'.")
    if fits:
        raise ValueError(
            f"{name} cannot tell the channel axis of maps of shape {shape}: both axis 1 "
            f"and the last axis have n_label={n_label} entries; pass "
            "data_format='channels_first' or 'channels_last'.")
    raise ValueError(
        f"{name} expected maps with n_label={n_label} channels on axis 1 "
        f"(channels_first) or on the last axis (channels_last); received shape {shape}.")


def channel_axis_for(data_format):
    """The channel axis of a 4D or 5D tensor in `data_format`."""
    return 1 if data_format == "channels_first" else -1


def spatial_shape(tensor, data_format):
    """The spatial dimensions of `tensor` (entries may be `None`)."""
    shape = tuple(tensor.shape)
    return shape[2:] if data_format == "channels_first" else shape[1:-1]


def is_int(value):
    """True for Python and NumPy integers, False for bools and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name, value, minimum):
    """Checks that `value` is an integer >= `minimum`."""
    if not is_int(value) or value < minimum:
        raise ValueError(
            f"{name}={value!r} is not allowed; expected an integer >= {minimum}."
        )


def check_size(name, value, depth):
    """Checks a spatial size: `None`, or a positive integer divisible by 2**depth."""
    if value is None:
        return
    if not is_int(value) or value < 1:
        raise ValueError(
            f"{name}={value!r} is not allowed; expected a positive integer divisible "
            f"by 2**depth={2**depth}, or None for a size chosen at call time."
        )
    multiple = 2**depth
    if value % multiple:
        below = (value // multiple) * multiple
        above = below + multiple
        nearest = f"{below} or {above}" if below else f"{above}"
        raise ValueError(
            f"{name}={value} must be divisible by 2**depth={multiple} "
            f"(depth={depth}); nearest valid: {nearest}."
        )


def check_rank(name, tensor, rank):
    """Checks that `tensor` has `rank` dimensions (batch included)."""
    shape = getattr(tensor, "shape", None)
    if shape is None or len(shape) != rank:
        received = "no shape" if shape is None else f"shape {tuple(shape)}"
        raise ValueError(
            f"{name} must be a {rank}D tensor (batch, spatial and channel axes); "
            f"received {received}."
        )


def known_channels(name, tensor, data_format):
    """The channel count of `tensor`, which must be known when the graph is built."""
    channels = tuple(tensor.shape)[channel_axis_for(data_format)]
    if channels is None:
        raise ValueError(
            f"{name} has an unknown channel count (shape {tuple(tensor.shape)}, "
            f"data_format={data_format!r}); the channel axis must be known to build "
            "the gate."
        )
    return channels
