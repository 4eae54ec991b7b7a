"""Exported models take any batch and image size; deep supervision exports the main
output; the end-to-end `segment` signatures take raw pixels and equal `predict`."""

import io
import os

import numpy as np
import pytest
import tensorflow as tf

from attunet_keras import cli
from attunet_keras import data
from attunet_keras import export
from attunet_keras import inference
from attunet_keras import models
from helpers import reflect_padded_prediction

TINY_TRAIN = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4",
              "--depth", "4", "--features", "4", "--tile", "64", "--verbose", "0"]


def _model(data_format, deep_supervision=False, n_label=1):
    return models.att_unet(
        64, 64, n_label, depth=4, features=4, in_channels=1, data_format=data_format,
        deep_supervision=deep_supervision,
        output_activation="sigmoid" if n_label == 1 else "softmax")


def _layout(batch_last, data_format):
    """(N, H, W, C) images to the model's layout."""
    return batch_last if data_format == "channels_last" else np.transpose(
        batch_last, (0, 3, 1, 2))


def _to_last(batch, data_format):
    return batch if data_format == "channels_last" else np.transpose(batch, (0, 2, 3, 1))


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory):
    """A tiny nuclei run made through the command line (training tile 64), exported."""
    folder = tmp_path_factory.mktemp("served")
    run = folder / "run"
    assert cli.main(["train", "--dataset", "nuclei", "--output", str(run), *TINY_TRAIN]) == 0
    assert cli.main(["export", "--run", str(run), "--output", str(folder / "saved")]) == 0
    return run, tf.saved_model.load(str(folder / "saved" / "1"))


@pytest.mark.parametrize("crop", [None, (200, 300)])
def test_the_exported_run_serves_the_whole_demo_image_and_a_crop(demo_export, crop):
    run, served = demo_export
    image = data.normalize(data.read_image(data.package_file(
        "stardist", os.path.join("data", "images", "img2d.tif"))))
    assert image.shape == (512, 512, 1)  # the demo's image, 8x the training tile
    if crop:
        image = image[100:100 + crop[0], 50:50 + crop[1]]
    model = inference.load_model(run / "best.keras")
    assert tuple(model.inputs[0].shape) == (None, 64, 64, 1)  # trained on tiles
    probabilities = served.signatures["probabilities"](
        images=tf.constant(image[None]))["probabilities"].numpy()[0]
    # plain Keras on the image padded by NumPy's reflection (512 needs none; the crop
    # 200x300 becomes 208x304), cropped back
    expected = reflect_padded_prediction(model, image, 16)
    assert probabilities.shape == image.shape[:2] + (1,)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


@pytest.fixture(scope="module", params=["channels_first", "channels_last"])
def tiny_export(request, tmp_path_factory):
    """A depth-4 model (sizes must be multiples of 16) exported to SavedModel."""
    model = _model(request.param)
    target = tmp_path_factory.mktemp("export") / "saved"
    export.export_model(model, target)
    return request.param, model, tf.saved_model.load(str(target / "1"))


@pytest.mark.parametrize("size", [(64, 64), (128, 128), (50, 70), (15, 15), (1, 1)],
                         ids=["tile", "2x_tile", "not_divisible_by_16",
                              "one_less_than_16", "one_pixel"])
def test_saved_model_takes_any_size_and_batch(tiny_export, size):
    data_format, model, served = tiny_export
    images = np.random.default_rng(0).random((3, *size, 1), dtype="float32")
    outputs = served.signatures["probabilities"](
        images=tf.constant(_layout(images, data_format)))["probabilities"].numpy()
    outputs = _to_last(outputs, data_format)
    assert outputs.shape == (3, *size, 1)
    if size != (1, 1):  # 1x1: zeros beyond what reflection reaches, numpy repeats
        for image, output in zip(images, outputs):
            np.testing.assert_allclose(
                output, reflect_padded_prediction(model, image, 16, data_format), atol=1e-5)
    if size == (64, 64):  # the model's own size: Keras itself, no padding at all
        np.testing.assert_allclose(outputs, _to_last(model.predict(
            _layout(images, data_format), verbose=0), data_format), atol=1e-5)
    mask = served.signatures["mask"](images=tf.constant(_layout(images, data_format)))["mask"]
    assert mask.dtype == tf.uint8 and tuple(mask.shape) == tuple(
        _layout(outputs, data_format).shape)


