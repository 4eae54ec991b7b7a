"""Tests of attunet_keras.inference: whole-image prediction, attention maps, PNGs."""

import numpy as np
import pytest
from PIL import Image

from attunet_keras import inference
from attunet_keras import models
from attunet_keras import visualize
from helpers import image_batch
from helpers import reflect_padded_prediction


def _tiny(data_format, n_label=1, activation="sigmoid", in_channels=1):
    return models.att_unet(32, 32, n_label, depth=2, features=4, data_format=data_format,
                           in_channels=in_channels, output_activation=activation)


def test_fully_convolutional_keeps_weights_and_frees_the_sizes(data_format):
    model = _tiny(data_format)
    free = inference.fully_convolutional(model)
    batch = image_batch(2, 1, 32, 32, data_format)

    np.testing.assert_allclose(free.predict(batch, verbose=0),
                               model.predict(batch, verbose=0), atol=1e-6)
    spatial = free.input.shape[2:] if data_format == "channels_first" else (
        free.input.shape[1:3])
    assert tuple(spatial) == (None, None)
    assert free.predict(image_batch(1, 1, 48, 64, data_format), verbose=0).shape[0] == 1


def test_predict_probabilities_handles_any_image_size(data_format):
    model = _tiny(data_format, n_label=3, activation="softmax")
    image = np.random.default_rng(0).random((37, 50)).astype("float32")

    probabilities = inference.predict_probabilities(model, image)

    assert probabilities.shape == (37, 50, 3)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-5)
    labels = inference.labels_from_probabilities(probabilities)
    assert labels.shape == (37, 50) and labels.max() <= 2


def test_predict_matches_the_model_on_an_exact_tile(data_format):
    model = _tiny(data_format)
    image = np.random.default_rng(1).random((32, 32, 1)).astype("float32")
    batch = image[None] if data_format == "channels_last" else np.transpose(
        image, (2, 0, 1))[None]
    expected = model.predict(batch, verbose=0)[0]
    if data_format == "channels_first":
        expected = np.transpose(expected, (1, 2, 0))
    got = inference.predict_probabilities(model, image, normalized=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_wrong_channel_count_is_refused():
    model = _tiny("channels_last", in_channels=3)
    with pytest.raises(ValueError, match=r"takes images with 3 channel\(s\); received "
                                         r"an image of shape \(32, 32, 1\)"):
        inference.predict_probabilities(model, np.zeros((32, 32)))


def test_attention_model_exposes_every_gate(data_format):
    model = models.att_unet(32, 32, 1, depth=3, features=4, data_format=data_format)
    attention = inference.attention_model(model)
    assert len(attention.outputs) == 1 + 3
    outputs = attention.predict(image_batch(1, 3, 32, 32, data_format), verbose=0)
    channel_axis = 1 if data_format == "channels_first" else -1
    sizes = [output.shape[2] if data_format == "channels_first" else output.shape[1]
             for output in outputs[1:]]
    assert sizes == [8, 16, 32]  # deepest gate first
    for gate_map in outputs[1:]:
        assert gate_map.shape[channel_axis] == 1
        assert gate_map.min() >= 0.0 and gate_map.max() <= 1.0


def test_attention_maps_are_named_by_decoder_level():
    model = models.att_unet(32, 32, 1, depth=2, features=4, data_format="channels_last",
                            in_channels=1)
    probabilities, maps = inference.attention_maps(model, np.zeros((40, 24)))
    assert probabilities.shape == (40, 24, 1)
    assert list(maps) == ["dec2", "dec1"]
    assert maps["dec2"].shape == (20, 12) and maps["dec1"].shape == (40, 24)


def test_a_model_without_gates_is_refused():
    import keras

    inputs = keras.Input((8, 8, 1))
    plain = keras.Model(inputs, keras.layers.Conv2D(1, 1)(inputs))
    with pytest.raises(ValueError, match="has no attention gate"):
        inference.attention_model(plain)


def test_overlay_tints_and_outlines_the_foreground():
    image = np.zeros((10, 10, 1), "float32")
    labels = np.zeros((10, 10), "uint8")
    labels[3:7, 3:7] = 1
    picture = visualize.overlay(image, labels)
    assert picture.shape == (10, 10, 3) and picture.dtype == np.uint8
    assert picture[0, 0].tolist() == [0, 0, 0]       # background untouched
    assert picture[5, 5, 0] > picture[5, 5, 2]       # class 1 tinted red
    assert picture[3, 3].tolist() == [255, 60, 60]   # outline in the class colour


def test_attention_figure_writes_a_png(tmp_path):
    image = np.random.default_rng(0).random((64, 32, 1)).astype("float32")
    maps = {"dec2": np.full((32, 16), 0.2), "dec1": np.full((64, 32), 0.9)}
    path = tmp_path / "attention.png"
    visualize.attention_figure(str(path), image, np.full((64, 32, 1), 0.7), maps,
                               title="test")
    with Image.open(path) as picture:
        width, height = picture.size
    assert width > 3 * height / 2  # four panels side by side


def test_load_model_names_a_file_that_is_not_a_keras_archive(tmp_path):
    path = tmp_path / "best.keras"
    path.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match=r"best.keras is not a Keras model file"):
        inference.load_model(path)


def test_load_model_names_an_archive_with_truncated_weights(tmp_path):
    import zipfile

    path = tmp_path / "model.keras"
    _tiny("channels_last").save(path)
    truncated = tmp_path / "truncated.keras"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(truncated, "w") as target:
        for item in source.infolist():
            content = source.read(item.filename)
            if item.filename.endswith(".h5"):
                content = content[: len(content) // 2]
            target.writestr(item, content)
    with pytest.raises(ValueError, match=r"truncated.keras is not a valid Keras model file"):
        inference.load_model(truncated)


def test_convert_channels_converts_on_request_and_otherwise_says_how():
    rgb = np.random.default_rng(0).random((8, 8, 3)).astype("float32")
    with pytest.raises(ValueError, match=r"x.png has 3 channel\(s\) but the model takes 1; "
                                         r"--channels gray"):
        inference.convert_channels(rgb, 1, None, "x.png")
    np.testing.assert_allclose(inference.convert_channels(rgb, 1, "gray"),
                               rgb.mean(axis=-1, keepdims=True))
    gray = rgb[..., 0]
    np.testing.assert_array_equal(inference.convert_channels(gray, 3, "rgb"),
                                  np.repeat(gray[..., None], 3, axis=-1))
    rgba = np.concatenate([rgb, np.ones((8, 8, 1), "float32")], axis=-1)
    np.testing.assert_array_equal(inference.convert_channels(rgba, 3, "rgb"), rgb)
    with pytest.raises(ValueError, match="--channels rgb"):
        inference.convert_channels(gray, 3, None, "g.png")


def test_serving_model_pads_and_crops_inside_the_graph(data_format):
    model = _tiny(data_format)
    served = inference.serving_model(model)
    assert [layer.name for layer in served.layers][1] == "pad_to_multiple"
    image = np.random.default_rng(3).random((30, 45, 1)).astype("float32")
    batch = image[None] if data_format == "channels_last" else image[None].transpose(0, 3, 1, 2)
    output = served.predict(batch, verbose=0)
    if data_format == "channels_first":
        output = output.transpose(0, 2, 3, 1)
    np.testing.assert_allclose(
        output[0], reflect_padded_prediction(model, image, 4, data_format), atol=1e-5)
