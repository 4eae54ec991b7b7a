"""Pretrained encoders: `att_unet(..., backbone=NAME)` on a `keras.applications` model.

The encoder is the application itself (`include_top=False`), nested in the model as one
layer named `{backbone}_encoder` whose outputs are its feature maps at strides 2, 4, 8
and 16 (the skip connections) and its output at stride 32 (the bottleneck). The
decoder is this package's attention decoder with every decoder option: decoder level
`k` (named `dec{k}`, k = 4..1) up-samples, gates the skip at stride `2**k` with
`attention_up_and_concat` and applies a conv block of `features * 2**(k-1)` filters;
`dec0` up-samples to full resolution (no skip) with `features // 2` filters; then the
head. Image sizes must be multiples of 32.

The feature maps used (checked by tests/test_backbones.py against the strides):

| backbone | stride 2 | stride 4 | stride 8 | stride 16 | preprocessing |
| --- | --- | --- | --- | --- | --- |
| vgg16 | block2_conv2 | block3_conv3 | block4_conv3 | block5_conv3 | caffe |
| resnet50 | conv1_relu | conv2_block3_out | conv3_block4_out | conv4_block6_out | caffe |
| resnet50v2 | conv1_conv | conv2_block3_1_relu | conv3_block4_1_relu | conv4_block6_1_relu | tf |
| efficientnetb0..b3 | block2a_expand_activation | block3a_expand_activation | block4a_expand_activation | block6a_expand_activation | inside the application |
| mobilenetv2 | block_1_expand_relu | block_3_expand_relu | block_6_expand_relu | block_13_expand_relu | tf |
| convnext_tiny | `stride2_conv` (ours) | stage_0_block_2_identity | stage_1_block_2_identity | stage_2_block_8_identity | inside the application |

ConvNeXt has no stride-2 stage (its stem is a 4x4 patchify convolution), so its
stride-2 skip is a 3x3 stride-2 Conv-ReLU of the input, `stride2_conv`, trained from
scratch. The model takes the package's images (normalised to [0, 1]); the backbone's
own preprocessing is the layer `backbone_preprocessing` inside the model
(`layers.BackbonePreprocessing`), so exported models need nothing extra. With
`in_channels != 3` a 1x1 convolution `input_to_rgb` (no bias, trainable) maps the
input to the 3 channels the application takes, initialised to the channel mean
repeated three times (a gray image becomes gray RGB, as ImageNet models expect).
"""

import collections
import os

import keras

from attunet_keras import layers as layers_lib

Backbone = collections.namedtuple("Backbone", ["application", "skips", "preprocessing"])

_EFFICIENTNET_SKIPS = ("block2a_expand_activation", "block3a_expand_activation",
                       "block4a_expand_activation", "block6a_expand_activation")

BACKBONES = {
    "vgg16": Backbone("VGG16", ("block2_conv2", "block3_conv3", "block4_conv3",
                                "block5_conv3"), "caffe"),
    "resnet50": Backbone("ResNet50", ("conv1_relu", "conv2_block3_out", "conv3_block4_out",
                                      "conv4_block6_out"), "caffe"),
    "resnet50v2": Backbone("ResNet50V2", ("conv1_conv", "conv2_block3_1_relu",
                                          "conv3_block4_1_relu", "conv4_block6_1_relu"), "tf"),
    "efficientnetb0": Backbone("EfficientNetB0", _EFFICIENTNET_SKIPS, "raw"),
    "efficientnetb1": Backbone("EfficientNetB1", _EFFICIENTNET_SKIPS, "raw"),
    "efficientnetb2": Backbone("EfficientNetB2", _EFFICIENTNET_SKIPS, "raw"),
    "efficientnetb3": Backbone("EfficientNetB3", _EFFICIENTNET_SKIPS, "raw"),
    "mobilenetv2": Backbone("MobileNetV2", ("block_1_expand_relu", "block_3_expand_relu",
                                            "block_6_expand_relu", "block_13_expand_relu"),
                            "tf"),
    "convnext_tiny": Backbone("ConvNeXtTiny", (None, "convnext_tiny_stage_0_block_2_identity",
                                               "convnext_tiny_stage_1_block_2_identity",
                                               "convnext_tiny_stage_2_block_8_identity"),
                              "raw"),
}
STRIDE = 32
# BatchNormalization momentum of a randomly initialised encoder. keras.applications
# build MobileNetV2 with 0.999, tuned for ImageNet's hundreds of thousands of steps: on
# a few hundred steps the moving statistics stay near their initial values and the
# model predicts nothing in inference mode (docs/benchmarks.md). Keras's default,
# 0.99, follows the batches within a few hundred steps. Pretrained encoders keep the
# application's momentum: their statistics have already converged.
RANDOM_INIT_BN_MOMENTUM = 0.99


