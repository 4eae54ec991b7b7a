"""The options beyond the reference: parameter counts in closed form, round trips, errors.

Parameter counts are worked out by hand below from the layer formulas, for a tiny 2D
model (depth 1, 4 base features, 1 input channel, 1 label):

    conv3x3(cin, cout) = 9 cin cout + cout      conv1x1(cin, cout) = cin cout + cout
    BatchNormalization(c) = 4 c (gamma, beta, moving mean, moving variance)

    encoder   conv3x3(1, 4) + conv3x3(4, 4)       = 40 + 148   = 188
    bottleneck conv3x3(4, 8) + conv3x3(8, 8)      = 296 + 584  = 880
    gate (inter 8 // 4 = 2) theta conv1x1(4, 2) + phi conv1x1(8, 2) + psi conv1x1(2, 1)
                                                  = 10 + 18 + 3 = 31
    decoder   conv3x3(8 + 4, 4) + conv3x3(4, 4)   = 436 + 148  = 584
    head      conv1x1(4, 1)                       = 5
    total                                         = 1688
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from attunet_keras import blocks
from attunet_keras import models
from helpers import image_batch

BASE = 1688
BASE_ADDITIVE_GATE = 31

# batch_norm: every 3x3 conv loses its bias (-cout) and gains BN (+4 cout); the gate's
# theta 4*2 + BN 8, phi 8*2 + BN 8, psi 2*1 + BN 4.
BATCH_NORM = (36 + 16) + (144 + 16) + (288 + 32) + (576 + 32) + (8 + 8) + (16 + 8) + (
    2 + 4) + (432 + 16) + (144 + 16) + 5                                    # = 1799
# transpose: Conv2DTranspose(8 -> 8, kernel 2) = 2*2*8*8 + 8 = 264 more.
TRANSPOSE = BASE + 264                                                      # = 1952
# grid gate: theta 2x2 stride-2 conv without bias 2*2*4*2 = 32, phi conv1x1(8, 2) = 18,
# psi conv1x1(2, 1) = 3, output conv1x1(4, 4) = 20 and its BN 4*4 = 16.
GRID = BASE - BASE_ADDITIVE_GATE + (32 + 18 + 3 + 20 + 16)                  # = 1746
# depth 2 (as att_unet(.., depth=2, features=4, in_channels=1)): 7,605 (worked out in
# the same way); deep supervision adds the dec2 head conv1x1(8, 1) = 9.
DEPTH_2 = 7605
DEEP_SUPERVISION = DEPTH_2 + 9                                              # = 7614
# 3D: conv3x3x3(cin, cout) = 27 cin cout + cout; gate and head as in 2D.
THREE_D = (112 + 436) + (872 + 1736) + BASE_ADDITIVE_GATE + (1300 + 436) + 5  # = 4928

VARIANTS = {
    "reference": (dict(), BASE),
    "no_dropout": (dict(dropout=0.0), BASE),
    "batch_norm": (dict(batch_norm=True), BATCH_NORM),
    "bilinear": (dict(upsampling="bilinear"), BASE),
    "transpose": (dict(upsampling="transpose"), TRANSPOSE),
    "grid_gate": (dict(gate="grid"), GRID),
    # head conv1x1(4, 3) = 15 instead of conv1x1(4, 1) = 5
    "softmax": (dict(n_label=3, output_activation="softmax"), BASE + 10),
    "logits": (dict(output_activation=None), BASE),
    "deep_supervision": (dict(depth=2, deep_supervision=True), DEEP_SUPERVISION),
    "everything": (dict(batch_norm=True, upsampling="transpose", gate="grid",
                        dropout=0.1), None),
}


def _build(options, data_format, size=32, three_d=False):
    arguments = dict(n_label=1, depth=1, features=4, in_channels=1,
                     data_format=data_format)
    arguments.update(options)
    if three_d:
        return models.att_unet_3d(size, size, size, **arguments)
    return models.att_unet(size, size, **arguments)


def _input(model, data_format, three_d=False, batch=2, size=32):
    shape = (batch, 1) + (size,) * (3 if three_d else 2)
    array = np.random.default_rng(0).random(shape, dtype="float32")
    return array if data_format == "channels_first" else np.moveaxis(array, 1, -1)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_parameter_count_and_forward_pass(variant, data_format):
    options, expected = VARIANTS[variant]
    model = _build(options, data_format)
    if expected is not None:
        assert model.count_params() == expected
    outputs = model.predict(_input(model, data_format), verbose=0)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    n_label = options.get("n_label", 1)
    expected_shape = (2, n_label, 32, 32) if data_format == "channels_first" else (
        2, 32, 32, n_label)
    assert all(output.shape == expected_shape for output in outputs)
    assert all(np.all(np.isfinite(output)) for output in outputs)


def test_dropout_zero_builds_no_dropout_layers():
    model = _build(dict(dropout=0.0), "channels_last")
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)
    rate = [layer.rate for layer in _build(dict(dropout=0.3), "channels_last").layers
            if isinstance(layer, keras.layers.Dropout)]
    assert rate == [0.3, 0.3, 0.3]


def test_batch_norm_layers_follow_every_convolution():
    model = _build(dict(batch_norm=True), "channels_first")
    names = [layer.name for layer in model.layers]
    for prefix in ("enc1", "bottleneck", "dec1"):
        for index in (1, 2):
            position = names.index(f"{prefix}_conv{index}")
            assert names[position + 1:position + 3] == [f"{prefix}_bn{index}",
                                                        f"{prefix}_relu{index}"]
    for part in ("theta", "phi", "psi"):
        assert f"dec1_gate_{part}_bn" in names
    assert all(layer.axis in (1, [1]) for layer in model.layers
               if isinstance(layer, keras.layers.BatchNormalization))


def test_three_d_parameter_count_and_forward_pass(data_format):
    model = _build({}, data_format, size=16, three_d=True)
    assert model.count_params() == THREE_D
    out = model.predict(_input(model, data_format, three_d=True, size=16), verbose=0)
    assert out.shape == ((2, 1, 16, 16, 16) if data_format == "channels_first" else (
        2, 16, 16, 16, 1))


@pytest.mark.parametrize("options", [dict(gate="grid"), dict(upsampling="transpose"),
                                     dict(batch_norm=True, deep_supervision=True,
                                          depth=2)])
def test_three_d_variants_build_and_run(options):
    model = _build(options, "channels_last", size=16, three_d=True)
    outputs = model.predict(_input(model, "channels_last", three_d=True, size=16),
                            verbose=0)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    assert all(output.shape == (2, 16, 16, 16, 1) for output in outputs)


def test_three_d_input_follows_the_size_order():
    model = models.att_unet_3d(16, 32, 48, 2, depth=2, features=4,
                               data_format="channels_first", in_channels=2)
    assert tuple(model.input.shape) == (None, 2, 16, 32, 48)


@pytest.mark.parametrize("variant", ["batch_norm", "transpose", "grid_gate",
                                     "deep_supervision", "softmax"])
def test_variants_reload_in_safe_mode_and_export(variant, tmp_path):
    model = _build(VARIANTS[variant][0], "channels_last")
    batch = _input(model, "channels_last")
    expected = model.predict(batch, verbose=0)
    expected = expected if isinstance(expected, list) else [expected]

    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    again = reloaded.predict(batch, verbose=0)
    again = again if isinstance(again, list) else [again]
    for a, b in zip(expected, again):
        np.testing.assert_allclose(a, b, atol=1e-6)

    model.export(str(tmp_path / "saved"), verbose=False)
    reloaded_export = tf.saved_model.load(str(tmp_path / "saved"))  # keep it alive
    served = reloaded_export.serve(tf.constant(batch))
    served = served if isinstance(served, (list, tuple)) else [served]
    for a, b in zip(expected, served):
        np.testing.assert_allclose(a, np.asarray(b), atol=1e-5)


def test_three_d_reloads_in_safe_mode(tmp_path):
    model = _build(dict(gate="grid"), "channels_first", size=16, three_d=True)
    batch = _input(model, "channels_first", three_d=True, size=16)
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    np.testing.assert_allclose(reloaded.predict(batch, verbose=0),
                               model.predict(batch, verbose=0), atol=1e-6)


def test_deep_supervision_outputs_are_named_and_the_plain_output_first():
    model = _build(dict(depth=3, deep_supervision=True), "channels_last")
    assert model.output_names == ["head_sigmoid", "dec2_head_sigmoid", "dec3_head_sigmoid"]
    assert model.get_layer("dec3_head_up").size == (4, 4)


def test_deep_supervision_trains_with_weighted_losses():
    keras.utils.set_random_seed(0)
    model = _build(dict(depth=2, deep_supervision=True), "channels_last")
    model.compile(optimizer="adam", loss=["binary_crossentropy"] * 2,
                  loss_weights=[1.0, 0.5])
    images = _input(model, "channels_last", batch=4)
    masks = (images > 0.5).astype("float32")
    history = model.fit(images, [masks, masks], epochs=2, verbose=0)
    logs = history.history
    assert {"loss", "head_sigmoid_loss", "dec2_head_sigmoid_loss"} <= set(logs)
    # Keras sums the weighted per-output losses.
    total = logs["head_sigmoid_loss"][-1] + 0.5 * logs["dec2_head_sigmoid_loss"][-1]
    assert logs["loss"][-1] == pytest.approx(total, rel=1e-3)


def test_grid_gate_coefficients_match_numpy():
    """alpha = sigmoid(psi(relu(theta_2x2_stride2(x) + phi(g)))) on g's grid."""
    x = keras.Input((8, 8, 3))
    g = keras.Input((4, 4, 5))
    gated = blocks.grid_attn_block_2d(x, g, 2, data_format="channels_last", name="gg")
    probe = keras.Model([x, g], gated)
    model = keras.Model([x, g], [gated, probe.get_layer("gg_sigmoid").output])
    rng = np.random.default_rng(3)
    for layer in model.layers:
        layer.set_weights([rng.normal(size=w.shape).astype("float32")
                           for w in layer.get_weights()])
    x_value = rng.random((2, 8, 8, 3), dtype="float32")
    g_value = rng.random((2, 4, 4, 5), dtype="float32")

    _, alpha = model.predict([x_value, g_value], verbose=0)

    theta_kernel = model.get_layer("gg_theta").get_weights()[0]           # (2, 2, 3, 2)
    blocks_of_x = x_value.reshape(2, 4, 2, 4, 2, 3)
    theta = np.einsum("nhawbc,abcd->nhwd", blocks_of_x, theta_kernel)
    phi_kernel, phi_bias = model.get_layer("gg_phi").get_weights()
    phi = np.einsum("nhwc,cd->nhwd", g_value, phi_kernel[0, 0]) + phi_bias
    psi_kernel, psi_bias = model.get_layer("gg_psi").get_weights()
    psi = np.einsum("nhwc,cd->nhwd", np.maximum(theta + phi, 0), psi_kernel[0, 0]) + psi_bias
    np.testing.assert_allclose(alpha, 1 / (1 + np.exp(-psi)), rtol=1e-4, atol=1e-5)


