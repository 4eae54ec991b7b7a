"""Tests of attunet_keras.models.att_unet: reference parity, layouts, bad arguments."""

import json
import os

import keras
import numpy as np
import pytest

from attunet_keras import models
from conftest import DATA_DIR
from helpers import image_batch
from helpers import to_channels_last

# reference summary (tests/data/reference_summary.json, "total_params"): 7,977,941
REFERENCE_PARAMS = 7_977_941


@pytest.fixture(scope="module")
def reference_summary():
    with open(os.path.join(DATA_DIR, "reference_summary.json")) as file:
        return json.load(file)


@pytest.fixture(scope="module")
def reference_model():
    return models.att_unet(160, 160, 1)


def _inbound_names(layer_config):
    """Names of the layers feeding a layer, from the model's serialized config."""
    names = []

    def walk(value):
        if isinstance(value, dict):
            history = value.get("config", {}).get("keras_history") if value.get(
                "class_name") == "__keras_tensor__" else None
            if history:
                names.append(history[0])
                return
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(layer_config["inbound_nodes"])
    return names


def test_reference_model_has_the_reference_parameter_count(reference_model):
    assert reference_model.count_params() == REFERENCE_PARAMS
    assert tuple(reference_model.input.shape) == (None, 3, 160, 160)
    assert tuple(reference_model.output.shape) == (None, 1, 160, 160)


def test_reference_model_matches_the_reference_summary_row_for_row(
    reference_model, reference_summary
):
    rows = reference_summary["layers"]
    assert reference_summary["total_params"] == REFERENCE_PARAMS
    assert len(reference_model.layers) == len(rows) == 70

    config_layers = reference_model.get_config()["layers"]
    ours_by_reference_name = {
        row["name"]: layer.name for row, layer in zip(rows, reference_model.layers)
    }
    for row, layer, layer_config in zip(rows, reference_model.layers, config_layers):
        expected_type = "Concatenate" if row["type"] == "Lambda" else row["type"]
        where = f"reference row {row['name']} vs {layer.name}"
        assert type(layer).__name__ == expected_type, where
        assert layer_config["name"] == layer.name
        assert list(layer.output.shape) == row["output_shape"], where
        assert layer.count_params() == row["params"], where
        expected_inbound = [ours_by_reference_name[name] for name in row["inbound"]]
        assert _inbound_names(layer_config) == expected_inbound, where


def test_the_only_type_difference_is_concatenate_for_lambda(
    reference_model, reference_summary
):
    differences = {
        (row["type"], type(layer).__name__)
        for row, layer in zip(reference_summary["layers"], reference_model.layers)
        if row["type"] != type(layer).__name__
    }
    assert differences == {("Lambda", "Concatenate")}


def test_layer_names_follow_one_scheme(reference_model):
    names = [layer.name for layer in reference_model.layers]
    assert names[:5] == ["image", "enc1_conv1", "enc1_dropout", "enc1_conv2", "enc1_pool"]
    assert names[-2:] == ["head_conv", "head_sigmoid"]
    for level in (1, 2, 3, 4):
        for suffix in ("up", "gate_theta", "gate_phi", "gate_psi", "gate_sigmoid",
                       "gate_multiply", "concat", "conv1", "dropout", "conv2"):
            assert f"dec{level}_{suffix}" in names
    assert len(names) == len(set(names))


def test_depth_and_features_are_arguments():
    model = models.att_unet(64, 64, 1, depth=2, features=8, data_format="channels_last")
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)]
    assert len(pools) == 2
    assert model.get_layer("bottleneck_conv2").output.shape[-1] == 8 * 2**2
    assert tuple(model.output.shape) == (None, 64, 64, 1)


def test_img_w_is_the_first_spatial_axis(data_format):
    model = models.att_unet(32, 48, 2, depth=2, features=4, data_format=data_format,
                            in_channels=1)
    if data_format == "channels_first":
        assert tuple(model.input.shape) == (None, 1, 32, 48)
        assert tuple(model.output.shape) == (None, 2, 32, 48)
    else:
        assert tuple(model.input.shape) == (None, 32, 48, 1)
        assert tuple(model.output.shape) == (None, 32, 48, 2)


def test_data_format_none_follows_keras_config():
    keras.config.set_image_data_format("channels_last")
    model = models.att_unet(32, 32, 1, depth=2, features=4, data_format=None)
    assert tuple(model.input.shape) == (None, 32, 32, 3)


def test_both_layouts_compute_the_same_function():
    first = models.att_unet(32, 32, 2, depth=2, features=4,
                            data_format="channels_first")
    last = models.att_unet(32, 32, 2, depth=2, features=4, data_format="channels_last")
    last.set_weights(first.get_weights())
    batch = image_batch(3, 3, 32, 32, "channels_first", seed=7)

    out_first = first.predict(batch, verbose=0)
    out_last = last.predict(to_channels_last(batch), verbose=0)

    np.testing.assert_allclose(to_channels_last(out_first), out_last, atol=1e-5)


