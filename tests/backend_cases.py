"""Cases shared by tests/test_backends.py (TensorFlow) and tests/backend_checks.py
(run under KERAS_BACKEND=jax and torch in subprocesses): the models saved under one
backend and loaded under another, and the fixed arrays losses and metrics are
compared on. Each side builds them with this module's functions only."""

import keras
import numpy as np

# name -> att_unet / att_unet_3d arguments. Free sizes (None) put the custom
# SpatialSizeCheck layer in; batch_norm, grid gates, transpose up-sampling and deep
# supervision put in every other kind of layer the package makes.
SAVED_MODELS = {
    "plain_channels_first": dict(img_w=None, img_h=None, n_label=1, depth=2, features=8,
                                 data_format="channels_first", in_channels=1),
    "options_channels_last": dict(img_w=32, img_h=32, n_label=3, depth=2, features=8,
                                  data_format="channels_last", in_channels=2,
                                  output_activation="softmax", batch_norm=True,
                                  gate="grid", upsampling="transpose",
                                  deep_supervision=True),
    "volume_channels_last": dict(img_d=16, img_w=16, img_h=16, n_label=1, depth=2,
                                 features=4, data_format="channels_last", in_channels=1),
}


def build(name):
    from attunet_keras import models

    arguments = dict(SAVED_MODELS[name])
    if "img_d" in arguments:
        return models.att_unet_3d(**arguments)
    return models.att_unet(**arguments)


def model_input(name, batch=2):
    """The fixed input batch of a saved model (sizes 32 for free-size models)."""
    arguments = SAVED_MODELS[name]
    spatial = [arguments[key] or 32 for key in ("img_d", "img_w", "img_h") if key in arguments]
    channels = arguments["in_channels"]
    if arguments["data_format"] == "channels_first":
        shape = (batch, channels, *spatial)
    else:
        shape = (batch, *spatial, channels)
    return np.random.default_rng(7).random(shape, dtype="float32")


def predict(model, name):
    """The model's outputs on its fixed input, as a list of numpy arrays."""
    outputs = model(model_input(name), training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return [keras.ops.convert_to_numpy(output) for output in outputs]


def loss_cases():
    """`(key, loss name, n_label, data_format, y_true, y_pred)` for every loss."""
    from attunet_keras import losses

    rng = np.random.default_rng(11)
    cases = []
    for name in losses.LOSSES:
        for n_label in (1, 3):
            for data_format in ("channels_last", "channels_first"):
                channels = max(n_label, 1)
                labels = rng.integers(0, max(n_label, 2), (2, 16, 16))
                if n_label == 1:
                    y_true = labels[..., None].astype("float32")
                    y_pred = rng.random((2, 16, 16, 1), dtype="float32")
                else:
                    y_true = np.eye(channels, dtype="float32")[labels]
                    logits = rng.normal(size=(2, 16, 16, channels)).astype("float32")
                    y_pred = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
                if data_format == "channels_first":
                    y_true, y_pred = (np.moveaxis(a, -1, 1) for a in (y_true, y_pred))
                cases.append((f"{name}-{n_label}-{data_format}", name, n_label, data_format,
                              np.ascontiguousarray(y_true), np.ascontiguousarray(y_pred)))
    return cases


def loss_values(layout=True):
    """`{key: value}` of every loss case under the backend in use; `layout=False` gives
    the losses no `data_format` (they find the channel axis from the shapes)."""
    from attunet_keras import losses

    return {key: float(keras.ops.convert_to_numpy(
        losses.get(name, n_label, data_format if layout else None)(y_true, y_pred)))
            for key, name, n_label, data_format, y_true, y_pred in loss_cases()}


def metric_values(layout=True):
    """`{key: value}` of every metric of `segmentation_metrics` on the loss cases;
    `layout` as `loss_values`."""
    from attunet_keras import metrics

    values = {}
    for key, _, n_label, data_format, y_true, y_pred in loss_cases():
        if not key.startswith("bce-"):
            continue  # the metrics see the same arrays for every loss name
        for metric in metrics.segmentation_metrics(
                n_label, data_format=data_format if layout else None):
            metric.update_state(y_true[:1], y_pred[:1])
            metric.update_state(y_true[1:], y_pred[1:])  # accumulated over two batches
            values[f"{metric.name}-{n_label}-{data_format}"] = float(
                keras.ops.convert_to_numpy(metric.result()))
    return values
