"""Tests of attunet_keras.distribute: strategies, MirroredStrategy on two CPUs, precision."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from attunet_keras import distribute
from attunet_keras import models

# Runs in a fresh process: the CPU can only be split before TensorFlow starts.
MIRRORED_SCRIPT = r"""
import json, sys
from attunet_keras import distribute
distribute.split_cpu(2)
import keras, numpy as np, tensorflow as tf
from attunet_keras import losses, models

rng = np.random.default_rng(0)
half = rng.random((4, 32, 32, 1), dtype="float32")
# Each global batch of 8 is two identical halves, one per replica, so that a
# batch-wide Dice without smoothing is the same on a replica's half as on the whole
# batch (a smoothing term would weigh differently on 4 and on 8 samples).
images = np.concatenate([half, half, half[::-1], half[::-1]])
masks = (images > 0.5).astype("float32")

LOSSES = {"bce": lambda: losses.get("bce", 1, "channels_last"),
          "bce_dice": lambda: losses.CrossEntropyDiceLoss(smooth=0.0,
                                                          data_format="channels_last")}

def train(strategy_name, loss_name, initial):
    keras.utils.set_random_seed(0)
    strategy = distribute.get_strategy(strategy_name)
    with strategy.scope():
        model = models.att_unet(32, 32, 1, depth=2, features=4, dropout=0.0,
                                data_format="channels_last", in_channels=1)
        if initial is not None:
            model.set_weights(initial)
        model.compile(keras.optimizers.Adam(1e-2),
                      loss=LOSSES[loss_name](),
                      jit_compile=distribute.resolve_jit_compile("auto", strategy))
    start = [w.copy() for w in model.get_weights()]
    dataset = tf.data.Dataset.from_tensor_slices((images, masks)).batch(8)
    history = model.fit(dataset, epochs=3, verbose=0, shuffle=False)
    return start, model.get_weights(), history.history["loss"], strategy.num_replicas_in_sync

report = {}
for loss_name in ("bce", "bce_dice"):
    start, single, single_loss, one = train("default", loss_name, None)
    _, mirrored, mirrored_loss, replicas = train("mirrored", loss_name, start)
    report[loss_name] = dict(
        replicas=[one, replicas],
        max_weight_diff=max(float(np.max(np.abs(a - b))) for a, b in zip(single, mirrored)),
        moved=max(float(np.max(np.abs(a - b))) for a, b in zip(start, single)),
        single_loss=single_loss, mirrored_loss=mirrored_loss)
print("REPORT" + json.dumps(report))
"""


@pytest.fixture(scope="module")
def mirrored_report():
    result = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], capture_output=True,
                            text=True, timeout=600,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT"))
    return json.loads(line[len("REPORT"):])


@pytest.mark.parametrize("loss_name", ["bce", "bce_dice"])
def test_two_cpu_replicas_train_like_one_device(mirrored_report, loss_name):
    report = mirrored_report[loss_name]
    assert report["replicas"] == [1, 2]
    assert report["moved"] > 1e-3                 # training changed the weights
    assert report["max_weight_diff"] < 1e-5       # and both ways changed them alike
    np.testing.assert_allclose(report["mirrored_loss"], report["single_loss"], rtol=1e-4)


def test_strategies_by_name():
    assert distribute.get_strategy("default") is tf.distribute.get_strategy()
    assert distribute.describe(tf.distribute.get_strategy()) == (
        "_DefaultDistributionStrategy: 1 replica(s) on the default device")
    # no GPU and no TPU here: auto is the default strategy
    assert distribute.get_strategy("auto").num_replicas_in_sync == 1
    one = distribute.get_strategy("one_device")
    assert isinstance(one, tf.distribute.OneDeviceStrategy)
    assert "OneDeviceStrategy: 1 replica(s)" in distribute.describe(one)


@pytest.mark.parametrize(
    "name, match",
    [
        ("horovod", r"strategy='horovod' is not supported; expected one of"),
        ("tpu", r"no TPU was found"),
    ],
)
def test_unavailable_strategies_are_refused(name, match):
    with pytest.raises(ValueError, match=match):
        distribute.get_strategy(name)


def test_multiworker_needs_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the TF_CONFIG environment variable"):
        distribute.get_strategy("multiworker")


@pytest.mark.parametrize("precision, compute", [("mixed_bfloat16", "bfloat16"),
                                                ("mixed_float16", "float16")])
def test_mixed_precision_keeps_a_float32_output(precision, compute):
    with distribute.precision_policy(precision):
        model = models.att_unet(32, 32, 2, depth=2, features=4,
                                data_format="channels_last", in_channels=1,
                                output_activation="softmax")
        model.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy")
        images = np.random.default_rng(0).random((2, 32, 32, 1), dtype="float32")
        targets = np.eye(2, dtype="float32")[(images[..., 0] > 0.5).astype(int)]
        history = model.fit(images, targets, epochs=1, verbose=0)
    assert keras.config.dtype_policy().name == "float32"   # restored
    assert model.get_layer("enc1_conv1").compute_dtype == compute
    assert model.get_layer("head_softmax").compute_dtype == "float32"
    assert model.output.dtype == "float32"
    assert np.isfinite(history.history["loss"][0])


def test_logits_get_a_float32_cast_under_mixed_precision():
    with distribute.precision_policy("mixed_bfloat16"):
        model = models.att_unet(32, 32, 1, depth=2, features=4, output_activation=None)
    assert model.layers[-1].name == "head_float32"
    assert model.output.dtype == "float32"


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match=r"precision='float64' is not supported"):
        distribute.set_precision("float64")


def test_jit_compile_is_off_under_several_replicas():
    class TwoReplicas:
        num_replicas_in_sync = 2

    assert distribute.resolve_jit_compile("auto", TwoReplicas()) is False
    assert distribute.resolve_jit_compile("auto", tf.distribute.get_strategy()) == "auto"
    assert distribute.resolve_jit_compile("on", TwoReplicas()) is True
    assert distribute.resolve_jit_compile("off", None) is False
    with pytest.raises(ValueError, match="jit_compile='yes' is not supported"):
        distribute.resolve_jit_compile("yes", None)


def test_float16_channels_first_training_is_refused_on_a_cpu(tmp_path):
    from attunet_keras import training

    config = training.TrainConfig(dataset="nuclei", output=str(tmp_path / "run"),
                                  precision="mixed_float16", data_format="channels_first",
                                  epochs=1, steps_per_epoch=1, depth=2, features=4,
                                  tile=64)
    with pytest.raises(ValueError, match="cannot train on a CPU.*channels_last only"):
        training.train(config, verbose=0)
    assert not (tmp_path / "run").exists()