def test_grid_gate_rejects_grids_that_are_not_an_even_multiple():
    x = keras.Input((8, 8, 3))
    with pytest.raises(ValueError, match=r"even multiple \(2, 4, \.\.\.\) of the size of g"):
        blocks.grid_attn_block_2d(x, keras.Input((8, 8, 3)), 2, "channels_last")
    with pytest.raises(ValueError, match="same scale factor on every axis"):
        blocks.grid_attn_block_2d(keras.Input((8, 16, 3)), keras.Input((4, 4, 3)), 2,
                                  "channels_last")


def test_grid_gate_resamples_phi_from_a_coarser_level():
    x = keras.Input((16, 16, 4))
    g = keras.Input((4, 4, 8))
    gated = blocks.grid_attn_block_2d(x, g, 2, data_format="channels_last", name="gg")
    model = keras.Model([x, g], gated)
    assert model.get_layer("gg_phi_up").size == (2, 2)
    assert tuple(gated.shape) == (None, 16, 16, 4)


def test_three_d_blocks_are_public():
    x = keras.Input((4, 8, 8, 8))
    down = keras.Input((8, 4, 4, 4))
    assert tuple(blocks.attn_block_3d(x, x, 2, "channels_first").shape) == (
        None, 4, 8, 8, 8)
    assert tuple(blocks.grid_attn_block_3d(x, down, 2, "channels_first").shape) == (
        None, 4, 8, 8, 8)
    out = blocks.attention_up_and_concat_3d(down, x, "channels_first", gate="grid")
    assert tuple(out.shape) == (None, 12, 8, 8, 8)


