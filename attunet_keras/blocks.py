"""Attention gates and the decoder's up-sample, gate and concatenate step, in 2D and 3D.

Two gates:

- the additive gate of the Keras functional-API port this package mirrors
  (`attn_block_2d`, `attn_block_3d`): the gating signal is the up-sampled coarser map,
  so gate and skip connection share one grid and nothing is resampled inside the gate;
- the grid attention gate of the paper's official code (`grid_attn_block_2d`,
  `grid_attn_block_3d`): the gating signal stays on the coarser grid, `x` is brought
  there by a strided convolution, and the coefficients are resampled back to `x`.

Both come from Oktay et al., "Attention U-Net: Learning Where to Look for the
Pancreas" (MIDL 2018, arXiv:1804.03999).
"""

import keras
from keras import layers

from attunet_keras import _validation
from attunet_keras import layers as layers_lib

UPSAMPLING_MODES = ("nearest", "bilinear", "transpose")
GATES = ("additive", "grid")


# ------------------------------------------------------------------ public builders


def attn_block_2d(x, g, inter_channel, data_format=None, name=None, *,
                  batch_norm=False):
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
        batch_norm: bool. Batch normalization after `theta`, `phi` and `psi` (their
            convolutions then have no bias), as the PyTorch Attention U-Nets do.
            Defaults to False (the reference).

    Returns:
        A tensor shaped like `x`: the gated skip connection.

    Example:

    >>> x = keras.Input((32, 32, 16))
    >>> g = keras.Input((32, 32, 64))
    >>> attn_block_2d(x, g, inter_channel=16, data_format="channels_last").shape
    (None, 32, 32, 16)
    """
    return _attn_block(2, x, g, inter_channel, data_format, name, batch_norm)


def attn_block_3d(x, g, inter_channel, data_format=None, name=None, *,
                  batch_norm=False):
    """The additive attention gate of `attn_block_2d` for 5D (volume) tensors.

    Example:

    >>> x = keras.Input((8, 16, 16, 16))
    >>> attn_block_3d(x, x, 4, data_format="channels_first").shape
    (None, 8, 16, 16, 16)
    """
    return _attn_block(3, x, g, inter_channel, data_format, name, batch_norm)


def grid_attn_block_2d(x, g, inter_channel, data_format=None, name=None):
    """Gates a skip connection with the paper's grid attention gate.

    `theta = Conv(x)` with kernel = stride = 2 and no bias, on the coarser grid of `g`;
    `phi = Conv1x1(g)` with bias, resampled (bilinear) to theta's grid when `g` is
    coarser still; `alpha = sigmoid(Conv1x1(relu(theta + phi)))`, resampled back to the
    grid of `x` (bilinear); the result is `BN(Conv1x1(x * alpha))`, the output transform
    `W_o` of the official code.

    Args:
        x: 4D tensor. The skip connection to gate; even spatial sizes.
        g: 4D tensor. The gating signal from a coarser level: each spatial size of `x`
            is 2 * k times that of `g`, for a whole k.
        inter_channel: int. Channels of `theta` and `phi`. Must be >= 1.
        data_format: str or None. As in `attn_block_2d`.
        name: str or None. Prefix of the layer names (`{name}_theta`, `{name}_phi`,
            `{name}_add`, `{name}_relu`, `{name}_psi`, `{name}_sigmoid`,
            `{name}_alpha_up`, `{name}_multiply`, `{name}_out`, `{name}_out_bn`).
            Defaults to a unique `grid_attn_block_N`.

    Returns:
        A tensor shaped like `x`.

    Example:

    >>> x = keras.Input((32, 32, 16))
    >>> g = keras.Input((16, 16, 32))
    >>> grid_attn_block_2d(x, g, 8, data_format="channels_last").shape
    (None, 32, 32, 16)
    """
    return _grid_attn_block(2, x, g, inter_channel, data_format, name)


def grid_attn_block_3d(x, g, inter_channel, data_format=None, name=None):
    """The grid attention gate of `grid_attn_block_2d` for 5D (volume) tensors.

    Keras has no trilinear up-sampling layer, so the resampling steps use
    nearest-neighbour up-sampling in 3D.
    """
    return _grid_attn_block(3, x, g, inter_channel, data_format, name)


def attention_up_and_concat(down_layer, layer, data_format=None, name=None, *,
                            batch_norm=False, upsampling="nearest", gate="additive"):
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
        batch_norm: bool. Batch normalization in the additive gate. Defaults to False.
        upsampling: str. `"nearest"` (the reference), `"bilinear"`, or `"transpose"`
            (a learned `Conv2DTranspose` with kernel = stride = 2 keeping the channel
            count). Defaults to `"nearest"`.
        gate: str. `"additive"` (the reference; gated by the up-sampled map) or
            `"grid"` (the paper's gate; gated by `down_layer` on its own grid).
            Defaults to `"additive"`.

    Returns:
        A tensor with `channels(down_layer) + channels(layer)` channels on the grid of
        `layer`.

    Example:

    >>> down = keras.Input((64, 8, 8))
    >>> skip = keras.Input((32, 16, 16))
    >>> attention_up_and_concat(down, skip, data_format="channels_first").shape
    (None, 96, 16, 16)
    """
    return _attention_up_and_concat(2, down_layer, layer, data_format, name, batch_norm,
                                    upsampling, gate)


