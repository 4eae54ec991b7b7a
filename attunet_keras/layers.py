"""The package's Keras layers: size checks and padding for fully convolutional models.

Every class is registered with Keras (package `attunet_keras`), so a model that holds
one loads with `keras.saving.load_model` once `attunet_keras` is imported.

- `SpatialSizeCheck`: the identity, raising a clear error when an image's spatial size
  is not a multiple of `2**depth` (`att_unet` with free sizes puts it after its input).
- `BackbonePreprocessing`: maps the package's [0, 1] images to what a
  `keras.applications` backbone expects (see `backbones`).
- `PadToMultiple` and `CropToReference`: pad every spatial axis at its end to a
  multiple (reflecting the image), and crop a prediction back to the size of the
  image; `inference.serving_model` puts them around a model so that it takes any size.
"""

import keras
from keras import ops

from attunet_keras import _validation


def _spatial_axes(rank, data_format):
    return list(range(2, rank)) if data_format == "channels_first" else list(range(1, rank - 1))


class _MultipleLayer(keras.layers.Layer):
    """Base of the layers that take a spatial `multiple` and a `data_format`."""

    def __init__(self, multiple, data_format=None, **kwargs):
        super().__init__(**kwargs)
        _validation.check_int("multiple", multiple, 1)
        self.multiple = multiple
        self.data_format = _validation.resolve_data_format(data_format)

    def get_config(self):
        config = super().get_config()
        config.update(multiple=self.multiple, data_format=self.data_format)
        return config