@pytest.mark.parametrize("shape", [(0, 32, 32, 1), (2, 0, 32, 1), (2, 32, 32), (2, 32, 32, 3)],
                         ids=["empty_batch", "empty_image", "rank_3", "three_channels"])
def test_saved_model_refuses_bad_input_with_one_message(tiny_export, shape):
    data_format, _, served = tiny_export
    expected = r"\(batch, any, any, 1\)"
    if data_format == "channels_first":
        shape = (shape[0], shape[-1]) + shape[1:-1]
        expected = r"\(batch, channels, any, any\)"
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"expected a non-empty 4-D float32 batch of images "
                             + expected + r" with 1 channel\(s\)"):
        served.signatures["probabilities"](images=tf.zeros(shape))


def test_saved_model_names_float32_for_another_dtype(tiny_export):
    _, _, served = tiny_export
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a float tensor"):
        served.signatures["probabilities"](images=tf.zeros((1, 32, 32, 1), tf.uint8))


def test_onnx_has_dynamic_axes_and_any_size(tmp_path, data_format):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = _model(data_format)
    export.export_model(model, tmp_path / "m.onnx", format="onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"),
                                           providers=["CPUExecutionProvider"])
    images = np.random.default_rng(1).random((2, 50, 70, 1), dtype="float32")
    outputs = session.run(None, {session.get_inputs()[0].name: _layout(images, data_format)})
    assert len(outputs) == 1
    outputs = _to_last(outputs[0], data_format)
    for image, output in zip(images, outputs):
        np.testing.assert_allclose(
            output, reflect_padded_prediction(model, image, 16, data_format), atol=1e-4)


def test_deep_supervision_exports_the_main_output_on_every_format(tmp_path):
    model = _model("channels_last", deep_supervision=True)
    assert len(model.outputs) == 4
    images = np.random.default_rng(2).random((1, 64, 64, 1), dtype="float32")
    main = model.predict(images, verbose=0)[0]

    export.export_model(model, tmp_path / "saved")
    served = tf.saved_model.load(str(tmp_path / "saved" / "1"))
    signature = served.signatures["probabilities"]
    assert list(signature.structured_outputs) == ["probabilities"]
    np.testing.assert_allclose(signature(images=tf.constant(images))["probabilities"], main,
                               atol=1e-5)

    onnxruntime = pytest.importorskip("onnxruntime")
    export.export_model(model, tmp_path / "m.onnx", format="onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"),
                                           providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: images})
    assert len(outputs) == 1
    np.testing.assert_allclose(outputs[0], main, atol=1e-4)

    export.export_model(model, tmp_path / "m.tflite", format="litert")
    interpreter = export.litert_interpreter(tmp_path / "m.tflite")
    assert len(interpreter.get_output_details()) == 1
    np.testing.assert_allclose(export.litert_predict(interpreter, images), main, atol=1e-4)


def test_export_cli_states_the_served_sizes(tmp_path, capsys):
    tiny = ["--img-w", "64", "--img-h", "64", "--depth", "2", "--features", "4",
            "--in-channels", "1", "--data-format", "channels_last"]
    assert cli.main(["export", *tiny, "--output", str(tmp_path / "saved")]) == 0
    assert "any batch and size with 1 channel(s) float32, padded to multiples of 4" in \
        capsys.readouterr().out
    assert cli.main(["export", *tiny, "--format", "litert",
                     "--output", str(tmp_path / "m.tflite")]) == 0
    assert "static input (1, 64, 64, 1) float32 (LiteRT has static shapes)" in \
        capsys.readouterr().out