def attention_up_and_concat_3d(down_layer, layer, data_format=None, name=None, *,
                               batch_norm=False, upsampling="nearest", gate="additive"):
    """`attention_up_and_concat` for 5D (volume) tensors.

    `upsampling` is `"nearest"` or `"transpose"` (Keras's `UpSampling3D` has no
    trilinear mode).
    """
    return _attention_up_and_concat(3, down_layer, layer, data_format, name, batch_norm,
                                    upsampling, gate)


# ---------------------------------------------------------- layer factories by rank


def conv(rank, *args, **kwargs):
    """`Conv2D` or `Conv3D`, looked up when called; for channels_first the package's
    subclass that adds the bias on the channels (`layers.Conv2D` says why)."""
    return _conv_class(rank, "D", kwargs)(*args, **kwargs)


def conv_transpose(rank, *args, **kwargs):
    """`Conv2DTranspose` or `Conv3DTranspose`, as `conv`."""
    return _conv_class(rank, "DTranspose", kwargs)(*args, **kwargs)


def _conv_class(rank, suffix, kwargs):
    name = f"Conv{rank}{suffix}"
    data_format = kwargs.get("data_format") or keras.config.image_data_format()
    if data_format == "channels_first":
        return getattr(layers_lib, name)
    return getattr(layers, name)


def max_pooling(rank, *args, **kwargs):
    return getattr(layers, f"MaxPooling{rank}D")(*args, **kwargs)


def upsampling_layer(rank, size, data_format, interpolation, name):
    """`UpSampling2D` (nearest or bilinear) or `UpSampling3D` (nearest only)."""
    if rank == 2:
        return layers.UpSampling2D(size=size, data_format=data_format,
                                   interpolation=interpolation, name=name)
    return layers.UpSampling3D(size=size, data_format=data_format, name=name)


def smooth_interpolation(rank):
    """The interpolation used to resample maps: bilinear in 2D, nearest in 3D."""
    return "bilinear" if rank == 2 else "nearest"


# ------------------------------------------------------------------ implementations


def _check_block_inputs(rank, x, g, inter_channel, data_format):
    data_format = _validation.resolve_data_format(data_format)
    _validation.check_rank("x", x, rank + 2)
    _validation.check_rank("g", g, rank + 2)
    _validation.known_channels("x", x, data_format)
    _validation.known_channels("g", g, data_format)
    _validation.check_int("inter_channel", inter_channel, 1)
    return data_format


def _attn_block(rank, x, g, inter_channel, data_format, name, batch_norm):
    data_format = _check_block_inputs(rank, x, g, inter_channel, data_format)
    _check_same_grid(
        "x", _validation.spatial_shape(x, data_format),
        "g", _validation.spatial_shape(g, data_format),
    )
    if name is None:
        name = f"attn_block_{keras.backend.get_uid('attn_block')}"
    channel_axis = _validation.channel_axis_for(data_format)

    def project(tensor, filters, suffix):
        tensor = conv(rank, filters, 1, data_format=data_format, use_bias=not batch_norm,
                      name=f"{name}_{suffix}")(tensor)
        if batch_norm:
            tensor = layers.BatchNormalization(axis=channel_axis,
                                               name=f"{name}_{suffix}_bn")(tensor)
        return tensor

    theta_x = project(x, inter_channel, "theta")
    phi_g = project(g, inter_channel, "phi")
    f = layers.Add(name=f"{name}_add")([theta_x, phi_g])
    f = layers.Activation("relu", name=f"{name}_relu")(f)
    psi_f = project(f, 1, "psi")
    alpha = layers.Activation("sigmoid", name=f"{name}_sigmoid")(psi_f)
    return layers.Multiply(name=f"{name}_multiply")([x, alpha])


