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
    from attunet_keras import training

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + seconds
    try:
        while time.time() < deadline:
            progress = training.backup_progress(str(backup_dir))
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
