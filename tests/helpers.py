"""Small helpers for the tests: layout-aware random batches and transposes, and a
training process killed at a chosen backup."""

import signal
import subprocess
import time

import numpy as np
import pytest


def image_batch(batch, channels, height, width, data_format, seed=0):
    """A random float32 batch in `data_format`."""
    rng = np.random.default_rng(seed)
    if data_format == "channels_first":
        shape = (batch, channels, height, width)
    else:
        shape = (batch, height, width, channels)
    return rng.random(shape, dtype="float32")


def to_channels_last(array):
    """NCHW to NHWC."""
    return np.transpose(array, (0, 2, 3, 1))


def kill_training_at(command, backup_dir, reached, what, seconds=300, env=None):
    """Starts `command` (an `attunet-keras train`), waits until the backup progress in
    `backup_dir` satisfies `reached(progress)`, then SIGKILLs it; fails the test if the
    process ends first or nothing `what` names appears within `seconds`."""
    from attunet_keras import run_folder

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + seconds
    try:
        while time.time() < deadline:
            progress = run_folder.backup_progress(str(backup_dir))
            if progress and reached(progress):
                break
            if process.poll() is not None:
                pytest.fail(f"training ended before it was killed (rc {process.returncode})")
            time.sleep(0.02)
        else:
            pytest.fail(f"no {what} appeared in time")
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()


_FREE_SIZE_COPIES = {}


def free_size_copy(model, data_format="channels_last"):
    """The model with free spatial sizes, rebuilt from its config and given its weights
    here (not through the package's own `inference.fully_convolutional`), so that a
    served model can be compared with plain Keras. Built once per model and layout
    (and rebuilt when the model's weights changed since)."""
    import keras

    key = (id(model), data_format)
    weights = model.get_weights()
    if key in _FREE_SIZE_COPIES:
        kept, free = _FREE_SIZE_COPIES[key]
        if kept is model and all(np.array_equal(a, b) for a, b in
                                 zip(weights, free.get_weights())):
            return free

    config = model.get_config()
    channels_first = data_format == "channels_first"
    for layer in config["layers"]:
        if layer["class_name"] == "InputLayer":
            shape = list(layer["config"]["batch_shape"])
            keep = {0, 1} if channels_first else {0, len(shape) - 1}
            layer["config"]["batch_shape"] = [side if axis in keep else None
                                              for axis, side in enumerate(shape)]
    free = keras.Model.from_config(config)
    free.set_weights(weights)
    _FREE_SIZE_COPIES[key] = (model, free)
    return free


def reflect_padded_prediction(model, image, multiple, data_format="channels_last"):
    """`model`'s main output on one (H, W, C) image padded at its bottom and right by
    NumPy's reflection to multiples of `multiple`, cropped back: what a served model
    computes, from plain Keras (`free_size_copy`) and NumPy alone."""
    height, width = image.shape[:2]
    padded = np.pad(image, [(0, -height % multiple), (0, -width % multiple), (0, 0)],
                    mode="reflect")
    batch = padded[None] if data_format == "channels_last" else padded[None].transpose(
        0, 3, 1, 2)
    # called eagerly: a traced predict would trace again for every padded size
    output = free_size_copy(model, data_format)(batch, training=False)
    output = output[0] if isinstance(output, (list, tuple)) else output
    output = np.asarray(output)
    output = output[0] if data_format == "channels_last" else output[0].transpose(1, 2, 0)
    return output[:height, :width]


def write_pairs(folder, count, size=(64, 64), seed=0, stem="im"):
    """`count` PNG pairs in `folder/images` and `folder/masks`: random 8-bit images
    and their binary masks (pixels above 128); returns `folder`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = (rng.random(size) * 255).astype("uint8")
        Image.fromarray(image).save(folder / "images" / f"{stem}{index}.png")
        Image.fromarray((image > 128).astype("uint8")).save(
            folder / "masks" / f"{stem}{index}.png")
    return folder
