"""The attention gate and the decoder's up-sample, gate and concatenate step.

The additive attention gate is the one of Oktay et al., "Attention U-Net: Learning Where
to Look for the Pancreas" (MIDL 2018, arXiv:1804.03999), in the form of the Keras
functional-API port this package mirrors: the gating signal is the up-sampled coarser
feature map, so gate and skip connection share one grid and nothing is resampled inside
the gate.
"""

import keras
from keras import layers

from attunet_keras import _validation


def attn_block_2d(x, g, inter_channel, data_format=None, name=None):
    """Gates a skip connection with an additive attention gate.

    `theta = Conv1x1(x)`, `phi = Conv1x1(g)`, `alpha = sigmoid(Conv1x1(relu(theta +
    phi)))` with one output channel, and the result is `x * alpha`, the one-channel map
    broadcast over the channels of `x`.

    Args:
        x: 4D tensor. The skip connection to gate.
        g: 4D tensor. The gating signal, on the same spatial grid as `x`.
        inter_channel: int. Channels of `theta` and `phi`. Must be >= 1.
        data_format: str or None. `"channels_first"` or `"channels_last"`. Defaults to
            `None`, which means `keras.config.image_data_format()`.
        name: str or None. Prefix of every layer the gate makes (`{name}_theta`,
            `{name}_phi`, `{name}_add`, `{name}_relu`, `{name}_psi`, `{name}_sigmoid`,
            `{name}_multiply`). Defaults to a unique `attn_block_N`.

    Returns:
        A tensor shaped like `x`: the gated skip connection.

    Example:

    >>> x = keras.Input((32, 32, 16))
    >>> g = keras.Input((32, 32, 64))
    >>> attn_block_2d(x, g, inter_channel=16, data_format="channels_last").shape
    (None, 32, 32, 16)
    """
    data_format = _validation.resolve_data_format(data_format)
    _validation.check_rank("x", x, 4)
    _validation.check_rank("g", g, 4)
    _validation.known_channels("x", x, data_format)
    _validation.known_channels("g", g, data_format)
    _validation.check_int("inter_channel", inter_channel, 1)
    _check_same_grid(
        "x", _validation.spatial_shape(x, data_format),
        "g", _validation.spatial_shape(g, data_format),
    )
    if name is None:
        name = f"attn_block_{keras.backend.get_uid('attn_block')}"

    theta_x = layers.Conv2D(
        inter_channel, 1, data_format=data_format, name=f"{name}_theta"
    )(x)
    phi_g = layers.Conv2D(
        inter_channel, 1, data_format=data_format, name=f"{name}_phi"
    )(g)
    f = layers.Add(name=f"{name}_add")([theta_x, phi_g])
    f = layers.Activation("relu", name=f"{name}_relu")(f)
    psi_f = layers.Conv2D(1, 1, data_format=data_format, name=f"{name}_psi")(f)
    alpha = layers.Activation("sigmoid", name=f"{name}_sigmoid")(psi_f)
    return layers.Multiply(name=f"{name}_multiply")([x, alpha])


def attention_up_and_concat(down_layer, layer, data_format=None, name=None):
    """Up-samples the coarser map, gates the skip connection with it, concatenates.

    `up = UpSampling2D(2, nearest)(down_layer)`; the skip connection `layer` is gated by
    `attn_block_2d(layer, up, inter_channel=channels(down_layer) // 4)`; the result is
    `concatenate([up, gated])` on the channel axis, up-sampled channels first.

    Args:
        down_layer: 4D tensor. The coarser decoder (or bottleneck) feature map.
        layer: 4D tensor. The skip connection, twice the spatial size of `down_layer`.
        data_format: str or None. `"channels_first"` or `"channels_last"`. Defaults to
            `None`, which means `keras.config.image_data_format()`.
        name: str or None. Prefix of the layer names: `{name}_up`, the gate's
            `{name}_gate_*` and `{name}_concat`. Defaults to a unique
            `attention_up_and_concat_N`.

    Returns:
        A tensor with `channels(down_layer) + channels(layer)` channels on the grid of
        `layer`.

    Example:

    >>> down = keras.Input((64, 8, 8))
    >>> skip = keras.Input((32, 16, 16))
    >>> attention_up_and_concat(down, skip, data_format="channels_first").shape
    (None, 96, 16, 16)
    """
    data_format = _validation.resolve_data_format(data_format)
    _validation.check_rank("down_layer", down_layer, 4)
    _validation.check_rank("layer", layer, 4)
    in_channel = _validation.known_channels("down_layer", down_layer, data_format)
    _validation.known_channels("layer", layer, data_format)
    if in_channel // 4 < 1:
        raise ValueError(
            f"down_layer has {in_channel} channels, so the gate's inter_channel = "
            f"{in_channel} // 4 = 0; down_layer needs at least 4 channels."
        )
    up_spatial = tuple(
        None if size is None else 2 * size
        for size in _validation.spatial_shape(down_layer, data_format)
    )
    _check_same_grid(
        "down_layer up-sampled x2", up_spatial,
        "layer", _validation.spatial_shape(layer, data_format),
    )
    if name is None:
        uid = keras.backend.get_uid("attention_up_and_concat")
        name = f"attention_up_and_concat_{uid}"

    up = layers.UpSampling2D(
        size=2, data_format=data_format, interpolation="nearest", name=f"{name}_up"
    )(down_layer)
    gated = attn_block_2d(
        layer, up, in_channel // 4, data_format=data_format, name=f"{name}_gate"
    )
    channel_axis = _validation.channel_axis_for(data_format)
    return layers.Concatenate(axis=channel_axis, name=f"{name}_concat")([up, gated])


def _check_same_grid(name_a, spatial_a, name_b, spatial_b):
    """Raises when two known spatial shapes differ."""
    for size_a, size_b in zip(spatial_a, spatial_b):
        if size_a is not None and size_b is not None and size_a != size_b:
            raise ValueError(
                f"{name_a} has spatial shape {tuple(spatial_a)} but {name_b} has "
                f"{tuple(spatial_b)}; they must be equal."
            )