def check_backbone_arguments(sizes, options):
    """Checks the backbone options of `att_unet`; raises one ValueError naming the first bad one."""
    backbone = options["backbone"]
    if backbone not in BACKBONES:
        raise ValueError(
            f"backbone={backbone!r} is not supported; expected None or one of "
            f"{tuple(BACKBONES)}."
        )
    if options["data_format"] != "channels_last":
        raise ValueError(
            f"backbone={backbone!r} needs data_format='channels_last': keras.applications "
            f"models are built channels_last; received {options['data_format']!r}."
        )
    if options["depth"] != 4:
        raise ValueError(
            f"depth={options['depth']} is not allowed with a backbone: the encoder gives "
            "skips at strides 2, 4, 8, 16 and the bottleneck at 32, so depth is 4."
        )
    for name, size in sizes.items():
        if size is not None and size % STRIDE:
            below = size // STRIDE * STRIDE
            nearest = f"{below} or {below + STRIDE}" if below else f"{STRIDE}"
            raise ValueError(
                f"{name}={size} must be divisible by {STRIDE} with a backbone (its output "
                f"is at stride {STRIDE}); nearest valid: {nearest}."
            )
    weights = options["backbone_weights"]
    if weights not in (None, "imagenet") and not (
            isinstance(weights, (str, os.PathLike)) and os.path.isfile(weights)):
        raise ValueError(
            f"backbone_weights={weights!r} is not allowed; expected None (random), "
            "'imagenet' (Keras downloads them) or the path of an existing weights file "
            f"of keras.applications.{BACKBONES[backbone].application}(include_top=False)."
        )
    if not isinstance(options["freeze_backbone"], bool):
        raise ValueError(f"freeze_backbone={options['freeze_backbone']!r} is not allowed; "
                         "expected True or False.")


def encoder(backbone, weights=None):
    """The application as a model of its stride 2, 4, 8, 16 maps and its output (stride 32).

    Its image sizes are free (the model's input fixes them), so a model trained on
    tiles runs on any size. ConvNeXt has no stride-2 map: its list starts at stride 4.
    With `weights=None` no BatchNormalization momentum is above
    `RANDOM_INIT_BN_MOMENTUM`.
    """
    spec = BACKBONES[backbone]
    path = None
    if weights not in (None, "imagenet"):
        path, weights = os.fspath(weights), None
    application = getattr(keras.applications, spec.application)(
        include_top=False, weights=weights, input_shape=(None, None, 3))
    if path is not None:
        load_weights_file(application, path, spec.application)
    elif weights is None:
        for layer in application.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = min(layer.momentum, RANDOM_INIT_BN_MOMENTUM)
    outputs = [application.get_layer(name).output for name in spec.skips if name]
    return keras.Model(application.input, outputs + [application.output],
                       name=f"{backbone}_encoder")


def check_weights_file(backbone, path):
    """Loads the weights file `path` into a fresh `backbone` application: one ValueError
    naming the file and what it holds when it is not that application's weights (the
    check `train` runs before it writes anything)."""
    spec = BACKBONES[backbone]
    application = getattr(keras.applications, spec.application)(
        include_top=False, weights=None, input_shape=(None, None, 3))
    load_weights_file(application, path, spec.application)


def load_weights_file(application, path, name):
    """`application.load_weights(path)`, with one line for a file that does not fit
    (`name`: the keras.applications function).

    Keras's own errors are an HDF5 message without the file's name ("file signature
    not found") or a dump of every layer; this says which file, and what it holds.
    """
    import warnings

    try:
        with warnings.catch_warnings():  # one warning per layer that does not match
            warnings.simplefilter("ignore")
            application.load_weights(path)
    except Exception:  # any failure means: not this application's weights
        raise ValueError(f"backbone_weights={path}: {_weights_mismatch(application, path)} "
                         f"Expected a weights file of keras.applications.{name}"
                         "(include_top=False).") from None


