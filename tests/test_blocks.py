"""Tests of attunet_keras.blocks: the attention gate and the up/gate/concat step."""

import keras
import numpy as np
import pytest

import attunet_keras
from attunet_keras import blocks
from helpers import image_batch
from helpers import to_channels_last


def _inputs(channels, size, data_format, name):
    if data_format == "channels_first":
        return keras.Input((channels, size, size), name=name)
    return keras.Input((size, size, channels), name=name)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _conv1x1(array_nhwc, kernel, bias):
    """A 1x1 convolution in NumPy: kernel (1, 1, in, out), NHWC."""
    return np.einsum("nhwc,cd->nhwd", array_nhwc, kernel[0, 0]) + bias


def test_public_api_exports_the_builders():
    assert attunet_keras.attn_block_2d is blocks.attn_block_2d
    assert attunet_keras.attention_up_and_concat is blocks.attention_up_and_concat
    assert callable(attunet_keras.att_unet)


def test_attn_block_shapes_names_and_parameters(data_format):
    x = _inputs(16, 8, data_format, "x")
    g = _inputs(24, 8, data_format, "g")
    gated = blocks.attn_block_2d(x, g, 6, data_format=data_format, name="gate")
    model = keras.Model([x, g], gated)

    assert tuple(gated.shape) == tuple(x.shape)
    assert [layer.name for layer in model.layers[2:]] == [
        "gate_theta", "gate_phi", "gate_add", "gate_relu", "gate_psi",
        "gate_sigmoid", "gate_multiply",
    ]
    # Closed form: theta 16*6+6, phi 24*6+6, psi 6*1+1.
    assert model.count_params() == (16 * 6 + 6) + (24 * 6 + 6) + (6 + 1)
    assert tuple(model.get_layer("gate_sigmoid").output.shape)[
        1 if data_format == "channels_first" else -1
    ] == 1


def test_attn_block_computes_the_additive_gate(data_format):
    """The block equals x * sigmoid(psi(relu(theta(x) + phi(g)))) written in NumPy."""
    x = _inputs(5, 4, data_format, "x")
    g = _inputs(7, 4, data_format, "g")
    model = keras.Model([x, g], blocks.attn_block_2d(x, g, 3, data_format, name="a"))
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([rng.normal(size=w.shape).astype("float32")
                               for w in layer.get_weights()])
    x_value = image_batch(2, 5, 4, 4, data_format, seed=2)
    g_value = image_batch(2, 7, 4, 4, data_format, seed=3)

    got = model.predict([x_value, g_value], verbose=0)

    x_nhwc, g_nhwc = x_value, g_value
    if data_format == "channels_first":
        x_nhwc, g_nhwc = to_channels_last(x_value), to_channels_last(g_value)
    theta = _conv1x1(x_nhwc, *model.get_layer("a_theta").get_weights())
    phi = _conv1x1(g_nhwc, *model.get_layer("a_phi").get_weights())
    psi = _conv1x1(np.maximum(theta + phi, 0), *model.get_layer("a_psi").get_weights())
    expected = x_nhwc * _sigmoid(psi)
    if data_format == "channels_first":
        got = to_channels_last(got)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_attention_up_and_concat_shapes_and_names(data_format):
    down = _inputs(64, 4, data_format, "down")
    skip = _inputs(32, 8, data_format, "skip")
    out = blocks.attention_up_and_concat(down, skip, data_format, name="dec1")
    model = keras.Model([down, skip], out)

    channel_axis = 1 if data_format == "channels_first" else -1
    assert out.shape[channel_axis] == 64 + 32
    spatial = tuple(out.shape)[2:] if data_format == "channels_first" else tuple(
        out.shape)[1:3]
    assert spatial == (8, 8)
    names = [layer.name for layer in model.layers if not layer.name in ("down", "skip")]
    assert names[0] == "dec1_up" and names[-1] == "dec1_concat"
    assert "dec1_gate_theta" in names and "dec1_gate_sigmoid" in names
    # inter_channel = 64 // 4 = 16: theta 32*16+16, phi 64*16+16, psi 16+1.
    assert model.count_params() == (32 * 16 + 16) + (64 * 16 + 16) + 17


def test_attention_up_and_concat_puts_nearest_upsampled_channels_first(data_format):
    down = _inputs(8, 2, data_format, "down")
    skip = _inputs(4, 4, data_format, "skip")
    model = keras.Model(
        [down, skip], blocks.attention_up_and_concat(down, skip, data_format)
    )
    down_value = image_batch(1, 8, 2, 2, data_format, seed=4)
    skip_value = image_batch(1, 4, 4, 4, data_format, seed=5)

    got = model.predict([down_value, skip_value], verbose=0)

    if data_format == "channels_first":
        got, down_value = to_channels_last(got), to_channels_last(down_value)
    nearest = down_value.repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_array_equal(got[..., :8], nearest)


