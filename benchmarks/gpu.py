"""What "GPU-aware" measures to: att_unet under Keras's JAX and PyTorch backends on a GPU.

One prepared run (about 8 minutes on one GPU; `--quick` runs every step tiny on the
CPU, in under a minute, so the GPU's time is spent measuring, not debugging). It needs
no TensorFlow: the machine it is written for (one NVIDIA H200 with PyTorch and JAX's
CUDA plugin) has none, and `import attunet_keras` and everything timed here are
`keras.ops` only. In order of priority, each cell in a fresh process of its backend
(a process has one Keras backend; JAX's peak memory counts from its process's start),
each with a time cap, the JSON rewritten after every cell so that a run cut short
still returns what it measured:

1. `ceilings` (JAX): a large bf16 and fp32 matmul (TFLOP/s) and a device-to-device
   copy (GB/s);
2. `train`/`infer` of `att_unet` at 512², batch 16 (the reference architecture,
   7,977,941 parameters), next to the plain Keras model of the same layers
   (benchmarks/bench.py's `plain_reference_model`, no attunet_keras code) timed
   alternately in the same process: JAX (jit) and PyTorch, float32 and
   mixed_bfloat16 channels_last first, then mixed_float16, then channels_first;
   conv TFLOP/s against the matmul ceiling of the same precision;
3. `att_unet_3d` training steps at 128³ (features 16, batch 1), peak GPU memory;
4. `keras.distribution.DataParallel` under JAX on the GPU (1 device): the weights after
   a few steps equal those without a distribution;
5. sliding-window inference (`inference.predict_sliding_window`, patch 512) of a
   4096² image, then of a 256³ volume (patch 128): time and peak memory.

Writes one JSON (`--output`, default benchmarks/results/gpu_h200.json) and prints a
short table last.

On the GPU machine (Python 3.12, no network): the small wheels it lacks are downloaded
here, for that Python and platform, into `.whl/`, which travels with the working tree:

    python3 -m pip download --dest .whl --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        keras==3.15.0 absl-py rich namex h5py optree ml-dtypes packaging \
        nibabel tifffile pillow scipy scikit-image
    # there:
    pip install --no-index --no-deps --target /tmp/wheels .whl/*.whl
    PYTHONPATH=/tmp/wheels:. python benchmarks/gpu.py --output $OUT/gpu_h200.json

Here (the suite's check, tests/test_gpu_benchmark.py, runs it with TensorFlow hidden):

    .venv/bin/python benchmarks/gpu.py --quick --output build/gpu_quick.json
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from importlib import metadata

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
COMPUTE_DTYPES = {"float32": "float32", "mixed_bfloat16": "bfloat16",
                  "mixed_float16": "float16"}


def plan(quick):
    """`[(backend, [cell, ...]), ...]`: the processes in order of priority; each cell a
    dict with its `name`, `cap` (seconds) and settings."""
    size, batch, steps = (32, 2, 2) if quick else (512, 16, 10)
    depth, features = (2, 8) if quick else (4, 32)  # the reference architecture
    # seconds per cell; quick: a loaded CPU compiles slowly, and nothing is timed
    cap, step_cap = (90, 90) if quick else (60, 120)

    def step_cell(backend, precision, layout):
        return dict(name=f"train_infer/{backend}/{precision}/{layout}", kind="train_infer",
                    size=size, batch=batch, steps=steps, repeats=1 if quick else 3,
                    depth=depth, features=features,
                    precision=precision, layout=layout, cap=step_cap)

    first = [("jax", [dict(name="ceilings", kind="ceilings", n=256 if quick else 8192,
                           copy_mb=4 if quick else 2048, cap=cap),
                      step_cell("jax", "float32", "channels_last"),
                      step_cell("jax", "mixed_bfloat16", "channels_last")]),
             ("torch", [step_cell("torch", "float32", "channels_last"),
                        step_cell("torch", "mixed_bfloat16", "channels_last")])]
    volume = 16 if quick else 128
    later = [
        ("jax", [dict(name="train_3d/jax/mixed_bfloat16", kind="train_3d", size=volume,
                      depth=2 if quick else 4, features=4 if quick else 16, steps=steps,
                      precision="mixed_bfloat16", cap=cap)]),
        ("jax", [dict(name="data_parallel/jax", kind="data_parallel", size=32 if quick else 128,
                      steps=3, cap=cap)]),
        ("jax", [dict(name="sliding_window/jax/2d", kind="sliding_window",
                      image=128 if quick else 4096, patch=32 if quick else 512,
                      depth=depth, features=features, precision="mixed_bfloat16",
                      cap=cap)]),
        ("jax", [step_cell("jax", "mixed_float16", "channels_last"),
                 step_cell("jax", "mixed_bfloat16", "channels_first")]),
        ("torch", [step_cell("torch", "mixed_float16", "channels_last"),
                   step_cell("torch", "mixed_bfloat16", "channels_first")]),
        ("jax", [dict(name="sliding_window/jax/3d", kind="sliding_window", volume=True,
                      image=32 if quick else 256, patch=16 if quick else 128,
                      depth=2 if quick else 4, features=4 if quick else 16,
                      precision="mixed_bfloat16", cap=cap)]),
    ]
    processes = first + later
    if quick:  # the same cells in one process per backend: the suite's minute
        merged = {}
        for backend, cells in processes:
            merged.setdefault(backend, []).extend(cells)
        processes = list(merged.items())
    return processes


# --- measuring, inside a worker process ------------------------------------------------


class CellTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise CellTimeout("the cell ran past its time cap")


def _sync(value):
    """Waits for the device to finish `value` (JAX and PyTorch run asynchronously)."""
    import keras

    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return value
    import jax

    return jax.block_until_ready(value)


def _reset_peak():
    import keras

    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()


def peak_memory_gb():
    """Peak accelerator memory (GB): PyTorch's since the last reset, JAX's since the
    process started; on a CPU the process's peak resident memory."""
    import keras

    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 1e9
    else:
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return stats["peak_bytes_in_use"] / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _timed(function, steps):
    _sync(function())
    start = time.perf_counter()
    for _ in range(steps):
        result = function()
    _sync(result)
    return (time.perf_counter() - start) / steps