def test_what_a_killed_export_leaves_is_cleaned_up_by_the_next(tmp_path):
    """The staging and retired folders and the lock a SIGKILLed export leaves beside its
    target (tests/test_export.py kills a real one), planted here: the next export to
    that target removes them and lands."""
    target = tmp_path / "saved"
    staging = tmp_path / ".saved.staging-abc123" / "saved" / "1"
    staging.mkdir(parents=True)
    (staging / "saved_model.pb").write_bytes(b"half a model")
    (tmp_path / ".saved.old-def456").mkdir()
    (tmp_path / ".saved.lock").write_text("4242@elsewhere\n")  # its holder is gone
    assert not target.exists()
    export.export_model(models.att_unet(64, 64, 1, depth=2, features=4), target)
    assert os.listdir(tmp_path) == ["saved"]


def _raw_demo_image():
    """The demo image's raw pixels (uint16, 0..235), as the TIFF stores them."""
    return data.read_image(data.package_file(
        "stardist", os.path.join("data", "images", "img2d.tif")))


# sizes the issue names: odd, the run's patch (64), 3x the patch, 1x1 and 1xN
SEGMENT_CROPS = {"97x131": (slice(40, 137), slice(60, 191)), "64x64": (slice(0, 64),) * 2,
                 "192x64": (slice(100, 292), slice(300, 364)),
                 "1x1": (slice(5, 6), slice(7, 8)), "1x69": (slice(9, 10), slice(0, 69))}


def test_segment_takes_raw_pixels_and_equals_predict(demo_export, tmp_path):
    """The end-to-end signature on the raw uint16 pixels against `attunet-keras
    predict` on the same pixels written as a TIFF file (its masks) and the library
    function predict calls (its probabilities)."""
    import tifffile

    run, served = demo_export
    raw = _raw_demo_image()
    model = inference.fully_convolutional(inference.load_model(run / "best.keras"))
    for name, crop in SEGMENT_CROPS.items():
        pixels = np.ascontiguousarray(raw[crop])
        out = served.signatures["segment_uint16"](images=tf.constant(pixels[None, ..., None]))
        probabilities = out["probabilities"].numpy()[0]
        expected = inference.predict_image(model, pixels, patch_size=64)
        assert probabilities.shape == pixels.shape + (1,), name
        np.testing.assert_allclose(probabilities, expected, atol=1e-4, err_msg=name)
        folder = tmp_path / name
        folder.mkdir()
        tifffile.imwrite(folder / f"{name}.tif", pixels)
        assert cli.main(["predict", str(folder / f"{name}.tif"), "--run", str(run),
                         "--output", str(tmp_path / f"out_{name}"), "--patch", "64"]) == 0
        written = data.read_image(str(tmp_path / f"out_{name}" / f"{name}_mask.png"), mask=True)
        mask = out["mask"].numpy()[0, ..., 0]
        assert mask.dtype == np.uint8
        ties = np.abs(probabilities[..., 0] - 0.5) < 1e-4
        np.testing.assert_array_equal((mask * 255)[~ties], written[~ties], err_msg=name)
    # the same pixels as float32 and as int16 give the same probabilities
    pixels = raw[SEGMENT_CROPS["97x131"]][None, ..., None]
    by_dtype = [served.signatures[signature](images=tf.constant(pixels.astype(dtype)))
                ["probabilities"].numpy() for signature, dtype in
                (("segment", "float32"), ("segment_int16", "int16"),
                 ("segment_uint8", "uint8"))]
    np.testing.assert_allclose(by_dtype[0], by_dtype[1], atol=1e-6)
    np.testing.assert_allclose(by_dtype[0], by_dtype[2], atol=1e-6)  # values <= 235