def _weights_mismatch(application, path):
    """What `path` holds, in one sentence, when it is not `application`'s weights.

    Keras 3 `.weights.h5` files name their groups by layer type (`conv2d_12`), the
    legacy `.h5` files of keras.applications by layer name (`block1_conv1`): the
    sentence counts the layers by type, or names the layers this network lacks.
    """
    import collections
    import re

    import h5py

    if not h5py.is_hdf5(path):
        return "is not an HDF5 weights file (.h5 or .weights.h5)."
    with h5py.File(path, "r") as file:
        if "layer_names" in file.attrs:
            names = [name.decode() if isinstance(name, bytes) else str(name)
                     for name in file.attrs["layer_names"]]
            expected = {layer.name for layer in application.layers}
            foreign = [name for name in names if name not in expected]
            if foreign:
                return (f"holds the weights of {len(names)} layers, {len(foreign)} of which "
                        f"this network lacks ({', '.join(foreign[:3])}, ...): the weights "
                        "of another network.")
            return "holds weights for this network's layers of other shapes."
        if "layers" not in file:
            return "is an HDF5 file without Keras weights in it."
        kinds = collections.Counter(re.sub(r"_\d+$", "", key) for key in file["layers"])

    def snake(name):  # Keras's own naming of the groups (keras.src.utils.naming)
        name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
        return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()

    wanted = collections.Counter(snake(type(layer).__name__) for layer in application.layers)

    def listed(counts):
        return ", ".join(f"{count} {kind}" for kind, count in counts.most_common(3))

    if kinds != wanted:
        return (f"holds the weights of {sum(kinds.values())} layers ({listed(kinds)}), where "
                f"this network has {sum(wanted.values())} ({listed(wanted)}, ...): the "
                "weights of another network.")
    return "holds weights for this network's layers of other shapes."


def build(sizes, options, decoder, heads, conv_block):
    """The backbone `att_unet` (see the module); `options` are `att_unet`'s arguments,
    `decoder`, `heads` and `conv_block` the plain model's (`models.decoder`,
    `models.heads`, its conv block), so both run one decoder loop."""
    backbone, features = options["backbone"], options["features"]
    spec = BACKBONES[backbone]
    in_channels = options["in_channels"]
    block_options = dict(rank=2, data_format="channels_last", dropout=options["dropout"],
                         batch_norm=options["batch_norm"])

    inputs = keras.Input(shape=tuple(sizes) + (in_channels,), name="image")
    rgb = inputs
    if in_channels != 3:
        rgb = keras.layers.Conv2D(
            3, 1, use_bias=False, name="input_to_rgb",
            kernel_initializer=keras.initializers.Constant(1.0 / in_channels))(inputs)
    preprocessed = layers_lib.BackbonePreprocessing(
        spec.preprocessing, name="backbone_preprocessing")(rgb)
    features_maps = encoder(backbone, options["backbone_weights"])
    if options["freeze_backbone"]:
        features_maps.trainable = False  # BatchNormalization then runs in inference mode
    maps = features_maps(preprocessed)
    skips, x = list(maps[:-1]), maps[-1]
    if spec.skips[0] is None:
        skips.insert(0, keras.layers.Conv2D(max(features, 1), 3, strides=2, padding="same",
                                            activation="relu", name="stride2_conv")(rgb))

    # The skips are at strides 2..16: decoder level k is at stride 2**k, and every
    # level is supervised (the top conv block below is at the input's stride).
    x, side_outputs = decoder(x, skips, 2, "channels_last", options,
                              supervised=lambda level: True)
    x = _upsample(x, options["upsampling"], features)
    x = conv_block(x, max(features // 2, 1), name="dec0", **block_options)
    outputs = heads(2, x, side_outputs, "channels_last", options,
                    stride=lambda level: 2 ** level)
    return keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0],
                       name=options["name"])


def _upsample(x, upsampling, features):
    if upsampling == "transpose":
        return keras.layers.Conv2DTranspose(x.shape[-1], 2, strides=2, name="dec0_up")(x)
    return keras.layers.UpSampling2D(2, interpolation=upsampling, name="dec0_up")(x)
