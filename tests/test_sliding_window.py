"""predict_sliding_window: patches on a grid, Gaussian blending, TTA, 2D and 3D."""

import keras
import numpy as np
import pytest

from attunet_keras import data
from attunet_keras import inference
from attunet_keras import models


@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_one_patch_the_size_of_the_image_equals_predict_probabilities(data_format):
    model = models.att_unet(None, None, 2, depth=2, features=4, data_format=data_format,
                            in_channels=1, output_activation="softmax")
    image = np.random.default_rng(0).random((48, 64), dtype="float32") * 300
    expected = inference.predict_probabilities(model, image)
    got = inference.predict_sliding_window(model, image, (48, 64))
    assert got.shape == (48, 64, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)


def _pointwise_model(rank, data_format):
    """A 1x1 convolution and sigmoid: the same output for the same pixel anywhere."""
    shape = (None,) * rank + (1,) if data_format == "channels_last" else (1,) + (None,) * rank
    inputs = keras.Input(shape)
    conv = (keras.layers.Conv2D if rank == 2 else keras.layers.Conv3D)(
        1, 1, activation="sigmoid", data_format=data_format,
        kernel_initializer=keras.initializers.Constant(2.0),
        bias_initializer=keras.initializers.Constant(-1.0))
    return keras.Model(inputs, conv(inputs))


@pytest.mark.parametrize("blend", inference.BLENDS)
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_a_constant_image_gives_a_seamless_output(blend, data_format):
    model = _pointwise_model(2, data_format)
    image = np.full((100, 70, 1), 0.25, "float32")
    got = inference.predict_sliding_window(model, image, 32, overlap=0.5, blend=blend,
                                           batch_size=3, tta=True, normalized=True)
    expected = 1.0 / (1.0 + np.exp(-(2.0 * 0.25 - 1.0)))
    assert got.shape == (100, 70, 1)
    np.testing.assert_allclose(got, expected, atol=1e-6)  # no seams, no border effects


def test_overlapping_patches_average_what_each_patch_predicts():
    """A model whose output depends on the position in the patch: the blend of the
    grid's patches, computed here by hand with constant weights."""
    inputs = keras.Input((None, None, 1))
    outputs = keras.layers.Conv2D(1, 3, padding="same", use_bias=False,
                                  kernel_initializer="ones")(inputs)
    model = keras.Model(inputs, outputs)
    image = np.random.default_rng(1).random((40, 24, 1), dtype="float32")
    got = inference.predict_sliding_window(model, image, (16, 16), overlap=0.5,
                                           blend="constant", normalized=True)
    total, count = np.zeros((40, 24, 1)), np.zeros((40, 24, 1))
    for y in (0, 8, 16, 24):
        for x in (0, 8):
            patch = image[y:y + 16, x:x + 16][None]
            total[y:y + 16, x:x + 16] += model.predict(patch, verbose=0)[0]
            count[y:y + 16, x:x + 16] += 1
    np.testing.assert_allclose(got, total / count, atol=1e-5)


def test_tta_averages_the_flips():
    inputs = keras.Input((None, None, 1))
    outputs = keras.layers.Conv2D(1, 3, padding="same", use_bias=False)(inputs)
    model = keras.Model(inputs, outputs)
    image = np.random.default_rng(2).random((16, 16, 1), dtype="float32")
    got = inference.predict_sliding_window(model, image, 16, tta=True, normalized=True)
    flips = [(), (0,), (1,), (0, 1)]
    expected = np.mean([np.flip(model.predict(np.flip(image, axes)[None], verbose=0)[0], axes)
                        for axes in flips], axis=0)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_volume_smaller_than_the_patch_is_padded_and_cropped_back():
    model = models.att_unet_3d(None, None, None, 1, depth=2, features=4,
                               data_format="channels_last", in_channels=1)
    volume = np.random.default_rng(3).random((12, 20, 9), dtype="float32")
    got = inference.predict_sliding_window(model, volume, 16, overlap=0.25)
    assert got.shape == (12, 20, 9, 1)
    assert np.isfinite(got).all() and (0 <= got).all() and (got <= 1).all()


