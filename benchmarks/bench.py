"""Training and inference throughput of att_unet against the device's matmul ceiling.

For each image size, layout and precision asked for, in one process and on one device:

- the library model `att_unet(size, size, 1, data_format=...)` (the reference
  architecture, 7,977,941 parameters) and a plain Keras functional model of the same
  layers written inline below (no attunet_keras code), timed alternately, each
  `--repeats` times, for training steps (`train_on_batch`) and inference
  (`predict_on_batch`); the best repeat of each is kept;
- the achieved convolution GFLOP/s: FLOPs counted from the model's conv layers
  (2 * output pixels * kernel area * in channels * out channels per image for a
  forward pass; a training step counts 3x: forward, input gradient, weight gradient);
- the dense matmul GFLOP/s of an N x N `tf.matmul` in the same dtype, measured in the
  same run on the same device: the ceiling the convolutions are compared with.

Writes JSON (`--output`) and prints a Markdown table.

    .venv/bin/python benchmarks/bench.py --sizes 160 --layouts channels_last channels_first \
        --precisions float32 mixed_bfloat16 --batch 4 --output build/bench.json

`--backends tensorflow jax torch` measures under each Keras backend, each in its own
process (a process has one backend) started by this one, and prints one table of
training and inference images/s per backend (the matmul ceiling is TensorFlow's, so it
is given under TensorFlow only). TensorFlow runs its steps without XLA (slower on
CPUs); JAX's are jit-compiled (Keras's `"auto"`; JAX without jit is eager); PyTorch's
are eager (Keras's `"auto"`).

    .venv/bin/python benchmarks/bench.py --backends tensorflow jax torch --sizes 160 256 \
        --layouts channels_last --output build/bench_backends.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from machine import machine

COMPUTE_DTYPES = {"float32": "float32", "mixed_float16": "float16",
                  "mixed_bfloat16": "bfloat16"}


def plain_reference_model(size, data_format, n_label=1, in_channels=3, depth=4,
                          features=32):
    """The reference Attention U-Net written with plain Keras layers, for comparison."""
    import keras
    from keras import layers

    channel_axis = 1 if data_format == "channels_first" else -1
    shape = (in_channels, size, size) if data_format == "channels_first" else (
        size, size, in_channels)
    inputs = keras.Input(shape)
    x = inputs
    skips = []
    for _ in range(depth):
        x = layers.Conv2D(features, 3, activation="relu", padding="same",
                          data_format=data_format)(x)
        x = layers.Dropout(0.2)(x)
        x = layers.Conv2D(features, 3, activation="relu", padding="same",
                          data_format=data_format)(x)
        skips.append(x)
        x = layers.MaxPooling2D(2, data_format=data_format)(x)
        features *= 2
    x = layers.Conv2D(features, 3, activation="relu", padding="same",
                      data_format=data_format)(x)
    x = layers.Dropout(0.2)(x)
    x = layers.Conv2D(features, 3, activation="relu", padding="same",
                      data_format=data_format)(x)
    for skip in reversed(skips):
        features //= 2
        inter = x.shape[channel_axis] // 4
        up = layers.UpSampling2D(2, data_format=data_format)(x)
        theta = layers.Conv2D(inter, 1, data_format=data_format)(skip)
        phi = layers.Conv2D(inter, 1, data_format=data_format)(up)
        f = layers.Activation("relu")(layers.add([theta, phi]))
        rate = layers.Activation("sigmoid")(layers.Conv2D(1, 1, data_format=data_format)(f))
        gated = layers.multiply([skip, rate])
        x = layers.Concatenate(axis=channel_axis)([up, gated])
        x = layers.Conv2D(features, 3, activation="relu", padding="same",
                          data_format=data_format)(x)
        x = layers.Dropout(0.2)(x)
        x = layers.Conv2D(features, 3, activation="relu", padding="same",
                          data_format=data_format)(x)
    x = layers.Conv2D(n_label, 1, padding="same", data_format=data_format)(x)
    outputs = layers.Activation("sigmoid", dtype="float32")(x)
    return keras.Model(inputs, outputs)


def conv_flops_per_image(model):
    """Forward FLOPs of every Conv2D / Conv2DTranspose for one image."""
    import keras

    total = 0
    for layer in model.layers:
        transpose = isinstance(layer, keras.layers.Conv2DTranspose)
        if not (transpose or isinstance(layer, keras.layers.Conv2D)):
            continue
        channels_first = layer.data_format == "channels_first"
        c_in = layer.input.shape[1 if channels_first else -1]
        c_out = layer.output.shape[1 if channels_first else -1]
        # a convolution does its multiply-adds per output pixel, a transposed one per
        # input pixel
        source = layer.input.shape if transpose else layer.output.shape
        pixels = int(np.prod(source[2:] if channels_first else source[1:-1]))
        total += 2 * pixels * int(np.prod(layer.kernel_size)) * c_in * c_out
    return total


def matmul_gflops(dtype, n, repeats):
    """Best GFLOP/s of an n x n matmul in `dtype` on the default device."""
    import tensorflow as tf

    a = tf.random.normal((n, n), dtype="float32")
    a = tf.cast(a, dtype)
    b = tf.cast(tf.random.normal((n, n), dtype="float32"), dtype)

    @tf.function
    def product(a, b):
        return tf.matmul(a, b)

    product(a, b).numpy()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def time_steps(function, steps):
    start = time.perf_counter()
    for _ in range(steps):
        function()
    return (time.perf_counter() - start) / steps


def bench_case(size, data_format, precision, batch, steps, repeats):
    import keras

    from attunet_keras import att_unet
    from attunet_keras import distribute

    results = {}
    with distribute.precision_policy(precision):
        keras.utils.set_random_seed(0)
        built = {"library": att_unet(size, size, 1, data_format=data_format),
                 "plain": plain_reference_model(size, data_format)}
        assert built["library"].count_params() == built["plain"].count_params()
        shape = (batch, 3, size, size) if data_format == "channels_first" else (
            batch, size, size, 3)
        x = np.random.default_rng(0).random(shape, dtype="float32")
        y = (x[:, :1] if data_format == "channels_first" else x[..., :1]) > 0.5
        y = y.astype("float32")
        jit_compile = False if keras.backend.backend() == "tensorflow" else "auto"
        for model in built.values():
            model.compile(keras.optimizers.Adam(1e-4), "binary_crossentropy",
                          jit_compile=jit_compile)
            model.train_on_batch(x, y)      # trace and warm up
            model.predict_on_batch(x)
        timings = {name: {"train": [], "infer": []} for name in built}
        for repeat in range(repeats):
            order = list(built) if repeat % 2 == 0 else list(reversed(built))
            for name in order:
                model = built[name]
                timings[name]["train"].append(
                    time_steps(lambda: model.train_on_batch(x, y), steps))
                timings[name]["infer"].append(
                    time_steps(lambda: model.predict_on_batch(x), steps))
        flops = conv_flops_per_image(built["library"])
        for name in built:
            train_s = min(timings[name]["train"])
            infer_s = min(timings[name]["infer"])
            results[name] = {
                "train_images_per_s": batch / train_s,
                "infer_images_per_s": batch / infer_s,
                "train_conv_gflops": 3 * flops * batch / train_s / 1e9,
                "infer_conv_gflops": flops * batch / infer_s / 1e9,
            }
    results["conv_gflop_per_image_forward"] = flops / 1e9
    results["library_vs_plain_train"] = (results["library"]["train_images_per_s"]
                                         / results["plain"]["train_images_per_s"])
    results["library_vs_plain_infer"] = (results["library"]["infer_images_per_s"]
                                         / results["plain"]["infer_images_per_s"])
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[160])
    parser.add_argument("--layouts", nargs="+", default=["channels_last", "channels_first"],
                        choices=["channels_last", "channels_first"])
    parser.add_argument("--precisions", nargs="+", default=["float32"],
                        choices=sorted(COMPUTE_DTYPES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="steps per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--output", default="build/bench.json")
    parser.add_argument("--backends", nargs="+", choices=["tensorflow", "jax", "torch"],
                        help="run the cases under each Keras backend, one process each, "
                             "and print a table per backend")
    args = parser.parse_args(argv)
    if args.backends:
        return compare_backends(args, argv if argv is not None else sys.argv[1:])

    import keras

    backend = keras.backend.backend()
    report = {"machine": machine(), "backend": backend, "batch": args.batch,
              "steps": args.steps, "repeats": args.repeats, "ceiling": {}, "cases": []}
    for precision in args.precisions:
        if backend != "tensorflow":
            report["ceiling"][COMPUTE_DTYPES[precision]] = None
            continue
        dtype = COMPUTE_DTYPES[precision]
        report["ceiling"][dtype] = matmul_gflops(dtype, args.matmul_size, args.repeats)
        print(f"matmul {args.matmul_size}^2 {dtype}: "
              f"{report['ceiling'][dtype]:.1f} GFLOP/s", flush=True)
    for size in args.sizes:
        for layout in args.layouts:
            for precision in args.precisions:
                try:
                    case = bench_case(size, layout, precision, args.batch, args.steps,
                                      args.repeats)
                except Exception as error:  # record what cannot run on this device
                    message = str(error).strip().splitlines()
                    report["cases"].append(dict(size=size, layout=layout,
                                                precision=precision,
                                                error=f"{type(error).__name__}: "
                                                      f"{message[-1] if message else ''}"))
                    print(json.dumps(report["cases"][-1]), flush=True)
                    continue
                ceiling = report["ceiling"][COMPUTE_DTYPES[precision]] or float("nan")
                case.update(size=size, layout=layout, precision=precision,
                            train_vs_ceiling=case["library"]["train_conv_gflops"] / ceiling,
                            infer_vs_ceiling=case["library"]["infer_conv_gflops"] / ceiling)
                report["cases"].append(case)
                print(json.dumps(case), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(report, file, indent=2)
    print()
    print("| size | layout | precision | train img/s (library / plain) | infer img/s "
          "(library / plain) | train conv GFLOP/s (x ceiling) | infer conv GFLOP/s "
          "(x ceiling) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for case in report["cases"]:
        if "error" in case:
            print(f"| {case['size']} | {case['layout']} | {case['precision']} | "
                  f"fails: {case['error'][:80]} | | | |")
            continue
        lib, plain = case["library"], case["plain"]
        print(f"| {case['size']} | {case['layout']} | {case['precision']} | "
              f"{lib['train_images_per_s']:.2f} / {plain['train_images_per_s']:.2f} "
              f"({case['library_vs_plain_train']:.2f}x) | "
              f"{lib['infer_images_per_s']:.2f} / {plain['infer_images_per_s']:.2f} "
              f"({case['library_vs_plain_infer']:.2f}x) | "
              f"{lib['train_conv_gflops']:.1f} ({case['train_vs_ceiling']:.2f}) | "
              f"{lib['infer_conv_gflops']:.1f} ({case['infer_vs_ceiling']:.2f}) |")
    return 0


def _without_option(argv, option):
    """argv less `option` and the values that follow it."""
    kept, skipping = [], False
    for item in argv:
        if item == option or item.startswith(option + "="):
            skipping = item == option
            continue
        if skipping and not item.startswith("--"):
            continue
        skipping = False
        kept.append(item)
    return kept


def compare_backends(args, argv):
    """Runs this script once per backend (KERAS_BACKEND set) and tabulates images/s."""
    base = _without_option(_without_option(argv, "--backends"), "--output")
    reports = {}
    with tempfile.TemporaryDirectory() as folder:
        for backend in args.backends:
            output = os.path.join(folder, f"{backend}.json")
            environment = dict(os.environ, KERAS_BACKEND=backend)
            environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            print(f"--- {backend}", flush=True)
            subprocess.run([sys.executable, os.path.abspath(__file__), *base,
                            "--output", output], env=environment, check=True)
            with open(output) as file:
                reports[backend] = json.load(file)
    combined = {"machine": reports[args.backends[0]]["machine"], "batch": args.batch,
                "steps": args.steps, "repeats": args.repeats, "backends": reports}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(combined, file, indent=2)
    print()
    print("| backend | size | layout | precision | train img/s | infer img/s | "
          "train / plain Keras | infer / plain Keras |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for backend, report in reports.items():
        for case in report["cases"]:
            if "error" in case:
                print(f"| {backend} | {case['size']} | {case['layout']} | "
                      f"{case['precision']} | fails: {case['error'][:60]} | | | |")
                continue
            lib = case["library"]
            print(f"| {backend} | {case['size']} | {case['layout']} | {case['precision']} | "
                  f"{lib['train_images_per_s']:.2f} | {lib['infer_images_per_s']:.2f} | "
                  f"{case['library_vs_plain_train']:.2f}x | "
                  f"{case['library_vs_plain_infer']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
