"""Checks run under KERAS_BACKEND=jax and torch, each backend in its own process.

Not collected by the normal run (the name does not start with `test_`):
tests/test_backends.py runs `pytest tests/backend_checks.py` in a subprocess with
KERAS_BACKEND set and ATTUNET_BACKEND_DIR naming a folder of models, outputs and loss
and metric values that TensorFlow wrote (tests/backend_cases.py says which). Models
saved here go back into that folder for TensorFlow to load.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import attunet_keras
import backend_cases
from attunet_keras import distribute
from attunet_keras import export
from attunet_keras import inference
from attunet_keras import losses
from attunet_keras import metrics
from attunet_keras import models

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
FOLDER = os.environ.get("ATTUNET_BACKEND_DIR", "")
# Backends whose saved models this run loads: TensorFlow, and those run before it.
SOURCES = ["tensorflow"] + os.environ.get("ATTUNET_LOAD_FROM", "").split()
pytestmark = pytest.mark.skipif(not FOLDER, reason="run by tests/test_backends.py")


def test_the_backend_is_the_one_asked_for():
    assert keras.backend.backend() == BACKEND != "tensorflow"


@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_the_reference_model_has_the_reference_parameter_count(data_format):
    # 7,977,941: the reference model.summary() (shared/reference/README.md)
    assert attunet_keras.att_unet(128, 128, 1, data_format=data_format).count_params() == 7977941


OPTIONS = [dict(), dict(batch_norm=True), dict(upsampling="bilinear"),
           dict(upsampling="transpose"), dict(gate="grid"), dict(deep_supervision=True),
           dict(dropout=0.0, output_activation=None, n_label=3)]


@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda options: ",".join(options) or "plain")
def test_every_option_builds_and_runs(options, data_format):
    arguments = dict(n_label=1, depth=2, features=8, data_format=data_format, in_channels=1)
    arguments.update(options)
    model = models.att_unet(32, 32, **arguments)
    image = np.zeros((1, 1, 32, 32) if data_format == "channels_first" else (1, 32, 32, 1),
                     "float32")
    outputs = model(image)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    n_label = arguments["n_label"]
    expected = (1, n_label, 32, 32) if data_format == "channels_first" else (1, 32, 32, n_label)
    assert all(tuple(output.shape) == expected for output in outputs)
    assert len(outputs) == (2 if options.get("deep_supervision") else 1)  # depth 2


@pytest.mark.parametrize("loss_name", losses.LOSSES)
def test_a_short_fit_with_each_loss_and_every_metric(loss_name):
    # Seeded: from some initialisations the first few epochs sit on a plateau (with seed
    # 0 under JAX the dice loss rose from 0.666 to 0.671 over three epochs), so the run
    # is long enough to leave it and starts from the same weights every time.
    keras.utils.set_random_seed(2)
    model = models.att_unet(32, 32, 3, depth=2, features=8, data_format="channels_last",
                            in_channels=1, output_activation="softmax")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=losses.get(loss_name, 3),
                  metrics=metrics.segmentation_metrics(3, ["bg", "a", "b"]))
    rng = np.random.default_rng(0)
    images = rng.random((4, 32, 32, 1), dtype="float32")
    targets = np.eye(3, dtype="float32")[np.digitize(images[..., 0], [0.33, 0.66])]
    history = model.fit(images, targets, batch_size=2, epochs=8, verbose=0).history
    assert np.isfinite(history["loss"]).all()
    assert history["loss"][-1] < history["loss"][0]
    assert {"dice", "iou", "dice_a", "iou_b"} <= set(history)
    assert all(0.0 <= value <= 1.0 for value in history["dice"])


def test_the_3d_model_fits_and_predicts():
    model = models.att_unet_3d(16, 16, 16, 1, depth=2, features=4,
                               data_format="channels_last", in_channels=1)
    model.compile(optimizer="adam", loss=losses.get("bce_dice", 1), metrics=[metrics.Dice()])
    volumes = np.random.default_rng(1).random((2, 16, 16, 16, 1), dtype="float32")
    history = model.fit(volumes, (volumes > 0.5).astype("float32"), epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert model.predict(volumes, verbose=0).shape == (2, 16, 16, 16, 1)


def test_losses_equal_tensorflow_values():
    with open(os.path.join(FOLDER, "losses.json")) as file:
        expected = json.load(file)
    values = backend_cases.loss_values()
    assert set(values) == set(expected)
    for key, value in values.items():
        assert value == pytest.approx(expected[key], abs=1e-5), key


def test_metrics_equal_tensorflow_values():
    with open(os.path.join(FOLDER, "metrics.json")) as file:
        expected = json.load(file)
    values = backend_cases.metric_values()
    assert set(values) == set(expected)
    for key, value in values.items():
        assert value == pytest.approx(expected[key], abs=1e-6), key


def test_losses_and_metrics_without_a_layout_equal_those_given_it():
    """Each case once in each layout: found from the shapes, the values are the same."""
    for with_layout, without in ((backend_cases.loss_values(), backend_cases.loss_values(False)),
                                 (backend_cases.metric_values(),
                                  backend_cases.metric_values(False))):
        assert set(with_layout) == set(without)
        for key, value in without.items():
            assert value == pytest.approx(with_layout[key], abs=1e-6), key


def test_the_quickstart_compile_and_fit_on_a_channels_first_model():
    """The README's compile line on a channels_first model: the metric used to fail under
    JAX (a squeeze of the last axis) and the loss to reduce over a spatial axis."""
    keras.utils.set_random_seed(1)
    model = models.att_unet(32, 32, 1, depth=2, features=4)  # channels_first by default
    model.compile("adam", loss=losses.get("bce_dice", 1), metrics=[metrics.Dice()])
    images = np.random.default_rng(3).random((2, 3, 32, 32), dtype="float32")
    masks = (images[:, :1] > 0.5).astype("float32")
    history = model.fit(images, masks, epochs=1, verbose=0).history
    expected = losses.get("bce_dice", 1, "channels_last")(
        np.moveaxis(masks, 1, -1), np.moveaxis(model.predict(images, verbose=0), 1, -1))
    assert np.isfinite(history["loss"]).all() and 0.0 <= history["dice"][0] <= 1.0
    evaluated = model.evaluate(images, masks, verbose=0, return_dict=True)
    assert evaluated["loss"] == pytest.approx(float(keras.ops.convert_to_numpy(expected)),
                                              rel=1e-4)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", sorted(backend_cases.SAVED_MODELS))
def test_a_model_saved_under_another_backend_loads_in_safe_mode_with_equal_outputs(
        name, source):
    model = keras.saving.load_model(os.path.join(FOLDER, f"{source}_{name}.keras"),
                                    safe_mode=True)
    expected = np.load(os.path.join(FOLDER, f"{source}_{name}.npz"))
    outputs = backend_cases.predict(model, name)
    assert len(outputs) == len(expected.files)
    for index, output in enumerate(outputs):
        np.testing.assert_allclose(output, expected[f"output{index}"], atol=1e-4)


@pytest.fixture(scope="module", autouse=True)
def saved_for_tensorflow():
    """Every saved model of this backend, written before any check runs (so what the
    TensorFlow side and the later backends load never depends on which checks ran)."""
    if not FOLDER:
        return
    for name in sorted(backend_cases.SAVED_MODELS):
        keras.utils.set_random_seed(3)
        model = backend_cases.build(name)
        model.save(os.path.join(FOLDER, f"{BACKEND}_{name}.keras"))
        outputs = backend_cases.predict(model, name)
        np.savez(os.path.join(FOLDER, f"{BACKEND}_{name}.npz"),
                 **{f"output{index}": output for index, output in enumerate(outputs)})


@pytest.mark.parametrize("name", sorted(backend_cases.SAVED_MODELS))
def test_this_backend_s_saved_model_reloads_with_its_outputs(name):
    model = keras.saving.load_model(os.path.join(FOLDER, f"{BACKEND}_{name}.keras"),
                                    safe_mode=True)
    expected = np.load(os.path.join(FOLDER, f"{BACKEND}_{name}.npz"))
    for index, output in enumerate(backend_cases.predict(model, name)):
        np.testing.assert_allclose(output, expected[f"output{index}"], atol=1e-5)


def test_inference_equals_tensorflow_on_a_size_that_needs_padding():
    model = keras.saving.load_model(os.path.join(FOLDER, "tensorflow_plain_channels_first.keras"))
    expected = np.load(os.path.join(FOLDER, "inference.npz"))
    probabilities, gates = inference.attention_maps(model, expected["image"], normalized=True)
    np.testing.assert_allclose(probabilities, expected["probabilities"], atol=1e-4)
    np.testing.assert_allclose(
        inference.predict_probabilities(model, expected["image"], normalized=True),
        expected["probabilities"], atol=1e-4)
    # one window of 40x48 (the image padded to a multiple of 4, as predict_probabilities)
    np.testing.assert_allclose(
        inference.predict_sliding_window(model, expected["image"], (40, 48), normalized=True),
        expected["probabilities"], atol=1e-4)
    windows = inference.predict_sliding_window(model, expected["image"], 16, tta=True,
                                               normalized=True)
    assert windows.shape == (37, 45, 1) and np.isfinite(windows).all()
    assert sorted(gates) == sorted(name for name in expected.files if name.startswith("dec"))
    for name, gate in gates.items():
        np.testing.assert_allclose(gate, expected[name], atol=1e-4)


def test_tensorflow_only_features_are_refused_with_the_backend_named():
    for strategy in distribute.TF_STRATEGIES:
        with pytest.raises(ValueError, match=rf"needs KERAS_BACKEND=tensorflow \(the "
                                             rf"backend in use is {BACKEND}\)"):
            distribute.get_strategy(strategy)
    with pytest.raises(ValueError, match=r"export to onnx needs KERAS_BACKEND=tensorflow"):
        export.export_model(models.att_unet(32, 32, 1, depth=2, features=4), "m.onnx",
                            format="onnx")
    assert not os.path.exists("m.onnx")
    if BACKEND != "jax":
        with pytest.raises(ValueError, match=r"data_parallel.*runs under KERAS_BACKEND=jax"):
            distribute.get_strategy("data_parallel")


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
def test_jax_data_parallel_on_two_devices_equals_one_device():
    """XLA_FLAGS=--xla_force_host_platform_device_count=2 gives this process 2 CPUs."""
    import jax

    assert len(jax.devices()) == 2
    rng = np.random.default_rng(5)
    images = rng.random((8, 32, 32, 1), dtype="float32")
    targets = (images > 0.5).astype("float32")

    def trained(strategy_name):
        keras.utils.set_random_seed(0)
        strategy = distribute.get_strategy(strategy_name)
        with strategy.scope():
            model = models.att_unet(32, 32, 1, depth=2, features=8, dropout=0.0,
                                    data_format="channels_last", in_channels=1)
            model.compile(optimizer=keras.optimizers.Adam(1e-3),
                          loss=losses.get("bce_dice", 1))
            model.fit(images, targets, batch_size=4, epochs=2, shuffle=False, verbose=0)
        return strategy.num_replicas_in_sync, model.get_weights()

    replicas, two = trained("data_parallel")
    assert replicas == 2
    _, one = trained("default")
    for a, b in zip(two, one):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(one[0], trained_initial_kernel())


def trained_initial_kernel():
    keras.utils.set_random_seed(0)
    return models.att_unet(32, 32, 1, depth=2, features=8, dropout=0.0,
                           data_format="channels_last", in_channels=1).get_weights()[0]


def test_the_cli_trains_under_this_backend(tmp_path, capsys):
    """A short `attunet-keras train`. Under JAX a real console-script process (as a user
    starts it, without TF_CPP_MIN_LOG_LEVEL), with data_parallel on the 2 devices;
    under PyTorch the same command in this process (already a PyTorch-backend one)."""
    import attunet_keras_cli

    arguments = ["train", "--dataset", "nuclei", "--output", str(tmp_path / "run"),
                 "--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "2",
                 "--depth", "2", "--features", "4", "--tile", "64", "--verbose", "0"]
    if BACKEND == "jax":
        script = os.path.join(os.path.dirname(sys.executable), "attunet-keras")
        environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
        result = subprocess.run([script, *arguments, "--strategy", "data_parallel"],
                                capture_output=True, text=True, timeout=600,
                                env=environment)
        assert result.returncode == 0, result.stderr[-3000:]
        out, err = result.stdout, result.stderr
        replicas = "2 replica(s) on cpu:0, cpu:1"
    else:
        assert attunet_keras_cli.main(arguments) == 0
        out, err = capsys.readouterr()
        replicas = "1 replica(s)"
    assert f"on {BACKEND}: {replicas}" in out
    assert "Held-out scores on nuclei" in out
    with open(tmp_path / "run" / "log.csv") as file:
        assert len(file.read().splitlines()) == 3  # header and two epochs
    assert "oneDNN" not in err and "cuda" not in err, err[-2000:]