@pytest.mark.parametrize("arguments, match", [
    (dict(patch_size=30), r"patch_size=30 is not allowed; .* multiple of 4"),
    (dict(patch_size=(32, 32, 32)), r"expected an int or 2 ints"),
    (dict(patch_size=32, overlap=1.0), r"overlap=1.0 is not allowed"),
    (dict(patch_size=32, blend="hann"), r"blend='hann' is not supported"),
    (dict(patch_size=32, batch_size=0), r"batch_size=0 is not allowed"),
    (dict(patch_size=32, image=np.zeros((40, 40, 3))), r"with 1 channel\(s\); received shape"),
])
def test_bad_arguments_are_refused_before_predicting(arguments, match, monkeypatch):
    model = models.att_unet(None, None, 1, depth=2, features=4, data_format="channels_last",
                            in_channels=1)
    monkeypatch.setattr(model, "predict_on_batch", lambda *a, **k: pytest.fail("predicted"))
    image = arguments.pop("image", np.zeros((40, 40), "float32"))
    with pytest.raises(ValueError, match=match):
        inference.predict_sliding_window(model, image, **arguments)


@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_attention_by_one_window_the_size_of_the_image_equals_attention_maps(data_format):
    model = models.att_unet(None, None, 1, depth=2, features=4, data_format=data_format,
                            in_channels=1)
    image = np.random.default_rng(1).random((48, 64), dtype="float32") * 300
    expected, expected_gates = inference.attention_maps(model, image)
    got, gates = inference.attention_maps_sliding_window(model, image, (48, 64))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert list(gates) == list(expected_gates)
    for name in gates:
        assert gates[name].shape == expected_gates[name].shape
        np.testing.assert_allclose(gates[name], expected_gates[name], atol=1e-5)


def test_attention_by_windows_covers_a_large_image_on_each_gate_s_grid():
    """A 100x72 image in 32x32 windows (depth 2): the prediction and the gates on
    their grids (100/2, 72/2 and 100/1, 72/1), every value the blend of the windows
    that cover it, each window computed here on its own."""
    model = models.att_unet(None, None, 1, depth=2, features=4,
                            data_format="channels_last", in_channels=1)
    image = np.random.default_rng(2).random((100, 72), dtype="float32")
    probabilities, gates = inference.attention_maps_sliding_window(
        model, image, 32, overlap=0.25, batch_size=3)
    assert probabilities.shape == (100, 72, 1)
    assert sorted(gate.shape for gate in gates.values()) == [(50, 36), (100, 72)]
    for gate in gates.values():
        assert np.isfinite(gate).all() and 0.0 <= gate.min() and gate.max() <= 1.0
    # Each window by itself (the image is normalised once, as the windows see it):
    # starts 24 apart (32 * (1 - 0.25)) on multiples of 4, the last flush with the edge.
    normalized = data.normalize(image)
    rows, columns = [0, 24, 48, 68], [0, 24, 40]
    windows = {}
    for y in rows:
        for x in columns:
            windows[(y, x)] = inference.attention_maps(
                model, normalized[y:y + 32, x:x + 32], normalized=True)
    outputs = {"probabilities": (probabilities[..., 0], 1)}
    outputs.update({name: (gate, 100 // gate.shape[0]) for name, gate in gates.items()})
    for name, (blended, factor) in outputs.items():
        covering = np.zeros(blended.shape, int)
        low = np.full(blended.shape, np.inf)
        high = np.full(blended.shape, -np.inf)
        for (y, x), (window_probabilities, window_gates) in windows.items():
            own = (window_probabilities[..., 0] if name == "probabilities"
                   else window_gates[name])
            where = (slice(y // factor, (y + 32) // factor), slice(x // factor, (x + 32) // factor))
            covering[where] += 1
            low[where] = np.minimum(low[where], own)
            high[where] = np.maximum(high[where], own)
        one = covering == 1
        assert one.any() and (covering >= 1).all()
        # where one window covers a pixel the blend is that window's value; elsewhere a
        # weighted mean of the windows' values, so between their least and greatest
        np.testing.assert_allclose(blended[one], low[one], atol=1e-5, err_msg=name)
        assert (blended >= low - 1e-5).all() and (blended <= high + 1e-5).all(), name
        assert (high - low)[~one].max() > 1e-3  # the windows do differ where they overlap


def test_predict_image_chooses_whole_windows_or_flips_as_predict_does():
    model = models.att_unet(None, None, 1, depth=2, features=4, data_format="channels_last",
                            in_channels=1)
    image = np.random.default_rng(4).random((50, 30), dtype="float32")
    np.testing.assert_array_equal(inference.predict_image(model, image),
                                  inference.predict_probabilities(model, image))
    np.testing.assert_array_equal(  # 50 > 32: windows
        inference.predict_image(model, image, patch_size=32, overlap=0.25),
        inference.predict_sliding_window(model, image, 32, overlap=0.25))
    np.testing.assert_array_equal(  # within the patch, with TTA: one padded window
        inference.predict_image(model, image, patch_size=64, tta=True),
        inference.predict_sliding_window(model, image, (52, 32), tta=True))
