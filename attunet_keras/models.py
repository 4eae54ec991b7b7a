"""The Attention U-Net model builder."""

import keras
from keras import layers

from attunet_keras import _validation
from attunet_keras import blocks

DROPOUT_RATE = 0.2
OUTPUT_ACTIVATIONS = ("sigmoid", "softmax", None)


def att_unet(
    img_w,
    img_h,
    n_label,
    depth=4,
    features=32,
    data_format="channels_first",
    *,
    in_channels=3,
    output_activation="sigmoid",
    name="att_unet",
):
    """Builds the Attention U-Net of the reference Keras port.

    An encoder of `depth` levels (two 3x3 Conv-ReLU with Dropout(0.2) between them,
    then 2x2 max pooling; features double at every level), a bottleneck, and a decoder
    whose every level up-samples, gates the skip connection with an additive attention
    gate (`attention_up_and_concat`), concatenates and applies two 3x3 Conv-ReLU; a 1x1
    convolution and a sigmoid give `n_label` per-pixel probabilities. At the defaults
    and `att_unet(160, 160, 1)` the model has 7,977,941 parameters, like the reference.

    Args:
        img_w: int or None. Size of the first spatial axis (as in the reference, the
            input is `(in_channels, img_w, img_h)` in `channels_first`). Must be
            divisible by `2**depth`; `None` leaves it to be chosen at call time.
        img_h: int or None. Size of the second spatial axis, as `img_w`.
        n_label: int. Output channels (one sigmoid map each). Must be >= 1.
        depth: int. Number of pooling levels. Defaults to 4.
        features: int. Filters of the first level, doubled at each level down.
            Must be >= 2 so that every gate has at least one channel. Defaults to 32.
        data_format: str or None. `"channels_first"` (the reference's layout) or
            `"channels_last"`; `None` means `keras.config.image_data_format()`.
            Defaults to `"channels_first"`.
        in_channels: int. Channels of the input image. Defaults to 3.
        output_activation: str or None. `"sigmoid"` (the reference: independent
            per-channel probabilities), `"softmax"` (over the `n_label` channels, for
            multi-class segmentation) or `None` (logits). Defaults to `"sigmoid"`.
        name: str. Name of the model. Defaults to `"att_unet"`.

    Returns:
        A functional `keras.Model` mapping images to sigmoid probabilities of the same
        spatial size, `(batch, n_label, img_w, img_h)` in `channels_first`.

    Example:

    >>> model = att_unet(160, 160, n_label=1)
    >>> model.count_params()
    7977941
    """
    data_format = _validation.resolve_data_format(data_format)
    _validation.check_int("depth", depth, 1)
    _validation.check_int("features", features, 1)
    _validation.check_int("n_label", n_label, 1)
    _validation.check_int("in_channels", in_channels, 1)
    _validation.check_size("img_w", img_w, depth)
    _validation.check_size("img_h", img_h, depth)
    if (2 * features) // 4 < 1:
        raise ValueError(
            f"features={features} is not allowed: the gate of the top decoder level "
            f"gets inter_channel = (2 * features) // 4 = {(2 * features) // 4}; "
            "features must be >= 2."
        )
    if output_activation not in OUTPUT_ACTIVATIONS:
        raise ValueError(
            f"output_activation={output_activation!r} is not supported; expected one "
            f"of {OUTPUT_ACTIVATIONS}."
        )
    if output_activation == "softmax" and n_label < 2:
        raise ValueError(
            "output_activation='softmax' needs n_label >= 2 classes (background "
            f"included); received n_label={n_label}. Use 'sigmoid' for one channel."
        )
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} is not allowed; expected a non-empty string.")

    if data_format == "channels_first":
        input_shape = (in_channels, img_w, img_h)
    else:
        input_shape = (img_w, img_h, in_channels)
    inputs = keras.Input(shape=input_shape, name="image")

    x = inputs
    skips = []
    for level in range(1, depth + 1):
        x = _conv_block(x, features * 2 ** (level - 1), data_format, f"enc{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, data_format=data_format, name=f"enc{level}_pool")(x)
    x = _conv_block(x, features * 2**depth, data_format, "bottleneck")
    for level in range(depth, 0, -1):
        x = blocks.attention_up_and_concat(
            x, skips[level - 1], data_format=data_format, name=f"dec{level}"
        )
        x = _conv_block(x, features * 2 ** (level - 1), data_format, f"dec{level}")

    outputs = layers.Conv2D(
        n_label, 1, padding="same", data_format=data_format, name="head_conv"
    )(x)
    if output_activation == "softmax":
        channel_axis = _validation.channel_axis_for(data_format)
        outputs = layers.Softmax(axis=channel_axis, name="head_softmax")(outputs)
    elif output_activation == "sigmoid":
        outputs = layers.Activation("sigmoid", name="head_sigmoid")(outputs)
    return keras.Model(inputs, outputs, name=name)


def _conv_block(x, filters, data_format, name):
    """Conv3x3-ReLU, Dropout, Conv3x3-ReLU: the reference's block at every level."""
    x = layers.Conv2D(
        filters, 3, padding="same", activation="relu", data_format=data_format,
        name=f"{name}_conv1",
    )(x)
    x = layers.Dropout(DROPOUT_RATE, name=f"{name}_dropout")(x)
    return layers.Conv2D(
        filters, 3, padding="same", activation="relu", data_format=data_format,
        name=f"{name}_conv2",
    )(x)
