"""benchmarks/gpu.py --quick runs every cell where TensorFlow cannot be imported.

The GPU machine the script is written for has JAX and PyTorch and no TensorFlow; here
TensorFlow is hidden from the import system of every process the script starts (a
`sitecustomize` on PYTHONPATH whose path finder does not see `tensorflow`), so an
import of it anywhere on the script's path fails its cell.
"""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(HERE), "benchmarks", "gpu.py")

HIDE_TENSORFLOW = '''
import importlib.machinery
import sys


class WithoutTensorFlow(importlib.machinery.PathFinder):
    """The path finder, blind to tensorflow: `import tensorflow` fails as where it is
    not installed, and `importlib.util.find_spec` says None (as PyTorch asks)."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [WithoutTensorFlow if finder is importlib.machinery.PathFinder
                    else finder for finder in sys.meta_path]
'''


def test_the_quick_run_measures_every_cell_without_tensorflow(tmp_path):
    hidden = tmp_path / "hide"
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text(HIDE_TENSORFLOW)
    output = tmp_path / "gpu.json"
    environment = dict(os.environ, PYTHONPATH=str(hidden), TF_CPP_MIN_LOG_LEVEL="3",
                       XLA_FLAGS="--xla_backend_optimization_level=0")
    probe = subprocess.run([sys.executable, "-c", "import tensorflow"], env=environment,
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'tensorflow'" in probe.stderr

    run = subprocess.run([sys.executable, SCRIPT, "--quick", "--output", str(output)],
                         env=environment, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads(output.read_text())
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import gpu

    expected = [cell["name"] for _, cells in gpu.plan(quick=True) for cell in cells]
    assert sorted(report["cells"]) == sorted(expected) and len(expected) == 13
    for name, cell in report["cells"].items():
        assert cell["ok"], (name, cell)
        assert cell["tensorflow_imported"] is False
    assert report["machine"]["keras"] and report["machine"]["jax"]
    assert report["machine"]["torch_device"] and report["machine"]["jax_devices"]

    ceilings = report["cells"]["ceilings"]
    assert ceilings["matmul_float32_tflops"] > 0 and ceilings["copy_gb_per_s"] > 0
    for name, cell in report["cells"].items():
        if name.startswith("train_infer/"):
            for model in ("library", "plain"):
                assert cell[model]["train_images_per_s"] > 0, name
            # the same layers: the same FLOPs, so a ratio near 1 is plausible, not forced
            assert cell["library_vs_plain_train"] > 0
    parallel = report["cells"]["data_parallel/jax"]
    assert parallel["replicas"] == 1 and parallel["max_weight_difference"] <= 1e-4
    window = report["cells"]["sliding_window/jax/2d"]
    assert window["shape"] == [128, 128] and window["peak_memory_gb"] > 0
    assert "| train_infer/jax/float32/channels_last |" in run.stdout  # the table, last
