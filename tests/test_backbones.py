"""att_unet on keras.applications encoders: strides, training, saving, export, weights."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from attunet_keras import backbones
from attunet_keras import export
from attunet_keras import inference
from attunet_keras import models


def _model(backbone, size=128, **options):
    return models.att_unet(size, size, 1, features=8, data_format="channels_last",
                           in_channels=1, backbone=backbone, **options)


@pytest.mark.parametrize("backbone", sorted(backbones.BACKBONES))
def test_the_table_names_the_feature_maps_at_strides_2_4_8_16_and_32(backbone):
    encoder = backbones.encoder(backbone)
    sizes = [tuple(output.shape[1:3]) for output in encoder(keras.Input((128, 128, 3)))]
    expected = [(128 // stride, 128 // stride) for stride in (2, 4, 8, 16, 32)]
    if backbones.BACKBONES[backbone].skips[0] is None:  # ConvNeXt: no stride-2 stage
        expected = expected[1:]
    assert sizes == expected


@pytest.mark.parametrize("backbone", sorted(backbones.BACKBONES))
def test_every_backbone_builds_at_128_and_160(backbone):
    for size in (128, 160):
        model = _model(backbone, size=size)
        assert model.output.shape == (None, size, size, 1)
        assert model.get_layer(f"{backbone}_encoder").trainable


# Saving and exporting every application takes minutes each on 2 CPU cores: the suite
# does it for the smallest; the other applications go through the same code.
@pytest.mark.parametrize("backbone", ["mobilenetv2"])
def test_a_backbone_model_trains_saves_reloads_and_exports(backbone, tmp_path):
    assert _model(backbone, size=160).output.shape == (None, 160, 160, 1)
    model = _model(backbone)
    assert model.get_layer(f"{backbone}_encoder").trainable
    # Eager steps: tracing the training step of each application would take a minute.
    model.compile(optimizer="adam", loss="binary_crossentropy", run_eagerly=True)
    rng = np.random.default_rng(0)
    images = rng.random((2, 128, 128, 1), dtype="float32")
    history = model.fit(images, (images > 0.5).astype("float32"), batch_size=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()  # two steps

    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    expected = model.predict(images, verbose=0)
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), expected, atol=1e-5)

    # export_model reloads the SavedModel and compares it with Keras on `images`
    assert export.export_model(model, tmp_path / "saved", sample=images) <= 1e-5
    assert (tmp_path / "saved" / "1" / "saved_model.pb").is_file()


def test_a_backbone_model_serves_sizes_that_are_not_multiples_of_32(tmp_path):
    model = _model("mobilenetv2")
    export.export_model(model, tmp_path / "saved")
    served = tf.saved_model.load(str(tmp_path / "saved" / "1"))
    odd = np.random.default_rng(2).random((1, 100, 140, 1), dtype="float32")
    probabilities = served.signatures["probabilities"](images=tf.constant(odd))
    np.testing.assert_allclose(probabilities["probabilities"].numpy()[0],
                               inference.predict_probabilities(model, odd[0], normalized=True),
                               atol=1e-5)


def test_a_weights_file_is_loaded_into_the_encoder(tmp_path):
    application = keras.applications.MobileNetV2(include_top=False, weights=None,
                                                 input_shape=(128, 128, 3))
    path = tmp_path / "mobilenetv2_notop.weights.h5"
    application.save_weights(path)
    model = _model("mobilenetv2", backbone_weights=str(path))
    encoder = model.get_layer("mobilenetv2_encoder")
    for loaded, written in zip(encoder.get_weights(), application.get_weights()):
        np.testing.assert_array_equal(loaded, written)
    other = _model("mobilenetv2").get_layer("mobilenetv2_encoder")
    assert not all(np.array_equal(a, b) for a, b in zip(other.get_weights(),
                                                        application.get_weights()))


def test_a_frozen_backbone_keeps_its_weights_and_batch_norm_statistics():
    model = _model("mobilenetv2", freeze_backbone=True)
    encoder = model.get_layer("mobilenetv2_encoder")
    assert not encoder.trainable and encoder.trainable_weights == []
    before = encoder.get_weights()
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="binary_crossentropy")
    images = np.random.default_rng(1).random((2, 128, 128, 1), dtype="float32")
    model.fit(images, (images > 0.5).astype("float32"), epochs=1, verbose=0)
    for a, b in zip(before, encoder.get_weights()):  # moving means and variances too
        np.testing.assert_array_equal(a, b)


def test_gray_images_are_mapped_to_rgb_and_preprocessing_is_inside_the_model():
    model = _model("vgg16")
    to_rgb = model.get_layer("input_to_rgb")
    np.testing.assert_allclose(to_rgb.get_weights()[0], np.ones((1, 1, 1, 3)))
    assert model.get_layer("backbone_preprocessing").mode == "caffe"
    rgb = models.att_unet(64, 64, 1, features=8, data_format="channels_last", in_channels=3,
                          backbone="efficientnetb0")
    assert "input_to_rgb" not in [layer.name for layer in rgb.layers]


@pytest.mark.parametrize("changes, match", [
    (dict(backbone="resnet18"), r"backbone='resnet18' is not supported"),
    (dict(backbone="vgg16", data_format="channels_first"),
     r"needs data_format='channels_last'"),
    (dict(backbone="vgg16", img_w=80), r"img_w=80 must be divisible by 32 with a backbone"),
    (dict(backbone="vgg16", depth=3), r"depth=3 is not allowed with a backbone"),
    (dict(backbone="vgg16", backbone_weights="missing.h5"), r"backbone_weights='missing.h5'"),
])
def test_bad_backbone_options_are_refused_before_building(changes, match, monkeypatch):
    monkeypatch.setattr(keras, "Input", lambda *a, **k: pytest.fail("a layer was built"))
    arguments = dict(img_w=64, img_h=64, n_label=1, features=8, data_format="channels_last")
    arguments.update(changes)
    with pytest.raises(ValueError, match=match):
        models.att_unet(**arguments)


def test_two_stage_fine_tuning_freezes_then_unfreezes_the_encoder(tmp_path, capsys):
    from attunet_keras import training

    config = training.TrainConfig(
        dataset="nuclei", output=str(tmp_path / "run"), epochs=2, steps_per_epoch=1,
        batch_size=2, features=8, tile=64, backbone="mobilenetv2", freeze_epochs=1,
        backup_every=1, learning_rate=1e-3)
    training.train(config, verbose=0)
    assert "Epoch 2: encoder unfrozen; learning rate 0.0001" in capsys.readouterr().out
    with open(tmp_path / "run" / "log.csv") as file:
        assert [line.split(",")[0] for line in file.read().splitlines()[1:]] == ["0", "1"]
    model = keras.saving.load_model(tmp_path / "run" / "last.keras")
    assert model.get_layer("mobilenetv2_encoder").trainable


def test_training_refuses_backbone_settings_that_cannot_work(tmp_path):
    from attunet_keras import training

    for changes, match in ((dict(backbone="vgg16", tile=48), r"tile=48 must be divisible by 32"),
                           (dict(freeze_epochs=1), r"freeze_epochs=1 needs a backbone"),
                           (dict(backbone="vgg16", freeze_epochs=5, epochs=5),
                            r"freeze_epochs=5 must be less than epochs=5"),
                           (dict(backbone="vgg16", dataset="brain"), r"112x128")):
        values = dict(dataset="nuclei", output=str(tmp_path / "run"), tile=64)
        values.update(changes)
        with pytest.raises(ValueError, match=match):
            training.train(training.TrainConfig(**values), verbose=0)
        assert not (tmp_path / "run").exists()
