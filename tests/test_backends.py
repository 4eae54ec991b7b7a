"""The backend matrix: tests/backend_checks.py under KERAS_BACKEND=jax and torch.

TensorFlow (this process) writes models, their outputs and loss and metric values;
each other backend runs the checks in its own process (a process has one Keras
backend), JAX first, with two host CPU devices for its data-parallel checks; PyTorch
also loads what JAX saved. Then TensorFlow loads what each saved.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import backend_cases
from attunet_keras import distribute
from attunet_keras import inference

OTHER_BACKENDS = ("jax", "torch")
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def backend_runs(tmp_path_factory):
    """`(folder, {backend: completed pytest process})`, the other backends run in order."""
    folder = tmp_path_factory.mktemp("backends")
    for name in backend_cases.SAVED_MODELS:
        keras.utils.set_random_seed(3)
        model = backend_cases.build(name)
        model.save(folder / f"tensorflow_{name}.keras")
        outputs = backend_cases.predict(model, name)
        np.savez(folder / f"tensorflow_{name}.npz",
                 **{f"output{index}": output for index, output in enumerate(outputs)})
        if name == "plain_channels_first":  # free sizes: an image that needs padding
            image = np.random.default_rng(4).random((37, 45, 1), dtype="float32")
            probabilities, gates = inference.attention_maps(model, image, normalized=True)
            np.savez(folder / "inference.npz", image=image, probabilities=probabilities,
                     **gates)
    (folder / "losses.json").write_text(json.dumps(backend_cases.loss_values()))
    (folder / "metrics.json").write_text(json.dumps(backend_cases.metric_values()))

    runs = {}
    for index, backend in enumerate(OTHER_BACKENDS):
        environment = dict(
            os.environ, KERAS_BACKEND=backend, ATTUNET_BACKEND_DIR=str(folder),
            ATTUNET_LOAD_FROM=" ".join(OTHER_BACKENDS[:index]),
            # Two host devices for the data-parallel checks; XLA's backend optimisation
            # off: JAX compiles every eager op and step, which took 38 of the 42 s of
            # saving this module's models with it on (2 cores); the values compared
            # are the same within the checks' tolerances.
            XLA_FLAGS="--xla_force_host_platform_device_count=2 "
                      "--xla_backend_optimization_level=0",
            PYTEST_ADDOPTS="", TF_CPP_MIN_LOG_LEVEL="3")
        runs[backend] = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
             os.path.join(HERE, "backend_checks.py"), "--basetemp",
             str(tmp_path_factory.mktemp(f"{backend}_tmp"))],
            capture_output=True, text=True, timeout=900, env=environment, cwd=str(folder))
    return folder, runs


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_the_checks_pass_under(backend, backend_runs):
    run = backend_runs[1][backend]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    # Only the JAX data-parallel check is skipped, under PyTorch.
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary and ("skipped" not in summary) == (backend == "jax"), summary


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@pytest.mark.parametrize("name", sorted(backend_cases.SAVED_MODELS))
def test_a_model_saved_under_another_backend_loads_under_tensorflow(backend, name,
                                                                     backend_runs):
    folder = backend_runs[0]
    assert backend_runs[1][backend].returncode == 0
    model = keras.saving.load_model(folder / f"{backend}_{name}.keras", safe_mode=True)
    expected = np.load(folder / f"{backend}_{name}.npz")
    outputs = backend_cases.predict(model, name)
    assert len(outputs) == len(expected.files)
    for index, output in enumerate(outputs):
        np.testing.assert_allclose(output, expected[f"output{index}"], atol=1e-4)


def test_data_parallel_is_refused_under_tensorflow():
    with pytest.raises(ValueError, match=r"'data_parallel' is keras.distribution.DataParallel, "
                                         r"which runs under KERAS_BACKEND=jax \(the backend "
                                         r"in use is tensorflow\); under tensorflow use "
                                         r"'mirrored'"):
        distribute.get_strategy("data_parallel")