def cell_ceilings(cell):
    import jax
    import jax.numpy as jnp

    n = cell["n"]
    result = {}
    for dtype in ("bfloat16", "float32"):
        a = jnp.ones((n, n), dtype)
        product = jax.jit(lambda a, b: a @ b)
        seconds = min(_timed(lambda: product(a, a), 5) for _ in range(3))
        result[f"matmul_{dtype}_tflops"] = 2 * n**3 / seconds / 1e12
    elements = cell["copy_mb"] * 2**20 // 4
    source = jnp.ones((elements,), "float32")
    copy = jax.jit(lambda x: x + 0)  # reads and writes every byte once
    seconds = min(_timed(lambda: copy(source), 5) for _ in range(3))
    result["copy_gb_per_s"] = 2 * elements * 4 / seconds / 1e9
    result["matmul_n"] = n
    return result


def cell_train_infer(cell):
    import keras

    sys.path.insert(0, HERE)
    from bench import conv_flops_per_image
    from bench import plain_reference_model

    from attunet_keras import att_unet
    from attunet_keras import distribute

    size, batch, layout = cell["size"], cell["batch"], cell["layout"]
    with distribute.precision_policy(cell["precision"]):
        keras.utils.set_random_seed(0)
        built = {"library": att_unet(size, size, 1, depth=cell["depth"],
                                     features=cell["features"], data_format=layout),
                 "plain": plain_reference_model(size, layout, depth=cell["depth"],
                                                features=cell["features"])}
        if built["library"].count_params() != built["plain"].count_params():
            raise AssertionError("the plain model is not the library's architecture")
        shape = (batch, 3, size, size) if layout == "channels_first" else (
            batch, size, size, 3)
        x = np.random.default_rng(0).random(shape, dtype="float32")
        y = ((x[:, :1] if layout == "channels_first" else x[..., :1]) > 0.5).astype("float32")
        for model in built.values():
            model.compile(keras.optimizers.Adam(1e-4), "binary_crossentropy")
        seconds = {name: {"train": [], "infer": []} for name in built}
        for repeat in range(cell["repeats"]):
            for name in (built if repeat % 2 == 0 else reversed(list(built))):
                model = built[name]
                seconds[name]["train"].append(
                    _timed(lambda: model.train_on_batch(x, y), cell["steps"]))
                seconds[name]["infer"].append(
                    _timed(lambda: model.predict_on_batch(x), cell["steps"]))
        flops = conv_flops_per_image(built["library"])
    result = {"conv_gflop_per_image_forward": flops / 1e9, "peak_memory_gb": peak_memory_gb()}
    for name in built:
        train, infer = min(seconds[name]["train"]), min(seconds[name]["infer"])
        result[name] = {"train_images_per_s": batch / train,
                        "infer_images_per_s": batch / infer,
                        "train_conv_tflops": 3 * flops * batch / train / 1e12,
                        "infer_conv_tflops": flops * batch / infer / 1e12}
    for kind in ("train", "infer"):
        result[f"library_vs_plain_{kind}"] = (result["library"][f"{kind}_images_per_s"]
                                              / result["plain"][f"{kind}_images_per_s"])
    return result