def test_segment_png_takes_and_returns_png_bytes_as_tf_serving_sends_them(demo_export,
                                                                         tmp_path):
    from PIL import Image

    run, served = demo_export
    signature = served.signatures["segment_png"]
    assert set(signature.structured_input_signature[1]) == {"image_bytes"}
    assert set(signature.structured_outputs) == {"mask_bytes"}
    pixels = _raw_demo_image()[SEGMENT_CROPS["97x131"]]
    encoded = []
    for bits, array in ((8, pixels.astype("uint8")), (16, (pixels * 250).astype("uint16"))):
        path = tmp_path / f"crop{bits}.png"
        Image.fromarray(array).save(path)
        assert Image.open(path).mode == ("L" if bits == 8 else "I;16")
        encoded.append(path.read_bytes())
    masks = signature(image_bytes=tf.constant(encoded))["mask_bytes"].numpy()
    assert len(masks) == 2
    for bits, png in zip((8, 16), masks):
        assert cli.main(["predict", str(tmp_path / f"crop{bits}.png"), "--run", str(run),
                         "--output", str(tmp_path / f"out{bits}"), "--patch", "64"]) == 0
        written = np.asarray(Image.open(tmp_path / f"out{bits}" / f"crop{bits}_mask.png"))
        served_mask = np.asarray(Image.open(io.BytesIO(png)))
        assert served_mask.shape == written.shape == pixels.shape
        probabilities = served.signatures["segment"](images=tf.constant(
            np.asarray(Image.open(tmp_path / f"crop{bits}.png"), "float32")[None, ..., None]
        ))["probabilities"].numpy()[0, ..., 0]
        ties = np.abs(probabilities - 0.5) < 1e-4
        np.testing.assert_array_equal(served_mask[~ties], written[~ties], err_msg=str(bits))


