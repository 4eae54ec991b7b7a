"""The PyTorch Attention U-Net, layer for layer: `att_unet(..., variant="attu_net")`.

The network most people have trained is the PyTorch `AttU_Net` (LeeJunHyun/
Image_Segmentation, and the blog versions built on it), not the Keras reference. Its
blocks, with its module names (the Keras layers are named after the PyTorch modules
with `.` written `_`, so `Conv1.conv.0` is the layer `Conv1_conv_0`):

- `Conv{k}` (encoder level k, `Conv{depth+1}` the bottleneck) and `Up_conv{k}`: two
  3x3 Conv (with bias) - BN - ReLU, `conv.0` ... `conv.5`; widths
  `features * 2**(k-1)` (64 ... 1024 at `features=64, depth=4`).
- `Maxpool`: 2x2 max pooling (no weights; one layer per level here).
- `Up{k}`: up-sample x2 (`nn.Upsample`, nearest: `up.0`), then a 3x3 Conv - BN - ReLU
  halving the channels (`up.1`, `up.2`, `up.3`). With `upsampling="transpose"` (the
  blog version) `up.0` is `ConvTranspose2d(C, C, kernel 4, stride 2, padding 1)`,
  which lands exactly where Keras's `Conv2DTranspose(4, 2, padding="same")` does.
- `Att{k}` (`Attention_block(F_g, F_l, F_int = F_l // 2)`): `W_g` and `W_x` are a 1x1
  Conv (with bias) + BN (`W_g.0`, `W_g.1`, ...), `psi` is a 1x1 Conv to one channel +
  BN + Sigmoid (`psi.0`, `psi.1`); `out = x * psi(relu(W_g(g) + W_x(x)))`, with the
  gating signal `g` the up-convolved map `Up{k}(d)`. `second_sigmoid=True` applies the
  sigmoid once more to psi (a blog version's gate). The coefficient map's layer is
  `Att{k}_gate_sigmoid`, so `attention_model` and `attunet-keras attention` show it.
- `Up_conv{k}` takes `concat(Att{k}(g=d, x=skip), d)`: the gated skip first.
- `Conv_1x1`: the 1x1 head (with bias), then the package's output activation
  (`output_activation=None` gives the logits PyTorch returns).

BatchNormalization uses PyTorch's defaults (epsilon 1e-5, momentum 0.1, which is
Keras's momentum 0.9). In 3D every Conv2d is a Conv3d, as in the 3D ports.
`attunet_keras.convert.load_torch_state_dict` loads a PyTorch checkpoint into it.
"""

import functools

from keras import layers

from attunet_keras import _validation
from attunet_keras import blocks

VARIANTS = ("reference", "attu_net", "monai")
# PyTorch's BatchNorm defaults: eps 1e-5 and momentum 0.1 (running = 0.9 * running +
# 0.1 * batch, Keras's momentum 0.9).
TORCH_BN_EPSILON = 1e-5
TORCH_BN_MOMENTUM = 0.9
UPSAMPLING = ("nearest", "transpose")


def check_arguments(rank, options):
    """Refuses the options AttU_Net (or MONAI's AttentionUnet) has no counterpart for,
    in one line each."""
    del rank
    if options["variant"] == "monai":
        return _check_monai(options)
    if options["upsampling"] not in UPSAMPLING:
        raise ValueError(
            f"upsampling={options['upsampling']!r} is not supported by variant='attu_net'; "
            f"expected one of {UPSAMPLING} (nn.Upsample, or ConvTranspose2d(4, 2, 1)).")
    for name, value, default in (("gate", options["gate"], "additive"),
                                 ("deep_supervision", options["deep_supervision"], False),
                                 ("backbone", options.get("backbone"), None)):
        if value != default:
            raise ValueError(f"{name}={value!r} is not part of variant='attu_net' (the "
                             f"PyTorch AttU_Net); leave it at {default!r}.")
    if options["dropout"] not in (0, 0.0):
        raise ValueError(
            f"dropout={options['dropout']!r}: variant='attu_net' has no Dropout (the "
            "PyTorch AttU_Net has none); pass dropout=0.")
    if options["batch_norm"] is not True:
        raise ValueError("variant='attu_net' always has BatchNormalization (Conv-BN-ReLU); "
                         "pass batch_norm=True.")
    if not isinstance(options["second_sigmoid"], bool):
        raise ValueError(f"second_sigmoid={options['second_sigmoid']!r} is not allowed; "
                         "expected True or False.")
    _check_features(options)