def cell_train_3d(cell):
    import keras

    from attunet_keras import att_unet_3d
    from attunet_keras import distribute

    size = cell["size"]
    _reset_peak()
    with distribute.precision_policy(cell["precision"]):
        keras.utils.set_random_seed(0)
        model = att_unet_3d(size, size, size, 1, depth=cell["depth"],
                            features=cell["features"], data_format="channels_last")
        model.compile(keras.optimizers.Adam(1e-4), "binary_crossentropy")
        x = np.random.default_rng(0).random((1, size, size, size, 1), dtype="float32")
        y = (x > 0.5).astype("float32")
        seconds = _timed(lambda: model.train_on_batch(x, y), cell["steps"])
    return {"train_volumes_per_s": 1 / seconds, "peak_memory_gb": peak_memory_gb(),
            "parameters": model.count_params()}


def cell_data_parallel(cell):
    import keras

    from attunet_keras import distribute
    from attunet_keras import losses
    from attunet_keras import models

    size = cell["size"]
    rng = np.random.default_rng(5)
    images = rng.random((4 * cell["steps"], size, size, 1), dtype="float32")
    targets = (images > 0.5).astype("float32")

    def trained(strategy_name):
        keras.utils.set_random_seed(0)
        strategy = distribute.get_strategy(strategy_name)
        with strategy.scope():
            model = models.att_unet(size, size, 1, depth=3, features=8, dropout=0.0,
                                    data_format="channels_last", in_channels=1)
            model.compile(optimizer=keras.optimizers.Adam(1e-3),
                          loss=losses.get("bce_dice", 1, data_format="channels_last"))
            model.fit(images, targets, batch_size=4, epochs=1, shuffle=False, verbose=0)
        return strategy.num_replicas_in_sync, model.get_weights()

    replicas, distributed = trained("data_parallel")
    _, single = trained("default")
    difference = max(float(np.max(np.abs(a - b))) for a, b in zip(distributed, single))
    if difference > 1e-4:
        raise AssertionError(f"DataParallel's weights differ by {difference:.2e}")
    return {"replicas": replicas, "max_weight_difference": difference}


def cell_sliding_window(cell):
    import keras

    from attunet_keras import distribute
    from attunet_keras import inference
    from attunet_keras import models

    volume, side, patch = cell.get("volume", False), cell["image"], cell["patch"]
    _reset_peak()
    with distribute.precision_policy(cell["precision"]):
        keras.utils.set_random_seed(0)
        if volume:
            model = models.att_unet_3d(None, None, None, 1, depth=cell["depth"],
                                       features=cell["features"],
                                       data_format="channels_last")
        else:
            model = models.att_unet(None, None, 1, depth=cell["depth"],
                                    features=cell["features"],
                                    data_format="channels_last", in_channels=1)
        image = np.random.default_rng(0).random((side,) * (3 if volume else 2),
                                                dtype="float32")
        start = time.perf_counter()
        probabilities = inference.predict_sliding_window(model, image, patch, batch_size=4)
        seconds = time.perf_counter() - start
    if probabilities.shape[:-1] != image.shape or not np.isfinite(probabilities).all():
        raise AssertionError(f"sliding windows gave {probabilities.shape} for {image.shape}")
    return {"seconds": seconds, "peak_memory_gb": peak_memory_gb(),
            "shape": list(image.shape), "patch": patch}


CELLS = {"ceilings": cell_ceilings, "train_infer": cell_train_infer,
         "train_3d": cell_train_3d, "data_parallel": cell_data_parallel,
         "sliding_window": cell_sliding_window}


def _backend_facts():
    """What only the backend itself can say: JAX's devices, PyTorch's CUDA and cuDNN."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return {"jax_devices": [str(device) for device in jax.devices()]}
    import torch

    available = torch.cuda.is_available()
    return {"cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if available else None,
            "torch_device": torch.cuda.get_device_name(0) if available else "cpu"}


def worker(cells_json, output):
    """Runs the cells in this process's backend, rewriting `output` after each."""
    signal.signal(signal.SIGALRM, _on_alarm)
    report = _read(output)
    report["machine"].update(_backend_facts())
    _write(output, report)
    for cell in json.loads(cells_json):
        start = time.perf_counter()
        signal.alarm(int(cell["cap"]))
        try:
            result = {"ok": True, **CELLS[cell["kind"]](cell)}
        except Exception as error:  # recorded: what cannot run here is a finding too
            lines = str(error).strip().splitlines()
            result = {"ok": False, "error": f"{type(error).__name__}: "
                                            f"{lines[-1][:300] if lines else ''}"}
        finally:
            signal.alarm(0)
        result.update(tensorflow_imported="tensorflow" in sys.modules, settings={k: v for k, v in cell.items() if k not in ("name", "kind")},
                      wall_s=time.perf_counter() - start)
        report = _read(output)
        report["cells"][cell["name"]] = result
        _write(output, report)
        print(f"{cell['name']}: {'ok' if result['ok'] else result['error']}", flush=True)