@pytest.mark.parametrize(
    "options, three_d, match",
    [
        (dict(dropout=1.0), False, r"dropout=1.0 is not allowed; expected a rate in \[0, 1\)"),
        (dict(dropout=-0.1), False, r"dropout=-0.1 is not allowed"),
        (dict(batch_norm="yes"), False, r"batch_norm='yes' is not allowed"),
        (dict(upsampling="cubic"), False, r"upsampling='cubic' is not supported"),
        (dict(upsampling="bilinear"), True, r"upsampling='bilinear' is not available in "
                                            r"3D"),
        (dict(gate="multiplicative"), False, r"gate='multiplicative' is not supported"),
        (dict(deep_supervision=True), False, r"deep_supervision=True needs depth >= 2"),
        (dict(deep_supervision=1), False, r"deep_supervision=1 is not allowed"),
    ],
)
def test_impossible_combinations_are_refused_before_building(options, three_d, match,
                                                             monkeypatch):
    def no_layers(*args, **kwargs):
        raise AssertionError("a layer was built before the arguments were checked")

    monkeypatch.setattr(keras, "Input", no_layers)
    with pytest.raises(ValueError, match=match):
        _build(options, "channels_last", size=16, three_d=three_d)


def test_three_d_sizes_are_checked():
    with pytest.raises(ValueError, match=r"img_d=20 must be divisible by 2\*\*depth=16"):
        models.att_unet_3d(20, 32, 32, 1)