def _grid_attn_block(rank, x, g, inter_channel, data_format, name):
    data_format = _check_block_inputs(rank, x, g, inter_channel, data_format)
    x_spatial = _validation.spatial_shape(x, data_format)
    g_spatial = _validation.spatial_shape(g, data_format)
    factors = set()
    for size_x, size_g in zip(x_spatial, g_spatial):
        if size_x is None or size_g is None:
            continue
        if size_x % 2 or size_x % size_g or (size_x // size_g) % 2:
            raise ValueError(
                f"x has spatial shape {tuple(x_spatial)} and g has {tuple(g_spatial)}; "
                "the grid gate needs each size of x to be an even multiple (2, 4, ...) "
                "of the size of g."
            )
        factors.add(size_x // size_g // 2)
    if len(factors) > 1:
        raise ValueError(
            f"x has spatial shape {tuple(x_spatial)} and g has {tuple(g_spatial)}; the "
            "grid gate needs the same scale factor on every axis."
        )
    phi_factor = factors.pop() if factors else 1
    if name is None:
        name = f"grid_attn_block_{keras.backend.get_uid('grid_attn_block')}"
    channel_axis = _validation.channel_axis_for(data_format)
    x_channels = x.shape[channel_axis]
    interpolation = smooth_interpolation(rank)

    theta_x = conv(rank, inter_channel, 2, strides=2, use_bias=False,
                   data_format=data_format, name=f"{name}_theta")(x)
    phi_g = conv(rank, inter_channel, 1, data_format=data_format, name=f"{name}_phi")(g)
    if phi_factor > 1:
        phi_g = upsampling_layer(rank, phi_factor, data_format, interpolation,
                                 f"{name}_phi_up")(phi_g)
    f = layers.Add(name=f"{name}_add")([theta_x, phi_g])
    f = layers.Activation("relu", name=f"{name}_relu")(f)
    psi_f = conv(rank, 1, 1, data_format=data_format, name=f"{name}_psi")(f)
    alpha = layers.Activation("sigmoid", name=f"{name}_sigmoid")(psi_f)
    alpha = upsampling_layer(rank, 2, data_format, interpolation, f"{name}_alpha_up")(alpha)
    y = layers.Multiply(name=f"{name}_multiply")([x, alpha])
    y = conv(rank, x_channels, 1, data_format=data_format, name=f"{name}_out")(y)
    return layers.BatchNormalization(axis=channel_axis, name=f"{name}_out_bn")(y)


def _attention_up_and_concat(rank, down_layer, layer, data_format, name, batch_norm,
                             upsampling, gate):
    data_format = _validation.resolve_data_format(data_format)
    _validation.check_rank("down_layer", down_layer, rank + 2)
    _validation.check_rank("layer", layer, rank + 2)
    check_block_options(rank, upsampling, gate)
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

    if upsampling == "transpose":
        up = conv_transpose(rank, in_channel, 2, strides=2, data_format=data_format,
                            name=f"{name}_up")(down_layer)
    else:
        up = upsampling_layer(rank, 2, data_format, upsampling, f"{name}_up")(down_layer)
    if gate == "grid":
        gated = _grid_attn_block(rank, layer, down_layer, in_channel // 4, data_format,
                                 f"{name}_gate")
    else:
        gated = _attn_block(rank, layer, up, in_channel // 4, data_format, f"{name}_gate",
                            batch_norm)
    channel_axis = _validation.channel_axis_for(data_format)
    return layers.Concatenate(axis=channel_axis, name=f"{name}_concat")([up, gated])


def check_block_options(rank, upsampling, gate):
    """Checks `upsampling` and `gate` for a `rank`-D network."""
    if upsampling not in UPSAMPLING_MODES:
        raise ValueError(
            f"upsampling={upsampling!r} is not supported; expected one of "
            f"{UPSAMPLING_MODES}."
        )
    if rank == 3 and upsampling == "bilinear":
        raise ValueError(
            "upsampling='bilinear' is not available in 3D: Keras's UpSampling3D has no "
            "trilinear mode; use 'nearest' or 'transpose'."
        )
    if gate not in GATES:
        raise ValueError(f"gate={gate!r} is not supported; expected one of {GATES}.")


def _check_same_grid(name_a, spatial_a, name_b, spatial_b):
    """Raises when two known spatial shapes differ."""
    for size_a, size_b in zip(spatial_a, spatial_b):
        if size_a is not None and size_b is not None and size_a != size_b:
            raise ValueError(
                f"{name_a} has spatial shape {tuple(spatial_a)} but {name_b} has "
                f"{tuple(spatial_b)}; they must be equal."
            )
