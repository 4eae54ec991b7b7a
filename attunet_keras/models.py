"""The Attention U-Net model builders, 2D (`att_unet`) and 3D (`att_unet_3d`)."""

import functools
import numbers

import keras
from keras import layers

from attunet_keras import _validation
from attunet_keras import blocks
from attunet_keras import layers as layers_lib

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
    dropout=DROPOUT_RATE,
    batch_norm=False,
    upsampling="nearest",
    gate="additive",
    deep_supervision=False,
    backbone=None,
    backbone_weights=None,
    freeze_backbone=False,
    variant="reference",
    second_sigmoid=False,
    name="att_unet",
):
    """Builds the Attention U-Net of the reference Keras port.

    An encoder of `depth` levels (two 3x3 Conv-ReLU with Dropout(0.2) between them,
    then 2x2 max pooling; features double at every level), a bottleneck, and a decoder
    whose every level up-samples, gates the skip connection with an additive attention
    gate (`attention_up_and_concat`), concatenates and applies two 3x3 Conv-ReLU; a 1x1
    convolution and a sigmoid give `n_label` per-pixel probabilities. At the defaults
    and `att_unet(160, 160, 1)` the model has 7,977,941 parameters, like the reference.
    The keyword-only options beyond `in_channels` cover the other published variants;
    their defaults are the reference.

    Args:
        img_w: int or None. Size of the first spatial axis (as in the reference, the
            input is `(in_channels, img_w, img_h)` in `channels_first`). Must be
            divisible by `2**depth`; `None` leaves it to be chosen at call time.
        img_h: int or None. Size of the second spatial axis, as `img_w`.
        n_label: int. Output channels. Must be >= 1 (>= 2 with softmax).
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
        dropout: float. Rate of the Dropout between the two convolutions of every
            block, in [0, 1); 0 builds no Dropout layers. Defaults to 0.2.
        batch_norm: bool. Conv-BN-ReLU in every block (convolutions without bias) and
            batch normalization on theta, phi and psi in the additive gates, as the
            PyTorch Attention U-Nets. Defaults to False.
        upsampling: str. The decoder's up-sampling: `"nearest"` (the reference),
            `"bilinear"` or `"transpose"` (learned `Conv2DTranspose`, kernel = stride
            = 2). Defaults to `"nearest"`.
        gate: str. `"additive"` (the reference's gate) or `"grid"` (the paper's grid
            attention gate; see `blocks.grid_attn_block_2d`). Defaults to `"additive"`.
        deep_supervision: bool. Add a 1x1 head at every decoder level below the top,
            up-sampled to full size, as extra outputs `dec{k}_head_*` after the main
            output (which stays first). Needs depth >= 2. Defaults to False.
        backbone: str or None. A `keras.applications` encoder (`backbones.BACKBONES`:
            `"vgg16"`, `"resnet50"`, `"resnet50v2"`, `"efficientnetb0"`..`"b3"`,
            `"mobilenetv2"`, `"convnext_tiny"`) under this package's attention
            decoder; needs `channels_last`, depth 4 and sizes divisible by 32 (see
            `attunet_keras.backbones`). None (the default) builds the reference.
        backbone_weights: None, `"imagenet"` (Keras's own download and cache) or the
            path of a weights file of the application with `include_top=False`.
        freeze_backbone: bool. Freeze the encoder (its BatchNormalization then runs
            in inference mode). Defaults to False.
        variant: str. `"reference"` (the default: the Keras reference and its
            options above) or `"attu_net"`: the PyTorch AttU_Net layer for layer, its
            layers named after its modules (`Conv1`, `Up5`, `Att5`, `Up_conv5`,
            `Conv_1x1`; see `attunet_keras.variants`), loadable from a PyTorch
            checkpoint (`attunet_keras.convert`). It takes `upsampling="nearest"` or
            `"transpose"` and needs `dropout=0` and `batch_norm=True`;
            `features=64, depth=4, in_channels=3, n_label=1` is the published
            network (34,878,573 parameters). `"monai"`: MONAI's `AttentionUnet`
            with `channels = features * 2**level` and strides 2, its layers named
            after its state_dict's module paths (`model_1_submodule_0_conv_0_conv`);
            it needs `upsampling="transpose"`, `batch_norm=True`, `dropout=0`.
        second_sigmoid: bool. With `variant="attu_net"`, apply the gate's sigmoid
            twice (a blog version of AttU_Net). Defaults to False.
        name: str. Name of the model. Defaults to `"att_unet"`.

    Returns:
        A functional `keras.Model` mapping images to per-pixel outputs of the same
        spatial size, `(batch, n_label, img_w, img_h)` in `channels_first`; a list of
        `depth` such outputs with `deep_supervision`.

    Example:

    >>> model = att_unet(160, 160, n_label=1)
    >>> model.count_params()
    7977941
    """
    return _build(2, {"img_w": img_w, "img_h": img_h}, locals())


