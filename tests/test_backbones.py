"""att_unet on keras.applications encoders: strides, training, saving, export, weights."""

import csv
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from attunet_keras import backbones
from attunet_keras import export
from attunet_keras import inference
from attunet_keras import models
from attunet_keras import run_folder
from helpers import reflect_padded_prediction


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


def test_a_backbone_model_serves_sizes_that_are_not_multiples_of_32(tmp_path):
    model = _model("mobilenetv2")
    export.export_model(model, tmp_path / "saved")
    served = tf.saved_model.load(str(tmp_path / "saved" / "1"))
    odd = np.random.default_rng(2).random((1, 100, 140, 1), dtype="float32")
    probabilities = served.signatures["probabilities"](images=tf.constant(odd))
    np.testing.assert_allclose(probabilities["probabilities"].numpy()[0],
                               reflect_padded_prediction(model, odd[0], 32), atol=1e-5)


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
    # Loaded statistics keep the application's momentum; random ones follow the
    # batches faster (backbones.RANDOM_INIT_BN_MOMENTUM).
    assert _batch_norm_momenta(encoder) == {0.999}  # keras.applications.MobileNetV2's
    assert _batch_norm_momenta(other) == {0.99}


def _batch_norm_momenta(model):
    return {layer.momentum for layer in model.layers
            if isinstance(layer, keras.layers.BatchNormalization)}


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


def test_a_two_stage_run_stopped_while_frozen_resumes_and_unfreezes(tmp_path, monkeypatch,
                                                                   capsys):
    """`train --backbone --freeze-epochs` stopped right after a backup inside its frozen
    stage, then run again. The stop is planted in-process (an exception after that
    backup is written): a real SIGKILL of a training process is tests/test_training.py's,
    and the backup it leaves is the same."""
    from attunet_keras import cli
    from attunet_keras import training

    output = tmp_path / "run"
    argv = ["train", "--dataset", "nuclei", "--output", str(output),
            "--backbone", "mobilenetv2", "--freeze-epochs", "2", "--epochs", "3",
            "--steps-per-epoch", "3", "--batch-size", "2", "--features", "4",
            "--tile", "64", "--backup-every", "1", "--learning-rate", "0.001",
            "--verbose", "0"]
    save_backup = run_folder.save_backup

    def stopped_in_the_second_epoch(model, backup_dir, epoch, step):
        save_backup(model, backup_dir, epoch, step)
        if (epoch, step) >= (1, 2):
            raise KeyboardInterrupt

    monkeypatch.setattr(run_folder, "save_backup", stopped_in_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    monkeypatch.setattr(run_folder, "save_backup", save_backup)
    progress = run_folder.backup_progress(str(output / "backup"))
    assert progress["frozen"] and (progress["epoch"], progress["step"]) == (1, 2), progress

    capsys.readouterr()
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "from its backup at epoch 2 of 3" in out
    assert "Epoch 3: encoder unfrozen; learning rate 0.0001" in out
    with open(output / "log.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["epoch"] for row in rows] == ["0", "1", "2"]  # every epoch logged once
    model = keras.saving.load_model(output / "last.keras")
    assert model.get_layer("mobilenetv2_encoder").trainable
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-4)
    assert not (output / "backup").exists()


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