# --- the run, in the parent process (no backend imported) ------------------------------


def _read(path):
    with open(path) as file:
        return json.load(file)


def _write(path, report):
    staged = f"{path}.partial"
    with open(staged, "w") as file:
        json.dump(report, file, indent=2)
    os.replace(staged, path)


def _version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine():
    """The device, driver and library versions, read without importing a backend (each
    backend's process adds what it knows: `_backend_facts`)."""
    found = {"python": sys.version.split()[0], "cpu_cores": os.cpu_count()}
    for name in ("keras", "jax", "jaxlib", "jax-cuda12-plugin", "torch", "numpy"):
        found[name] = _version(name)
    try:
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        found["gpus"] = [line.strip() for line in query.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.TimeoutExpired):
        found["gpus"] = []
    return found


def table(report):
    """The short Markdown table printed last."""
    cells = report["cells"]
    ceilings = cells.get("ceilings", {})
    lines = ["| cell | library | plain Keras | library / plain | of the matmul ceiling |",
             "| --- | --- | --- | --- | --- |"]
    for name, cell in cells.items():
        if not cell.get("ok"):
            lines.append(f"| {name} | {cell.get('error', 'not run')[:70]} | | | |")
        elif "library" in cell:
            lib, plain = cell["library"], cell["plain"]
            dtype = COMPUTE_DTYPES[cell["settings"]["precision"]]
            ceiling = ceilings.get(f"matmul_{dtype}_tflops")  # none measured for float16
            share = (f"{lib['train_conv_tflops'] / ceiling:.0%} train"
                     if ceiling else "")
            lines.append(
                f"| {name} | train {lib['train_images_per_s']:.1f} img/s, infer "
                f"{lib['infer_images_per_s']:.1f} | train {plain['train_images_per_s']:.1f}, "
                f"infer {plain['infer_images_per_s']:.1f} | "
                f"{cell['library_vs_plain_train']:.2f}x / {cell['library_vs_plain_infer']:.2f}x "
                f"| {share} |")
        else:
            facts = ", ".join(f"{key} {value:.3g}" for key, value in cell.items()
                              if isinstance(value, float) and key != "wall_s")
            lines.append(f"| {name} | {facts} | | | |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="every step tiny, on whatever device (the suite's CPU run)")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "gpu_h200.json"))
    parser.add_argument("--only", nargs="+", metavar="CELL",
                        help="run only the cells whose names start with one of these")
    parser.add_argument("--budget", type=float, default=480,
                        help="seconds after which no further process starts (the GPU "
                             "machine's time is short); the cells left say so")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the cells of one process
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.output)

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    report = {"machine": machine(), "quick": args.quick, "cells": {}}
    _write(args.output, report)
    processes = plan(args.quick)
    if args.only:
        processes = [(backend, [cell for cell in cells
                                if any(cell["name"].startswith(p) for p in args.only)])
                     for backend, cells in processes]
        processes = [(backend, cells) for backend, cells in processes if cells]
    project = os.path.dirname(HERE)
    started = time.perf_counter()
    for backend, cells in processes:
        if time.perf_counter() - started > args.budget:
            failure = f"not run: the run's --budget of {args.budget:g} s was spent"
            report = _read(args.output)
            for cell in cells:
                report["cells"].setdefault(cell["name"], {"ok": False, "error": failure})
            _write(args.output, report)
            continue
        environment = dict(os.environ, KERAS_BACKEND=backend,
                           XLA_PYTHON_CLIENT_PREALLOCATE="false",
                           PYTHONPATH=os.pathsep.join(
                               filter(None, [os.environ.get("PYTHONPATH"), project])))
        # a hard stop beside each cell's own alarm: import and start-up, then the caps
        limit = 120 + sum(cell["cap"] for cell in cells)
        try:
            run = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cells),
                 "--output", args.output], env=environment, timeout=limit,
                capture_output=True, text=True)
            print(run.stdout, end="", flush=True)
            failure = f"the {backend} process exited with {run.returncode}: " \
                      f"{run.stderr.strip().splitlines()[-1:] or ''}"
        except subprocess.TimeoutExpired:
            failure = f"the {backend} process ran past {limit} s"
        report = _read(args.output)
        for cell in cells:  # a cell the process never reached says why
            report["cells"].setdefault(cell["name"], {"ok": False, "error": failure})
        _write(args.output, report)
    print()
    print(table(report))
    return 0 if all(cell.get("ok") for cell in report["cells"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