def att_unet_3d(
    img_d,
    img_w,
    img_h,
    n_label,
    depth=4,
    features=32,
    data_format="channels_first",
    *,
    in_channels=1,
    output_activation="sigmoid",
    dropout=DROPOUT_RATE,
    batch_norm=False,
    upsampling="nearest",
    gate="additive",
    deep_supervision=False,
    variant="reference",
    second_sigmoid=False,
    name="att_unet_3d",
):
    """Builds the 3D Attention U-Net: `att_unet` with volumes (the paper's network).

    The same network and options as `att_unet` with 3x3x3 convolutions, 2x2x2 pooling
    and 3D gates; the input is `(in_channels, img_d, img_w, img_h)` in
    `channels_first`. `upsampling` is `"nearest"` or `"transpose"`: Keras's
    `UpSampling3D` has no trilinear mode, so the grid gate's and the deep-supervision
    heads' resampling is nearest-neighbour in 3D.

    Args:
        img_d: int or None. Size of the first spatial axis (depth of the volume).
        img_w: int or None. Second spatial axis.
        img_h: int or None. Third spatial axis.
        n_label, depth, features, data_format: as in `att_unet`.
        in_channels: int. Channels of the input volume. Defaults to 1.
        output_activation, dropout, batch_norm, upsampling, gate, deep_supervision,
            variant, second_sigmoid: as in `att_unet`.
        name: str. Defaults to `"att_unet_3d"`.

    Returns:
        A functional `keras.Model`.

    Example:

    >>> att_unet_3d(32, 32, 32, n_label=2, depth=2, features=8).output.shape
    (None, 2, 32, 32, 32)
    """
    return _build(3, {"img_d": img_d, "img_w": img_w, "img_h": img_h}, locals())


def check_arguments(rank, sizes, options):
    """Checks builder arguments (a dict of them); raises one ValueError naming the first bad one.

    Returns the resolved `data_format`. `att_unet` and `att_unet_3d` call it before
    they build any layer.
    """
    depth, features = options["depth"], options["features"]
    n_label = options["n_label"]
    data_format = _validation.resolve_data_format(options["data_format"])
    _validation.check_int("depth", depth, 1)
    _validation.check_int("features", features, 1)
    _validation.check_int("n_label", n_label, 1)
    _validation.check_int("in_channels", options["in_channels"], 1)
    for size_name, size in sizes.items():
        _validation.check_size(size_name, size, depth)
    if (2 * features) // 4 < 1:
        raise ValueError(
            f"features={features} is not allowed: the gate of the top decoder level "
            f"gets inter_channel = (2 * features) // 4 = {(2 * features) // 4}; "
            "features must be >= 2."
        )
    activation = options["output_activation"]
    if activation not in OUTPUT_ACTIVATIONS:
        raise ValueError(
            f"output_activation={activation!r} is not supported; expected one "
            f"of {OUTPUT_ACTIVATIONS}."
        )
    if activation == "softmax" and n_label < 2:
        raise ValueError(
            "output_activation='softmax' needs n_label >= 2 classes (background "
            f"included); received n_label={n_label}. Use 'sigmoid' for one channel."
        )
    dropout = options["dropout"]
    if (not isinstance(dropout, numbers.Real) or isinstance(dropout, bool)
            or not 0.0 <= dropout < 1.0):
        raise ValueError(
            f"dropout={dropout!r} is not allowed; expected a rate in [0, 1) "
            "(0 builds no Dropout layers)."
        )
    if not isinstance(options["batch_norm"], bool):
        raise ValueError(
            f"batch_norm={options['batch_norm']!r} is not allowed; expected True or False."
        )
    blocks.check_block_options(rank, options["upsampling"], options["gate"])
    if not isinstance(options["deep_supervision"], bool):
        raise ValueError(
            f"deep_supervision={options['deep_supervision']!r} is not allowed; expected "
            "True or False."
        )
    if options["deep_supervision"] and depth < 2:
        raise ValueError(
            f"deep_supervision=True needs depth >= 2 (a decoder level below the top); "
            f"received depth={depth}."
        )
    name = options["name"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} is not allowed; expected a non-empty string.")
    from attunet_keras import variants

    variant = options.get("variant", "reference")
    if variant not in variants.VARIANTS:
        raise ValueError(f"variant={variant!r} is not supported; expected one of "
                         f"{variants.VARIANTS}.")
    if variant in ("attu_net", "monai"):
        variants.check_arguments(rank, options)
    elif options.get("second_sigmoid", False) is not False:
        raise ValueError("second_sigmoid is an option of variant='attu_net'.")
    _check_fits_in_memory(rank, depth, features, options["in_channels"])
    return data_format