def _check_features(options):
    if options["features"] < 2:
        raise ValueError(f"features={options['features']} is not allowed for "
                         f"variant={options['variant']!r}: its top gate has F_int = "
                         "features // 2.")


def build(rank, x, options, data_format, decoder, activate):
    """The AttU_Net from `x` (the checked input) to its outputs (a list of one), on
    `models.decoder`'s loop with `attu_net_step`; `activate` is `models.activate`."""
    depth, features = options["depth"], options["features"]
    unit = functools.partial(_units, rank=rank, data_format=data_format)
    skips = []
    for level in range(1, depth + 1):
        x = _conv_block(x, features * 2 ** (level - 1), f"Conv{level}", unit)
        skips.append(x)
        x = blocks.max_pooling(rank, 2, data_format=data_format,
                               name=f"Maxpool{level}")(x)
    x = _conv_block(x, features * 2**depth, f"Conv{depth + 1}", unit)
    step = functools.partial(attu_net_step, rank=rank, data_format=data_format,
                             options=options, unit=unit)
    x, _ = decoder(x, skips, rank, data_format, options, step=step)
    x = blocks.conv(rank, options["n_label"], 1, data_format=data_format,
                    name="Conv_1x1")(x)
    return [activate(x, options["output_activation"], data_format, "Conv_1x1")]


def attu_net_step(x, skip, level, *, rank, data_format, options, unit):
    """One decoder level of AttU_Net (modules `Up{k}`, `Att{k}`, `Up_conv{k}`, k =
    level + 1): up-convolve, gate the skip with the result, concatenate, conv block."""
    index = level + 1
    width = options["features"] * 2 ** (level - 1)
    if options["upsampling"] == "transpose":
        channels = x.shape[_validation.channel_axis_for(data_format)]
        d = blocks.conv_transpose(rank, channels, 4, strides=2, padding="same",
                                  data_format=data_format, name=f"Up{index}_up_0")(x)
    else:
        d = blocks.upsampling_layer(rank, 2, data_format, "nearest", f"Up{index}_up_0")(x)
    d = unit(d, width, 3, f"Up{index}_up_1", relu=True)
    gated = _gate(skip, d, width // 2, f"Att{index}", unit, rank, data_format,
                  options["second_sigmoid"])
    channel_axis = _validation.channel_axis_for(data_format)
    x = layers.Concatenate(axis=channel_axis, name=f"Up_conv{index}_concat")([gated, d])
    return _conv_block(x, width, f"Up_conv{index}", unit)


def _units(x, filters, kernel, name, *, relu, rank, data_format):
    """Conv `name` (with bias) then BN `name+1` (and ReLU `name+2` with `relu`), named
    as the PyTorch Sequential's indices: `Conv1_conv_0` is followed by `Conv1_conv_1`."""
    stem, index = name.rsplit("_", 1)
    index = int(index)
    x = blocks.conv(rank, filters, kernel, padding="same", data_format=data_format,
                    name=name)(x)
    x = layers.BatchNormalization(
        axis=_validation.channel_axis_for(data_format), epsilon=TORCH_BN_EPSILON,
        momentum=TORCH_BN_MOMENTUM, name=f"{stem}_{index + 1}")(x)
    if relu:
        x = layers.Activation("relu", name=f"{stem}_{index + 2}")(x)
    return x


def _conv_block(x, filters, name, unit):
    """`conv_block`: (3x3 Conv - BN - ReLU) twice, `{name}_conv_0` ... `_conv_5`."""
    x = unit(x, filters, 3, f"{name}_conv_0", relu=True)
    return unit(x, filters, 3, f"{name}_conv_3", relu=True)


