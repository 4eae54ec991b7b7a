"""Every keras.applications backbone builds at 128, trains, saves and reloads; one
member of every family also builds at 160 and exports.

Its own module so that pytest-xdist (make test: --dist loadfile) runs it beside the
other backbone tests: it is the slowest file of the suite (about 5 minutes on 2 cores).
"""

import keras
import numpy as np
import pytest

from attunet_keras import backbones
from attunet_keras import export
from attunet_keras import models


# One export per family (each costs 15-30 s of tracing on 2 cores): EfficientNetB1-B3
# are B0's blocks at other widths and depths, ResNet50V2 is ResNet50's family with
# pre-activation blocks; they build, train, save and reload, and are not exported.
NOT_EXPORTED = ("efficientnetb1", "efficientnetb2", "efficientnetb3", "resnet50v2")


def _model(backbone, size=128, **options):
    return models.att_unet(size, size, 1, features=8, data_format="channels_last",
                           in_channels=1, backbone=backbone, **options)


@pytest.mark.parametrize("backbone", sorted(backbones.BACKBONES))
def test_every_backbone_builds_trains_saves_reloads_and_exports(backbone, tmp_path):
    if backbone not in NOT_EXPORTED:  # 160 (a multiple of 32, not of 64): one per family
        assert _model(backbone, size=160).output.shape == (None, 160, 160, 1)
    model = _model(backbone)
    assert model.output.shape == (None, 128, 128, 1)
    encoder = model.get_layer(f"{backbone}_encoder")
    assert encoder.trainable
    # Eager steps: tracing the training step of each application would take a minute.
    model.compile(optimizer="adam", loss="binary_crossentropy", run_eagerly=True)
    rng = np.random.default_rng(0)
    images = rng.random((2, 128, 128, 1), dtype="float32")
    before = [weight.numpy() for weight in encoder.trainable_weights]
    history = model.fit(images, (images > 0.5).astype("float32"), batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()  # one step
    assert any(not np.array_equal(b, a.numpy()) for b, a in zip(before, encoder.trainable_weights))

    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    # called eagerly: predict would trace each application's graph twice more
    expected = np.asarray(model(images, training=False))
    np.testing.assert_allclose(np.asarray(reloaded(images, training=False)), expected,
                               atol=1e-5)

    if backbone in NOT_EXPORTED:
        return
    # export_model reloads the SavedModel and compares it with Keras on `images`
    assert export.export_model(model, tmp_path / "saved", sample=images) <= 1e-5
    assert (tmp_path / "saved" / "1" / "saved_model.pb").is_file()