def estimated_parameters(rank, depth, features, in_channels=1):
    """About how many parameters an `att_unet` of these sizes has (convolutions only).

    Every level k (the bottleneck is level depth + 1) has `features * 2**(k-1)`
    filters; its encoder block, its decoder block and its up-sampling weigh about four
    kernel-sized convolutions of that width (the reference model: 7.86e6 for 7,977,941).
    """
    kernel = 3**rank
    total = kernel * in_channels * features
    for level in range(1, depth + 2):
        width = features * 2 ** (level - 1)
        total += 5 * kernel * width * width // 2
    return total


def _check_fits_in_memory(rank, depth, features, in_channels):
    """Refuses sizes whose float32 weights alone would not fit in this machine's memory."""
    import os

    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    parameters = estimated_parameters(rank, depth, features, in_channels)
    if 4 * parameters > memory:
        raise ValueError(
            f"depth={depth} with features={features} gives about {parameters:.3g} "
            f"parameters ({4 * parameters / 2**30:,.0f} GiB of float32 weights), more "
            f"than this machine's {memory / 2**30:,.0f} GiB of memory; lower depth or "
            "features (the bottleneck has features * 2**depth filters)."
        )


def _build(rank, sizes, options):
    data_format = check_arguments(rank, sizes, options)
    if options.get("backbone") is not None:
        from attunet_keras import backbones

        backbones.check_backbone_arguments(sizes, dict(options, data_format=data_format))
        return backbones.build(tuple(sizes.values()), options, decoder, heads, _conv_block)
    depth, features = options["depth"], options["features"]
    spatial = tuple(sizes.values())
    if data_format == "channels_first":
        input_shape = (options["in_channels"],) + spatial
    else:
        input_shape = spatial + (options["in_channels"],)
    block_options = dict(rank=rank, data_format=data_format, dropout=options["dropout"],
                         batch_norm=options["batch_norm"])

    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if None in spatial:
        x = layers_lib.SpatialSizeCheck(2**depth, data_format, name="image_size_check")(x)
    if options["variant"] in ("attu_net", "monai"):
        from attunet_keras import variants

        build = variants.build if options["variant"] == "attu_net" else variants.build_monai
        outputs = build(rank, x, options, data_format, decoder, activate)
        return keras.Model(inputs, outputs[0], name=options["name"])
    skips = []
    for level in range(1, depth + 1):
        x = _conv_block(x, features * 2 ** (level - 1), name=f"enc{level}", **block_options)
        skips.append(x)
        x = blocks.max_pooling(rank, 2, data_format=data_format, name=f"enc{level}_pool")(x)
    x = _conv_block(x, features * 2**depth, name="bottleneck", **block_options)
    x, side_outputs = decoder(x, skips, rank, data_format, options)
    # decoder level k is at stride 2**(k - 1): level 1 is the input's resolution
    outputs = heads(rank, x, side_outputs, data_format, options,
                    stride=lambda level: 2 ** (level - 1))
    return keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0],
                       name=options["name"])