def test_unnamed_blocks_get_unique_names(data_format):
    x = _inputs(8, 4, data_format, "x")
    first = blocks.attn_block_2d(x, x, 2, data_format)
    second = blocks.attn_block_2d(first, x, 2, data_format)
    model = keras.Model(x, second)
    names = [layer.name for layer in model.layers]
    assert len(names) == len(set(names))


def test_block_data_format_none_follows_keras_config():
    keras.config.set_image_data_format("channels_first")
    x = keras.Input((8, 4, 6))
    gated = blocks.attn_block_2d(x, x, 2)
    assert tuple(gated.shape) == (None, 8, 4, 6)


@pytest.mark.parametrize(
    "x_shape, g_shape, inter_channel, match",
    [
        ((8, 8), (8, 8, 4), 2, r"x must be a 4D tensor"),
        ((8, 8, 4), (8, 8, 4, 1), 2, r"g must be a 4D tensor"),
        ((8, 8, 4), (4, 4, 4), 2, r"x has spatial shape \(8, 8\) but g has \(4, 4\)"),
        ((8, 8, 4), (8, 8, 4), 0, r"inter_channel=0 is not allowed.*>= 1"),
        ((8, 8, 4), (8, 8, 4), 2.5, r"inter_channel=2.5 is not allowed"),
    ],
)
def test_attn_block_rejects_bad_input(x_shape, g_shape, inter_channel, match):
    x = keras.Input(x_shape)
    g = keras.Input(g_shape)
    with pytest.raises(ValueError, match=match):
        blocks.attn_block_2d(x, g, inter_channel, data_format="channels_last")


def test_attn_block_rejects_unknown_data_format():
    x = keras.Input((8, 8, 4))
    with pytest.raises(ValueError, match=r"data_format='NHWC' is not supported"):
        blocks.attn_block_2d(x, x, 2, data_format="NHWC")


@pytest.mark.parametrize(
    "down_shape, skip_shape, match",
    [
        ((4, 4, 8), (16, 16, 4), r"down_layer up-sampled x2 has spatial shape \(8, 8\) "
                                 r"but layer has \(16, 16\)"),
        ((4, 4, 3), (8, 8, 4), r"down_layer has 3 channels.*at least 4 channels"),
        ((4, 4), (8, 8, 4), r"down_layer must be a 4D tensor"),
        ((4, 4, 8), (8, 8, 4, 2), r"layer must be a 4D tensor"),
    ],
)
def test_attention_up_and_concat_rejects_bad_input(down_shape, skip_shape, match):
    down = keras.Input(down_shape)
    skip = keras.Input(skip_shape)
    with pytest.raises(ValueError, match=match):
        blocks.attention_up_and_concat(down, skip, data_format="channels_last")


def test_attention_up_and_concat_accepts_unknown_spatial_sizes(data_format):
    down = _inputs(8, None, data_format, "down")
    skip = _inputs(4, None, data_format, "skip")
    model = keras.Model(
        [down, skip], blocks.attention_up_and_concat(down, skip, data_format)
    )
    out = model.predict(
        [image_batch(1, 8, 3, 5, data_format), image_batch(1, 4, 6, 10, data_format)],
        verbose=0,
    )
    expected = (1, 12, 6, 10) if data_format == "channels_first" else (1, 6, 10, 12)
    assert out.shape == expected


@pytest.mark.parametrize("rank, transpose", [(2, False), (3, False), (2, True), (3, True)])
def test_channels_first_convolutions_equal_channels_last_when_a_size_equals_the_filters(
        rank, transpose):
    """A channels_first map whose last spatial size equals the filter count (4 here):
    Keras 3.15's own layer adds the bias along that axis on TensorFlow (see
    `attunet_keras.layers.Conv2D`); the package's convolutions add it on the channels,
    so both layouts compute the same."""
    factory = blocks.conv_transpose if transpose else blocks.conv
    images = np.random.default_rng(0).normal(size=(2, 3) + (4,) * rank).astype("float32")
    first = factory(rank, 4, 3, padding="same", data_format="channels_first",
                    bias_initializer="random_normal")
    last = factory(rank, 4, 3, padding="same", data_format="channels_last")
    first.build(images.shape)
    last.build((2,) + images.shape[2:] + (3,))
    last.set_weights(first.get_weights())
    assert float(np.abs(first.get_weights()[1]).min()) > 0  # a bias to misplace
    expected = np.moveaxis(np.asarray(last(np.moveaxis(images, 1, -1))), -1, 1)
    np.testing.assert_allclose(np.asarray(first(images)), expected, atol=1e-5)