def test_each_layout_trains_a_step_and_predicts(data_format):
    keras.utils.set_random_seed(0)
    model = models.att_unet(32, 32, 1, depth=2, features=4, data_format=data_format)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    images = image_batch(4, 3, 32, 32, data_format, seed=1)
    masks = (images.mean(axis=1 if data_format == "channels_first" else -1,
                         keepdims=True) > 0.5).astype("float32")
    before = [weight.copy() for weight in model.get_weights()]

    history = model.fit(images, masks, batch_size=4, epochs=2, verbose=0)
    predictions = model.predict(images, verbose=0)

    assert all(np.isfinite(history.history["loss"]))
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert predictions.shape == masks.shape
    assert predictions.min() >= 0.0 and predictions.max() <= 1.0


def test_unknown_sizes_build_a_fully_convolutional_model(data_format):
    model = models.att_unet(None, None, 1, depth=2, features=4, data_format=data_format)
    for height, width in ((16, 16), (32, 48)):
        out = model.predict(image_batch(1, 3, height, width, data_format), verbose=0)
        expected = (1, 1, height, width) if data_format == "channels_first" else (
            1, height, width, 1)
        assert out.shape == expected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(img_w=100), r"img_w=100 must be divisible by 2\*\*depth=16.*nearest "
                          r"valid: 96 or 112"),
        (dict(img_h=8), r"img_h=8 must be divisible by 2\*\*depth=16.*nearest valid: 16"),
        (dict(img_w=0), r"img_w=0 is not allowed; expected a positive integer"),
        (dict(img_w=-32), r"img_w=-32 is not allowed"),
        (dict(img_w=160.0), r"img_w=160.0 is not allowed"),
        (dict(img_h="160"), r"img_h='160' is not allowed"),
        (dict(depth=0), r"depth=0 is not allowed; expected an integer >= 1"),
        (dict(depth=2.0), r"depth=2.0 is not allowed"),
        (dict(features=0), r"features=0 is not allowed; expected an integer >= 1"),
        (dict(features=1), r"features=1 is not allowed: the gate .* inter_channel = "
                           r"\(2 \* features\) // 4 = 0"),
        (dict(n_label=0), r"n_label=0 is not allowed; expected an integer >= 1"),
        (dict(n_label=True), r"n_label=True is not allowed"),
        (dict(in_channels=0), r"in_channels=0 is not allowed; expected an integer >= 1"),
        (dict(data_format="NCHW"), r"data_format='NCHW' is not supported; expected one "
                                   r"of \('channels_first', 'channels_last'\)"),
        (dict(name=""), r"name='' is not allowed"),
    ],
)
def test_bad_arguments_raise_before_any_layer_is_built(monkeypatch, kwargs, match):
    def no_layers(*args, **kwargs):
        raise AssertionError("a layer was built before the arguments were checked")

    monkeypatch.setattr(keras, "Input", no_layers)
    monkeypatch.setattr(keras.layers, "Conv2D", no_layers)
    arguments = dict(img_w=160, img_h=160, n_label=1)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        models.att_unet(**arguments)


def test_softmax_output_sums_to_one_over_the_channel_axis(data_format):
    model = models.att_unet(32, 32, 3, depth=2, features=4, data_format=data_format,
                            output_activation="softmax")
    out = model.predict(image_batch(2, 3, 32, 32, data_format), verbose=0)
    channel_axis = 1 if data_format == "channels_first" else -1
    np.testing.assert_allclose(out.sum(axis=channel_axis), 1.0, atol=1e-5)
    assert model.layers[-1].name == "head_softmax"


def test_no_output_activation_gives_logits():
    model = models.att_unet(32, 32, 2, depth=2, features=4, output_activation=None)
    assert model.layers[-1].name == "head_conv"
    # Same parameters as the sigmoid model: the activation has none.
    assert model.count_params() == models.att_unet(
        32, 32, 2, depth=2, features=4).count_params()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(output_activation="relu"), r"output_activation='relu' is not supported"),
        (dict(output_activation="softmax"), r"output_activation='softmax' needs "
                                            r"n_label >= 2"),
    ],
)
def test_bad_output_activation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.att_unet(32, 32, 1, depth=2, features=4, **kwargs)


@pytest.mark.parametrize("size", [30, 18])
def test_free_size_model_says_the_size_must_be_a_multiple_of_2_to_the_depth(size, data_format):
    model = models.att_unet(None, None, 1, depth=2, features=4, data_format=data_format)
    shape = (1, 3, size, 32) if data_format == "channels_first" else (1, size, 32, 3)
    with pytest.raises(ValueError, match=rf"spatial size \({size}, 32\) must be a multiple "
                                         r"of 4 \(2\*\*depth\)"):
        model.predict(np.zeros(shape, "float32"), verbose=0)
    good = (1, 3, 32, 32) if data_format == "channels_first" else (1, 32, 32, 3)
    assert model.predict(np.zeros(good, "float32"), verbose=0).shape[0] == 1


def test_sizes_that_cannot_fit_in_memory_are_refused_before_building(monkeypatch):
    monkeypatch.setattr(keras, "Input", lambda *a, **k: pytest.fail("a layer was built"))
    with pytest.raises(ValueError, match=r"depth=20 with features=64 gives about .* "
                                         r"parameters .* more than this machine's"):
        models.att_unet(None, None, 1, depth=20, features=64)
    # the estimate, compared with the reference summary's 7,977,941 parameters
    assert abs(models.estimated_parameters(2, 4, 32, 3) - 7_977_941) < 0.05 * 7_977_941