def decoder(x, skips, rank, data_format, options, supervised=lambda level: level > 1,
            step=None):
    """The attention decoder loop of every `att_unet` (plain, on a backbone, or a
    variant).

    From the deepest skip up, decoder level k combines the map from below with
    `skips[k - 1]`: by default (`step=None`, the reference) it gates the skip with
    the map from below, up-samples that map, concatenates the two
    (`attention_up_and_concat`) and applies a conv block of `features * 2**(k - 1)`
    filters named `dec{k}`. A variant passes its own `step(x, skip, level) -> map`
    (`variants.attu_net_step`: up-sample and convolve first, then gate).

    Returns:
        `(x, side_outputs)`: the top level's map, and `(level, map)` of every level
        `supervised(level)` accepts when `options["deep_supervision"]` is on.
    """
    if step is None:
        step = functools.partial(_reference_step, rank=rank, data_format=data_format,
                                 options=options)
    side_outputs = []
    for level in range(len(skips), 0, -1):
        x = step(x, skips[level - 1], level)
        if options.get("deep_supervision") and supervised(level):
            side_outputs.append((level, x))
    return x, side_outputs


def _reference_step(x, skip, level, *, rank, data_format, options):
    """One level of the reference decoder: gate, up-sample, concatenate, conv block."""
    x = _UP_AND_CONCAT[rank](
        x, skip, data_format, f"dec{level}", batch_norm=options["batch_norm"],
        upsampling=options["upsampling"], gate=options["gate"])
    return _conv_block(x, options["features"] * 2 ** (level - 1), name=f"dec{level}",
                       rank=rank, data_format=data_format, dropout=options["dropout"],
                       batch_norm=options["batch_norm"])


def heads(rank, x, side_outputs, data_format, options, stride):
    """The output `head` on `x`, then a `dec{k}_head` on every side output, up-sampled
    by `stride(k)` (the level's stride relative to the input) to the input's size."""
    n_label, activation = options["n_label"], options["output_activation"]
    outputs = [_head(rank, x, n_label, data_format, activation, "head")]
    for level, features_map in sorted(side_outputs):
        outputs.append(_head(rank, features_map, n_label, data_format, activation,
                             f"dec{level}_head", upsample=stride(level)))
    return outputs



_UP_AND_CONCAT = {2: blocks.attention_up_and_concat, 3: blocks.attention_up_and_concat_3d}


def _conv_block(x, filters, *, rank, data_format, dropout, batch_norm, name):
    """Conv-ReLU, Dropout, Conv-ReLU (the reference); Conv-BN-ReLU with batch_norm."""
    channel_axis = _validation.channel_axis_for(data_format)

    def conv_unit(tensor, index):
        if not batch_norm:
            return blocks.conv(rank, filters, 3, padding="same", activation="relu",
                               data_format=data_format, name=f"{name}_conv{index}")(tensor)
        tensor = blocks.conv(rank, filters, 3, padding="same", use_bias=False,
                             data_format=data_format, name=f"{name}_conv{index}")(tensor)
        tensor = layers.BatchNormalization(axis=channel_axis, name=f"{name}_bn{index}")(tensor)
        return layers.Activation("relu", name=f"{name}_relu{index}")(tensor)

    x = conv_unit(x, 1)
    if dropout:
        x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return conv_unit(x, 2)


def _head(rank, x, n_label, data_format, activation, name, upsample=1):
    """1x1 convolution to `n_label` channels, up-sampled, then the output activation.

    The activation runs in float32 whatever the dtype policy, so mixed-precision models
    still output float32 probabilities; logits get a float32 cast layer under a mixed
    policy.
    """
    x = blocks.conv(rank, n_label, 1, padding="same", data_format=data_format,
                    name=f"{name}_conv")(x)
    if upsample > 1:
        x = blocks.upsampling_layer(rank, upsample, data_format,
                                    blocks.smooth_interpolation(rank), f"{name}_up")(x)
    return activate(x, activation, data_format, name)


def activate(x, activation, data_format, name):
    """The output activation `name_softmax` / `name_sigmoid`, in float32 whatever the
    dtype policy; logits (`activation=None`) get a float32 cast layer under a mixed
    policy."""
    if activation == "softmax":
        channel_axis = _validation.channel_axis_for(data_format)
        return layers.Softmax(axis=channel_axis, dtype="float32",
                              name=f"{name}_softmax")(x)
    if activation == "sigmoid":
        return layers.Activation("sigmoid", dtype="float32", name=f"{name}_sigmoid")(x)
    if keras.config.dtype_policy().compute_dtype != "float32":
        return layers.Activation("linear", dtype="float32", name=f"{name}_float32")(x)
    return x