def _gate(x, g, inter_channels, name, unit, rank, data_format, second_sigmoid):
    """`Attention_block`: `x * psi(relu(W_g(g) + W_x(x)))`."""
    g1 = unit(g, inter_channels, 1, f"{name}_W_g_0", relu=False)
    x1 = unit(x, inter_channels, 1, f"{name}_W_x_0", relu=False)
    psi = layers.Activation("relu", name=f"{name}_relu")(layers.Add(name=f"{name}_add")(
        [g1, x1]))
    psi = unit(psi, 1, 1, f"{name}_psi_0", relu=False)
    if second_sigmoid:
        psi = layers.Activation("sigmoid", name=f"{name}_psi_2")(psi)
    alpha = layers.Activation("sigmoid", name=f"{name}_gate_sigmoid")(psi)
    del rank
    return layers.Multiply(name=f"{name}_multiply")([x, alpha])


# ------------------------------------------------------------------------ MONAI
#
# `monai.networks.nets.AttentionUnet(spatial_dims, in_channels, out_channels, channels,
# strides=(2, ...))` with `channels = features * 2**level` (level 0..depth), layer for
# layer, its layers named after the module paths of its recursive state_dict
# (`model.1.submodule.1.attention.W_g.0.conv` -> `model_1_submodule_1_attention_W_g_0_conv`):
#
# - `model.0`: the head ConvBlock, two (3x3 Conv - BN - ReLU); `model.2.conv`: the
#   1x1 head.
# - `model.1`, `model.1.submodule.1`, ...: one `AttentionLayer` per level. Its encoder
#   ConvBlock (`submodule.0`; `submodule` at the bottom) starts with a stride-2 3x3
#   conv, PyTorch's padding 1, which is Keras's explicit one-voxel zero padding and a
#   `valid` conv (Keras's `same` pads only after the image at stride 2: one voxel off).
# - `upconv.up`: ConvTranspose (kernel 3, stride 2, padding 1, output padding 1) - BN -
#   ReLU: a `valid` Keras transposed conv (2N + 1 voxels) cropped by its first voxel.
# - `attention`: `W_g`, `W_x` (1x1 Conv + BN), `psi` (1x1 Conv + BN + Sigmoid) with
#   F_int = channels // 2, the gating signal the up-convolved map, `x * psi`.
# - `merge`: concat(gated skip, up-convolved map), then MONAI `Convolution`'s defaults:
#   3x3 Conv - InstanceNorm (no affine, no running statistics: the image's own
#   statistics in evaluation too) - PReLU (one parameter, 0.25).


def _check_monai(options):
    for name, value, expected in (("upsampling", options["upsampling"], "transpose"),
                                  ("batch_norm", options["batch_norm"], True),
                                  ("gate", options["gate"], "additive"),
                                  ("deep_supervision", options["deep_supervision"], False),
                                  ("backbone", options.get("backbone"), None),
                                  ("second_sigmoid", options["second_sigmoid"], False)):
        if value != expected:
            raise ValueError(f"{name}={value!r}: variant='monai' (MONAI's AttentionUnet) "
                             f"needs {name}={expected!r}.")
    if options["dropout"] not in (0, 0.0):
        raise ValueError(f"dropout={options['dropout']!r}: variant='monai' is built with "
                         "MONAI's default dropout 0; pass dropout=0.")
    _check_features(options)


def build_monai(rank, x, options, data_format, decoder, activate):
    """MONAI's AttentionUnet from the checked input `x` to its outputs (a list of one),
    on `models.decoder`'s loop with `monai_step`."""
    depth, features = options["depth"], options["features"]
    unit = functools.partial(_monai_unit, rank=rank, data_format=data_format)
    x = _monai_conv_block(x, features, 1, "model_0", unit)
    skips = []
    for level in range(depth):
        skips.append(x)
        encoder = _monai_prefix(level) + ("_submodule" if level == depth - 1
                                          else "_submodule_0")
        x = _monai_conv_block(x, features * 2 ** (level + 1), 2, encoder, unit)
    step = functools.partial(monai_step, rank=rank, data_format=data_format,
                             options=options, unit=unit)
    x, _ = decoder(x, skips, rank, data_format, options, step=step)
    x = blocks.conv(rank, options["n_label"], 1, data_format=data_format,
                    name="model_2_conv")(x)
    return [activate(x, options["output_activation"], data_format, "model_2_conv")]


def _monai_prefix(level):
    """The layer-name prefix of the AttentionLayer between widths `level`, `level+1`."""
    return "model_1" + "_submodule_1" * level


