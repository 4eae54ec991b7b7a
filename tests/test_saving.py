"""Saving round trips: `.keras` in safe mode, and SavedModel export."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from attunet_keras import export
from attunet_keras import models
from helpers import image_batch


def _tiny(data_format, size=32):
    return models.att_unet(size, size, 2, depth=2, features=4, data_format=data_format)


def test_keras_file_reloads_in_safe_mode_with_identical_outputs(tmp_path, data_format):
    model = _tiny(data_format)
    batch = image_batch(2, 3, 32, 32, data_format)
    path = os.path.join(tmp_path, "model.keras")

    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)

    assert [layer.name for layer in reloaded.layers] == [
        layer.name for layer in model.layers]
    np.testing.assert_array_equal(
        reloaded.predict(batch, verbose=0), model.predict(batch, verbose=0)
    )


def test_model_has_no_lambda_layers():
    model = models.att_unet(160, 160, 1)
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in model.layers)


def test_saved_model_serve_matches_predict_for_any_batch(tmp_path, data_format):
    model = _tiny(data_format)
    path = os.path.join(tmp_path, "saved_model")

    model.export(path, verbose=False)
    reloaded = tf.saved_model.load(path)

    for batch_size in (2, 5):
        batch = image_batch(batch_size, 3, 32, 32, data_format, seed=batch_size)
        np.testing.assert_allclose(
            reloaded.serve(tf.constant(batch)).numpy(),
            model.predict(batch, verbose=0), atol=1e-5,
        )


def test_saved_model_keeps_unknown_spatial_sizes_dynamic(tmp_path, data_format):
    model = models.att_unet(None, None, 1, depth=2, features=4, data_format=data_format)
    path = os.path.join(tmp_path, "saved_model")

    model.export(path, verbose=False)
    reloaded = tf.saved_model.load(path)

    for height, width in ((16, 32), (48, 24)):
        batch = image_batch(1, 3, height, width, data_format)
        np.testing.assert_allclose(
            reloaded.serve(tf.constant(batch)).numpy(),
            model.predict(batch, verbose=0), atol=1e-5,
        )


def test_export_saved_model_checks_and_renames_into_place(tmp_path):
    model = _tiny("channels_last")
    path = os.path.join(tmp_path, "exported")
    sample = image_batch(2, 3, 32, 32, "channels_last")

    max_diff = export.export_saved_model(model, path, sample=sample)

    assert max_diff <= 1e-5
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))
    assert os.listdir(tmp_path) == ["exported"]


def test_export_saved_model_refuses_to_overwrite(tmp_path):
    model = _tiny("channels_last")
    path = tmp_path / "exported"
    path.mkdir()
    (path / "keep.txt").write_text("user data")

    with pytest.raises(FileExistsError, match="already exists.*overwrite"):
        export.export_saved_model(model, path)

    assert (path / "keep.txt").read_text() == "user data"
    assert sorted(os.listdir(tmp_path)) == ["exported"]


def test_export_saved_model_overwrites_when_asked(tmp_path):
    model = _tiny("channels_last")
    path = tmp_path / "exported"
    export.export_saved_model(model, path)
    (path / "old.txt").write_text("old export")

    export.export_saved_model(model, path, overwrite=True)

    assert not (path / "old.txt").exists()
    assert (path / "saved_model.pb").is_file()
    assert sorted(os.listdir(tmp_path)) == ["exported"]


def test_failed_export_check_leaves_nothing_behind(tmp_path, monkeypatch):
    model = _tiny("channels_last")
    other = _tiny("channels_last")
    other.set_weights([weight + 1.0 for weight in model.get_weights()])
    path = tmp_path / "exported"
    # Compare the staged export of `model` with a model whose weights differ.
    compare = export.saved_model_max_diff
    monkeypatch.setattr(export, "saved_model_max_diff",
                        lambda _, staged, sample: compare(other, staged, sample))

    with pytest.raises(AssertionError, match="differs from the Keras model"):
        export.export_saved_model(
            model, path, sample=image_batch(1, 3, 32, 32, "channels_last"))

    assert os.listdir(tmp_path) == []


def test_a_trained_run_loads_with_plain_keras_after_importing_the_package(tmp_path):
    """Loss, metrics and layers of the package are registered by `import attunet_keras`."""
    from attunet_keras import losses
    from attunet_keras import metrics

    model = models.att_unet(None, None, 1, depth=2, features=4, in_channels=1,
                            data_format="channels_last")
    assert "image_size_check" in [layer.name for layer in model.layers]
    model.compile(optimizer="adam", loss=losses.CrossEntropyDiceLoss(),
                  metrics=[metrics.Dice(), metrics.IoU()])
    batch = image_batch(2, 1, 32, 32, "channels_last")
    model.fit(batch, (batch > 0.5).astype("float32"), epochs=1, verbose=0)
    model.save(tmp_path / "best.keras")
    expected = model.predict(batch, verbose=0)
    np.save(tmp_path / "batch.npy", batch)
    script = (
        "import sys, numpy, keras, attunet_keras\n"
        f"model = keras.saving.load_model({str(tmp_path / 'best.keras')!r})\n"
        "assert type(model.loss).__name__ == 'CrossEntropyDiceLoss', model.loss\n"
        f"numpy.save({str(tmp_path / 'out.npy')!r}, "
        f"model.predict(numpy.load({str(tmp_path / 'batch.npy')!r}), verbose=0))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-6)
