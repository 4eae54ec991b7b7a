"""Exporting a model to a TensorFlow SavedModel, atomically and checked."""

import os
import shutil
import tempfile

import numpy as np


def export_saved_model(model, path, *, sample=None, overwrite=False, atol=1e-5):
    """Exports `model` as a SavedModel at `path`, checked and renamed into place.

    The SavedModel is written to a temporary folder beside `path`; when `sample` is
    given it is reloaded with `tf.saved_model.load` and its `serve` endpoint is compared
    with `model.predict` on `sample`. Only then is it renamed to `path`, so a failed or
    interrupted export never leaves a half-written model at `path`.

    Args:
        model: keras.Model. The model to export.
        path: str or path-like. The SavedModel folder to create.
        sample: array or None. A batch to check the reloaded model on. Defaults to
            `None` (no check).
        overwrite: bool. Replace an existing `path`. Defaults to `False`.
        atol: float. Largest absolute difference accepted by the check.
            Defaults to 1e-5.

    Returns:
        The largest absolute difference between `serve(sample)` and
        `model.predict(sample)`, or `None` when no sample was given.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False.
        AssertionError: the reloaded model's output differs by more than `atol`.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(
            f"{path} already exists; choose another path or pass overwrite=True "
            "(--overwrite on the command line) to replace it."
        )
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    try:
        _chmod_as_umask(staging)
        model.export(staging, format="tf_saved_model", verbose=False)
        max_diff = None
        if sample is not None:
            max_diff = saved_model_max_diff(model, staging, sample)
            if not max_diff <= atol:
                raise AssertionError(
                    f"the reloaded SavedModel differs from the Keras model by "
                    f"{max_diff:.3g} (> atol={atol:g}); nothing was written to {path}."
                )
        _replace_dir(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return max_diff


def saved_model_max_diff(model, path, sample):
    """Reloads the SavedModel at `path`; the largest |serve(sample) - predict(sample)|."""
    import tensorflow as tf

    reloaded = tf.saved_model.load(os.fspath(path))
    sample = np.asarray(sample, dtype="float32")
    served = tf.nest.flatten(reloaded.serve(tf.constant(sample)))
    expected = tf.nest.flatten(model.predict(sample, verbose=0))
    if len(served) != len(expected):
        raise AssertionError(
            f"the SavedModel has {len(served)} outputs, the Keras model {len(expected)}."
        )
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(served, expected))


def _replace_dir(source, target):
    """Renames folder `source` to `target`, replacing any `target` only at the end."""
    if not os.path.lexists(target):
        os.rename(source, target)
        return
    retired = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old.",
                               dir=os.path.dirname(target))
    os.rmdir(retired)
    os.rename(target, retired)
    os.rename(source, target)
    if os.path.isdir(retired) and not os.path.islink(retired):
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.remove(retired)


def _chmod_as_umask(folder):
    """Gives a `mkdtemp` folder (mode 0700) the mode a plain `mkdir` would give it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