def monai_step(x, skip, level, *, rank, data_format, options, unit):
    """One AttentionLayer's way up: up-convolve, gate the skip, concatenate, merge."""
    prefix = _monai_prefix(level - 1)
    width = options["features"] * 2 ** (level - 1)
    channel_axis = _validation.channel_axis_for(data_format)
    up = blocks.conv_transpose(rank, width, 3, strides=2, padding="valid",
                               data_format=data_format, name=f"{prefix}_upconv_up_conv")(x)
    crop = ((1, 0),) * rank
    up = (layers.Cropping2D(crop, data_format=data_format) if rank == 2 else
          layers.Cropping3D(crop, data_format=data_format))(up)
    up = _monai_norm_act(up, f"{prefix}_upconv_up", data_format)
    g1 = unit(up, width // 2, 1, 1, f"{prefix}_attention_W_g", norm_name="1", relu=False)
    x1 = unit(skip, width // 2, 1, 1, f"{prefix}_attention_W_x", norm_name="1", relu=False)
    psi = layers.Activation("relu", name=f"{prefix}_attention_relu")(
        layers.Add(name=f"{prefix}_attention_add")([g1, x1]))
    psi = unit(psi, 1, 1, 1, f"{prefix}_attention_psi", norm_name="1", relu=False)
    alpha = layers.Activation("sigmoid", name=f"{prefix}_attention_gate_sigmoid")(psi)
    gated = layers.Multiply(name=f"{prefix}_attention_multiply")([skip, alpha])
    merged = layers.Concatenate(axis=channel_axis, name=f"{prefix}_concat")([gated, up])
    merged = blocks.conv(rank, width, 3, padding="same", data_format=data_format,
                         name=f"{prefix}_merge_conv")(merged)
    merged = layers.GroupNormalization(groups=width, axis=channel_axis, epsilon=1e-5,
                                       center=False, scale=False,
                                       name=f"{prefix}_merge_adn_N")(merged)
    return layers.PReLU(alpha_initializer=initializers_constant(0.25),
                        shared_axes=list(range(1, rank + 2)),
                        name=f"{prefix}_merge_adn_A")(merged)


def initializers_constant(value):
    from keras import initializers

    return initializers.Constant(value)


def _monai_norm_act(x, name, data_format):
    x = layers.BatchNormalization(
        axis=_validation.channel_axis_for(data_format), epsilon=TORCH_BN_EPSILON,
        momentum=TORCH_BN_MOMENTUM, name=f"{name}_adn_N")(x)
    return layers.Activation("relu", name=f"{name}_adn_A")(x)


def _monai_unit(x, filters, kernel, strides, name, *, rank, data_format, norm_name=None,
                relu=True):
    """A MONAI `Convolution` named `name`: its conv `name_conv` (PyTorch padding
    kernel // 2), then BN `name_adn_N` and ReLU `name_adn_A`; with `norm_name` the
    `nn.Sequential(Convolution(conv_only), BatchNorm)` of the gate (`name_0_conv`,
    `name_1`)."""
    conv_name = f"{name}_conv" if norm_name is None else f"{name}_0_conv"
    if strides > 1:  # PyTorch pads both sides; Keras's "same" at stride 2 does not
        pad = ((kernel // 2, kernel // 2),) * rank
        x = (layers.ZeroPadding2D(pad, data_format=data_format) if rank == 2 else
             layers.ZeroPadding3D(pad, data_format=data_format))(x)
        padding = "valid"
    else:
        padding = "same"
    x = blocks.conv(rank, filters, kernel, strides=strides, padding=padding,
                    data_format=data_format, name=conv_name)(x)
    if norm_name is not None:
        return layers.BatchNormalization(
            axis=_validation.channel_axis_for(data_format), epsilon=TORCH_BN_EPSILON,
            momentum=TORCH_BN_MOMENTUM, name=f"{name}_{norm_name}")(x)
    return _monai_norm_act(x, name, data_format) if relu else x


def _monai_conv_block(x, filters, strides, name, unit):
    """MONAI's ConvBlock `name`: `conv.0` (stride `strides`) and `conv.1`."""
    x = unit(x, filters, 3, strides, f"{name}_conv_0")
    return unit(x, filters, 3, 1, f"{name}_conv_1")