@keras.saving.register_keras_serializable(package="attunet_keras")
class SpatialSizeCheck(_MultipleLayer):
    """The identity, for images whose every spatial size is a multiple of `multiple`.

    Sizes known when the model is traced are checked in Python (a `ValueError`);
    under TensorFlow, sizes known only at run time are checked by an assertion in the
    graph with the same message.

    Args:
        multiple: int. The required multiple (`2**depth` for an `att_unet`).
        data_format: str or None. Layout of the images.
    """


    def _message(self, sizes):
        return (
            f"the image's spatial size {sizes} must be a multiple of {self.multiple} "
            f"(2**depth) in every axis; pad it (attunet_keras.inference.predict_probabilities "
            f"and exported models pad and crop back for you)."
        )

    def call(self, inputs):
        axes = _spatial_axes(len(inputs.shape), self.data_format)
        static = [inputs.shape[axis] for axis in axes]
        if all(size is not None for size in static):
            if any(size % self.multiple for size in static):
                raise ValueError(self._message(tuple(static)))
            return inputs
        if keras.backend.backend() != "tensorflow":
            return inputs
        import tensorflow as tf

        sizes = tf.gather(tf.shape(inputs), axes)
        check = tf.debugging.Assert(
            tf.reduce_all(tf.equal(sizes % self.multiple, 0)),
            [self._message("(see below)"), sizes])
        with tf.control_dependencies([check]):
            return tf.identity(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape



@keras.saving.register_keras_serializable(package="attunet_keras")
class PadToMultiple(_MultipleLayer):
    """Pads every spatial axis at its end to a multiple of `multiple`.

    The padding reflects the image (as `numpy.pad(mode="reflect")`); an axis shorter
    than its padding (an image of a few pixels) is reflected as far as it can be and
    padded with zeros beyond.

    Args:
        multiple: int. The multiple (`2**depth` for an `att_unet`).
        data_format: str or None. Layout of the images.
    """


    def call(self, inputs):
        rank = len(inputs.shape)
        shape = ops.shape(inputs)
        reflected = [[0, 0] for _ in range(rank)]
        zeros = [[0, 0] for _ in range(rank)]
        for axis in _spatial_axes(rank, self.data_format):
            size = shape[axis]
            pad = (self.multiple - size % self.multiple) % self.multiple
            reach = ops.minimum(pad, ops.maximum(size - 1, 0))
            reflected[axis][1] = reach
            zeros[axis][1] = pad - reach
        return ops.pad(ops.pad(inputs, reflected, mode="reflect"), zeros)

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        for axis in _spatial_axes(len(shape), self.data_format):
            if shape[axis] is not None:
                shape[axis] = -(-shape[axis] // self.multiple) * self.multiple
        return tuple(shape)



@keras.saving.register_keras_serializable(package="attunet_keras")
class CropToReference(keras.layers.Layer):
    """Crops `inputs[0]` to the spatial size of `inputs[1]`, keeping the start.

    Args:
        data_format: str or None. Layout of both tensors.
    """

    def __init__(self, data_format=None, **kwargs):
        super().__init__(**kwargs)
        self.data_format = _validation.resolve_data_format(data_format)

    def call(self, inputs):
        tensor, reference = inputs
        rank = len(tensor.shape)
        reference_shape = ops.shape(reference)
        sizes = [-1] * rank
        for axis in _spatial_axes(rank, self.data_format):
            sizes[axis] = reference_shape[axis]
        return ops.slice(tensor, [0] * rank, sizes)

    def compute_output_shape(self, input_shapes):
        shape, reference = list(input_shapes[0]), input_shapes[1]
        for axis in _spatial_axes(len(shape), self.data_format):
            shape[axis] = reference[axis]
        return tuple(shape)

    def get_config(self):
        config = super().get_config()
        config.update(data_format=self.data_format)
        return config


@keras.saving.register_keras_serializable(package="attunet_keras")
class BackbonePreprocessing(keras.layers.Layer):
    """Maps [0, 1] RGB images (channels_last) to a `keras.applications` model's input.

    Modes, as `keras.applications.imagenet_utils.preprocess_input`:
    `"caffe"` (VGG16, ResNet50): 0..255, RGB to BGR, ImageNet means subtracted;
    `"tf"` (ResNet50V2, MobileNetV2): -1..1; `"raw"` (EfficientNet, ConvNeXt, which
    normalise inside the application): 0..255.

    Args:
        mode: str. One of `MODES`.
    """

    MODES = ("caffe", "tf", "raw")
    _CAFFE_MEANS_BGR = (103.939, 116.779, 123.68)

    def __init__(self, mode, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"mode={mode!r} is not supported; expected one of {self.MODES}.")
        self.mode = mode

    def call(self, inputs):
        if self.mode == "tf":
            return inputs * 2.0 - 1.0
        scaled = inputs * 255.0
        if self.mode == "raw":
            return scaled
        bgr = ops.flip(scaled, axis=-1)
        return bgr - ops.convert_to_tensor(self._CAFFE_MEANS_BGR, dtype=bgr.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(mode=self.mode)
        return config


# --------------------------------------------------- channels_first convolutions
#
# Keras 3.15's TensorFlow `ops.add(x, bias)` becomes `tf.nn.bias_add` in NHWC whenever
# x's last axis has the bias's length, even for the `(1, C, 1, 1)` bias a
# channels_first convolution adds: a channels_first convolution whose last spatial
# size equals its filter count (a 64x64 map with 64 filters) adds its bias along the
# width instead of the channels. With free sizes (None) the same layer adds it right,
# so a model trained on fixed tiles would compute something else when served at any
# size. These subclasses add the bias first (`ops.add(bias, x)`), a plain broadcast;
# `blocks.conv` and `blocks.conv_transpose` build them for channels_first. They keep
# Keras's class names, so `model.summary()` reads as before.


def _add_channels_first_bias(layer, outputs):
    bias = ops.reshape(layer.bias, (1, layer.filters) + (1,) * layer.rank)
    outputs = ops.add(bias, outputs)
    return layer.activation(outputs) if layer.activation is not None else outputs


class _ChannelsFirstConv:
    def call(self, inputs):
        if self.data_format != "channels_first" or not self.use_bias:
            return super().call(inputs)
        return _add_channels_first_bias(self, self.convolution_op(inputs, self.kernel))


class _ChannelsFirstConvTranspose:
    def call(self, inputs):
        if self.data_format != "channels_first" or not self.use_bias:
            return super().call(inputs)
        outputs = ops.conv_transpose(
            inputs, self.kernel, strides=list(self.strides), padding=self.padding,
            output_padding=self.output_padding, dilation_rate=self.dilation_rate,
            data_format=self.data_format)
        return _add_channels_first_bias(self, outputs)


@keras.saving.register_keras_serializable(package="attunet_keras")
class Conv2D(_ChannelsFirstConv, keras.layers.Conv2D):
    """`keras.layers.Conv2D` with the channels_first bias added on the channels."""


@keras.saving.register_keras_serializable(package="attunet_keras")
class Conv3D(_ChannelsFirstConv, keras.layers.Conv3D):
    """`keras.layers.Conv3D` with the channels_first bias added on the channels."""


@keras.saving.register_keras_serializable(package="attunet_keras")
class Conv2DTranspose(_ChannelsFirstConvTranspose, keras.layers.Conv2DTranspose):
    """`keras.layers.Conv2DTranspose` with the channels_first bias on the channels."""


@keras.saving.register_keras_serializable(package="attunet_keras")
class Conv3DTranspose(_ChannelsFirstConvTranspose, keras.layers.Conv3DTranspose):
    """`keras.layers.Conv3DTranspose` with the channels_first bias on the channels."""
