"""Deployment exports: TF Serving SavedModel, ONNX, LiteRT (float32, int8), atomicity."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from attunet_keras import export
from attunet_keras import models
from helpers import image_batch


def _tiny(data_format="channels_last", size=32, n_label=1, activation="sigmoid"):
    return models.att_unet(size, size, n_label, depth=2, features=4, in_channels=1,
                           data_format=data_format, output_activation=activation)


def _batch(data_format, count=3, height=32, width=32):
    return image_batch(count, 1, height, width, data_format)


@pytest.fixture(scope="module")
def sigmoid_serving(tmp_path_factory):
    model = _tiny()
    path = tmp_path_factory.mktemp("serving") / "model"
    export.export_serving(model, path, sample=_batch("channels_last"))
    return model, tf.saved_model.load(str(path / "1"))


def test_serving_layout_and_signatures(sigmoid_serving):
    model, reloaded = sigmoid_serving
    assert set(reloaded.signatures) == {"serving_default", "probabilities", "mask"}
    for count in (1, 4):
        batch = _batch("channels_last", count)
        probabilities = reloaded.signatures["probabilities"](images=tf.constant(batch))
        np.testing.assert_allclose(probabilities["probabilities"].numpy(),
                                   model.predict(batch, verbose=0), atol=1e-5)
        mask = reloaded.signatures["mask"](images=tf.constant(batch))["mask"]
        assert mask.dtype == tf.uint8
        np.testing.assert_array_equal(
            mask.numpy(), (model.predict(batch, verbose=0) > 0.5).astype("uint8"))


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 32, 32), r"expected a non-empty 4-D float32 batch of images \(batch, 32, 32, "
                      r"1\) with 1 channel\(s\) on axis -1; received shape\] \[2 32 32\]"),
        ((2, 32, 32, 3), r"expected a non-empty 4-D .* received shape\] \[2 32 32 3\]"),
    ],
)
def test_serving_rejects_wrong_inputs_with_a_clear_error(sigmoid_serving, shape, match):
    _, reloaded = sigmoid_serving
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        reloaded.signatures["mask"](images=tf.zeros(shape))


def test_serving_mask_is_argmax_for_softmax_and_sizes_stay_free(tmp_path, data_format):
    model = models.att_unet(None, None, 3, depth=2, features=4, in_channels=1,
                            data_format=data_format, output_activation="softmax")
    export.export_serving(model, tmp_path / "model", sample=_batch(data_format))
    reloaded = tf.saved_model.load(str(tmp_path / "model" / "1"))
    batch = _batch(data_format, 2, 48, 64)
    mask = reloaded.signatures["mask"](images=tf.constant(batch))["mask"].numpy()
    channel_axis = 1 if data_format == "channels_first" else -1
    expected = np.argmax(model.predict(batch, verbose=0), axis=channel_axis)
    np.testing.assert_array_equal(mask, np.expand_dims(expected, channel_axis))


def test_onnx_matches_keras_within_1e4(tmp_path, data_format):
    import onnxruntime

    model = models.att_unet(None, None, 1, depth=2, features=4, in_channels=1,
                            data_format=data_format)
    max_diff = export.export_onnx(model, tmp_path / "model.onnx",
                                  sample=_batch(data_format))
    assert max_diff is not None and max_diff <= 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    batch = _batch(data_format, 2, 48, 32)   # another batch and size: dynamic axes
    output = session.run(None, {session.get_inputs()[0].name: batch})[0]
    assert np.max(np.abs(output - model.predict(batch, verbose=0))) <= 1e-4


def test_litert_float32_and_int8(tmp_path):
    model = _tiny()
    batch = _batch("channels_last", 4)
    max_diff = export.export_litert(model, tmp_path / "model.tflite", sample=batch)
    assert max_diff <= 1e-4
    export.export_litert(model, tmp_path / "int8.tflite", quantize="int8",
                         representative=_batch("channels_last", 16))
    quantized = export.litert_predict(str(tmp_path / "int8.tflite"), batch)
    assert quantized.shape == (4, 32, 32, 1) and quantized.dtype == np.float32
    assert np.max(np.abs(quantized - model.predict(batch, verbose=0))) < 0.1
    assert os.path.getsize(tmp_path / "int8.tflite") < os.path.getsize(
        tmp_path / "model.tflite")
    details = export.litert_interpreter(str(tmp_path / "int8.tflite")).get_tensor_details()
    assert any(detail["dtype"] == np.int8 for detail in details)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, p: export.export_litert(m, p / "m.tflite", quantize="int8"),
         "int8 quantization needs a representative set"),
        (lambda m, p: export.export_litert(
            models.att_unet(None, None, 1, depth=2, features=4), p / "m.tflite"),
         "LiteRT export needs fixed image sizes"),
        (lambda m, p: export.export_litert(m, p / "m.bin"), "must end in .tflite"),
        (lambda m, p: export.export_model(m, p / "x", format="tflite"),
         "format='tflite' is not supported"),
        (lambda m, p: export.export_model(m, p / "x", quantize="int8"),
         "applies to LiteRT only"),
    ],
)
def test_bad_export_requests_are_refused(tmp_path, call, match):
    with pytest.raises(ValueError, match=match):
        call(_tiny(), tmp_path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("format_, name", [("savedmodel", "model"), ("onnx", "m.onnx"),
                                           ("litert", "m.tflite")])
def test_existing_exports_are_kept_unless_overwrite(tmp_path, format_, name):
    target = tmp_path / name
    export.export_model(_tiny(), target, format=format_)
    before = sorted(os.listdir(target)) if target.is_dir() else target.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        export.export_model(_tiny(), target, format=format_)
    assert (sorted(os.listdir(target)) if target.is_dir() else target.read_bytes()) == before
    export.export_model(_tiny(), target, format=format_, overwrite=True,
                        sample=_batch("channels_last"))
    assert os.listdir(tmp_path) == [name]


@pytest.mark.parametrize("format_, name", [("savedmodel", "data"), ("savedmodel", "x.txt"),
                                           ("onnx", "data"), ("litert", "notes.txt")])
def test_overwrite_never_replaces_what_is_not_an_export(tmp_path, format_, name):
    target = tmp_path / name
    if "." in name:
        target.write_text("precious")
    else:
        target.mkdir()
        (target / "image.png").write_text("precious")
    with pytest.raises(FileExistsError, match="only replaces an earlier export"):
        export.export_model(_tiny(), target, format=format_, overwrite=True)
    kept = target.read_text() if target.is_file() else (target / "image.png").read_text()
    assert kept == "precious"


def test_a_killed_export_leaves_no_half_written_model(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "attunet-keras")
    target = tmp_path / "saved"
    command = [script, "export", "--output", str(target), "--img-w", "64", "--img-h",
               "64"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL,
                               env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    deadline = time.time() + 180
    try:
        # The staging folder appears beside the target: kill while it is written.
        while time.time() < deadline:
            staging = [name for name in os.listdir(tmp_path)
                       if name.startswith(".saved.staging-")]
            if staging and any(os.scandir(tmp_path / staging[0])):
                break
            if process.poll() is not None:
                pytest.fail("the export finished before it could be killed")
            time.sleep(0.01)
        else:
            pytest.fail("the export never started writing")
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert not target.exists()

    # A new export of the same target succeeds.
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (target / "1" / "saved_model.pb").is_file()
    # The killed export's staging folder and its lock (freed by the kernel) are gone.
    assert sorted(os.listdir(tmp_path)) == ["saved"]


def test_two_exports_to_one_target_at_once_one_is_refused(tmp_path):
    """Started together, without --overwrite: one export lands, the other is refused
    (both used to succeed, the second replacing the first)."""
    script = os.path.join(os.path.dirname(sys.executable), "attunet-keras")
    target = tmp_path / "saved"
    command = [script, "export", "--output", str(target), "--img-w", "32", "--img-h", "32",
               "--depth", "2", "--features", "4"]
    processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
                 for _ in range(2)]
    errors = [process.communicate(timeout=300)[1] for process in processes]
    codes = sorted(process.returncode for process in processes)
    assert codes == [0, 2], errors
    refused = errors[[process.returncode for process in processes].index(2)]
    assert re.search(rf"export target {re.escape(str(target))} is in use by process \d+@|"
                     rf"{re.escape(str(target))} already exists", refused), refused
    assert (target / "1" / "saved_model.pb").is_file()
    assert sorted(os.listdir(tmp_path)) == ["saved"]