def test_saved_model_cli_runs_segment_on_a_raw_npy_image(demo_export, tmp_path):
    """A client outside this package's Python: TensorFlow's own saved_model_cli."""
    import subprocess
    import sys

    run, _ = demo_export
    pixels = _raw_demo_image()[SEGMENT_CROPS["97x131"]][None, ..., None].astype("float32")
    np.save(tmp_path / "raw.npy", pixels)
    cli_path = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    result = subprocess.run(
        [cli_path, "run", "--dir", str(run.parent / "saved" / "1"), "--tag_set", "serve",
         "--signature_def", "segment", "--inputs", f"images={tmp_path / 'raw.npy'}",
         "--outdir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-3000:]
    probabilities = np.load(tmp_path / "out" / "probabilities.npy")
    model = inference.fully_convolutional(inference.load_model(run / "best.keras"))
    expected = inference.predict_image(model, pixels[0, ..., 0], patch_size=64)
    np.testing.assert_allclose(probabilities[0], expected, atol=1e-4)
    assert np.load(tmp_path / "out" / "mask.npy").dtype == np.uint8
    # the signature for clients that normalise themselves, through the same loader
    np.save(tmp_path / "normalized.npy", data.normalize(pixels[0])[None])
    result = subprocess.run(
        [cli_path, "run", "--dir", str(run.parent / "saved" / "1"), "--tag_set", "serve",
         "--signature_def", "probabilities", "--inputs",
         f"images={tmp_path / 'normalized.npy'}", "--outdir", str(tmp_path / "plain")],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "plain" / "probabilities.npy")[0],
                               reflect_padded_prediction(model, data.normalize(pixels[0]), 16),
                               atol=1e-5)


def test_onnx_and_litert_segment_graphs_take_raw_pixels_and_equal_predict(demo_export,
                                                                          tmp_path, capsys):
    """`export --format onnx|litert --segment`: the end-to-end graph (normalisation,
    padding and mask inside, every image whole) against the library's whole-image
    prediction on the raw uint16 pixels; a larger image through the plain ONNX export
    and `inference.blend_windows` (the client code for the windows that stay outside)
    against `predict --patch`'s sliding windows."""
    onnxruntime = pytest.importorskip("onnxruntime")
    run, _ = demo_export
    model = inference.fully_convolutional(inference.load_model(run / "best.keras"))
    raw = _raw_demo_image()

    assert cli.main(["export", "--run", str(run), "--format", "onnx", "--segment",
                     "--output", str(tmp_path / "segment.onnx")]) == 0
    out = capsys.readouterr().out
    assert "ONNX model of the segment graph" in out
    assert "sliding windows stay outside the onnx graph" in out
    session = onnxruntime.InferenceSession(str(tmp_path / "segment.onnx"),
                                           providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    names = [o.name for o in session.get_outputs()]
    assert sorted(names) == ["mask", "probabilities"]
    for name in ("97x131", "192x64", "1x1", "1x69"):
        pixels = np.ascontiguousarray(raw[SEGMENT_CROPS[name]])
        outputs = dict(zip(names, session.run(
            None, {"images": pixels[None, ..., None].astype("float32")})))
        expected = inference.predict_image(model, pixels)  # whole: no patch
        np.testing.assert_allclose(outputs["probabilities"][0], expected, atol=1e-4,
                                   err_msg=name)
        ties = np.abs(expected - 0.5) < 1e-4
        assert outputs["mask"].dtype == np.uint8
        np.testing.assert_array_equal(outputs["mask"][0][~ties], (expected > 0.5)[~ties])

    assert cli.main(["export", "--run", str(run), "--format", "litert", "--segment",
                     "--output", str(tmp_path / "segment.tflite")]) == 0
    assert "sliding windows stay outside the litert graph" in capsys.readouterr().out
    runner = export.litert_interpreter(tmp_path / "segment.tflite").get_signature_runner(
        "segment")
    pixels = np.ascontiguousarray(raw[SEGMENT_CROPS["64x64"]])  # the model's own size
    outputs = runner(images=pixels[None, ..., None].astype("float32"))
    np.testing.assert_allclose(outputs["probabilities"][0], inference.predict_image(
        model, pixels), atol=1e-4)

    # larger than the patch: the client normalises and runs the windows itself
    assert cli.main(["export", "--run", str(run), "--format", "onnx",
                     "--output", str(tmp_path / "plain.onnx")]) == 0
    plain = onnxruntime.InferenceSession(str(tmp_path / "plain.onnx"),
                                         providers=["CPUExecutionProvider"])
    from attunet_keras.data import planning

    pixels = np.ascontiguousarray(raw[SEGMENT_CROPS["192x64"]])
    normalized = planning.normalize_case(pixels[..., None].astype("float32"),
                                         [{"scheme": "percentile"}])
    by_client = inference.blend_windows(
        lambda batch: plain.run(None, {plain.get_inputs()[0].name: batch})[0],
        normalized, (64, 64))
    np.testing.assert_allclose(by_client, inference.predict_image(model, pixels,
                                                                  patch_size=64), atol=1e-4)


@pytest.mark.parametrize("flags, message", [
    (["--format", "onnx", "--segment", "--no-segment"], "contradict each other"),
    (["--format", "litert", "--segment", "--quantize", "int8"],
     "an int8 LiteRT model takes normalised images"),
    (["--format", "litert", "--segment", "--patch", "32"], "leave out --patch"),
    (["--format", "onnx", "--patch", "32"], "with --segment, the onnx and litert graph"),
], ids=["both", "int8", "litert_patch", "onnx_patch_without_segment"])
def test_bad_segment_flags_are_refused_before_anything_is_written(demo_export, tmp_path,
                                                                  flags, message, capsys):
    run, _ = demo_export
    output = tmp_path / ("m.tflite" if "litert" in flags else "m.onnx")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--run", str(run), "--output", str(output), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_volume_model_s_segment_runs_windows_and_equals_the_library(tmp_path):
    """3D: normalisation and Gaussian-blended windows in the graph, against
    `predict_sliding_window` on the volume normalised by the library (issue item 4)."""
    from attunet_keras.data import planning

    model = models.att_unet_3d(None, None, None, 1, depth=2, features=4,
                               data_format="channels_first")
    rules = [{"scheme": "ct", "clip": [-200.0, 300.0], "mean": 40.0, "std": 90.0}]
    export.export_model(model, tmp_path / "saved", normalization=rules, patch=(16, 16, 16))
    served = tf.saved_model.load(str(tmp_path / "saved" / "1"))
    raw = np.random.default_rng(2).normal(0, 300, (1, 40, 16, 21, 1)).astype("int16")
    out = served.signatures["segment_int16"](images=tf.constant(raw))
    expected = inference.predict_sliding_window(
        model, planning.normalize_case(raw[0].astype("float32"), rules), 16, normalized=True)
    assert out["probabilities"].shape == (1, 40, 16, 21, 1)
    np.testing.assert_allclose(out["probabilities"].numpy()[0], expected, atol=1e-4)
    np.testing.assert_array_equal(out["mask"].numpy()[0], (expected > 0.5).astype("uint8"))
