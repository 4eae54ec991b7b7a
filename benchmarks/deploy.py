"""CPU inference of a trained run through every deployment path, with held-out Dice.

Exports the run's best model to a SavedModel (TF Serving layout), ONNX, LiteRT float32
and LiteRT int8 (calibrated on 64 training tiles), then on the same held-out tiles of
the run's dataset measures, in one process:

- Dice against the annotation (threshold 0.5), for every path;
- images per second: Keras `predict_on_batch` (float32), the reloaded SavedModel's
  `probabilities` signature, ONNX Runtime, and the LiteRT interpreter (float32, int8);
  Keras, SavedModel and ONNX Runtime get batches of `--batch`, LiteRT one image at a
  time (its models have a static batch of 1). The best of `--repeats` timings is kept.

Writes JSON and prints a Markdown table.

    .venv/bin/python benchmarks/deploy.py --run build/demo/nuclei --output build/deploy.json

`--end-to-end` measures instead what a client holding raw files gets: on the nuclei
image (512x512, uint16 TIFF, as the stardist wheel ships it) and a synthetic
4096x4096 uint16 TIFF, `attunet-keras predict FILE --run RUN --patch PATCH` (in
process, `cli.main`: reading, normalising, sliding windows above the patch, writing
the mask PNG) against the SavedModel's `segment_uint16` signature (reading the TIFF,
the signature, writing its mask PNG). Each path runs in its own process, so that
its peak resident memory (`ru_maxrss`) is its own; a process first traces on the
512x512 image, then times it `--repeats` times (the best is kept), then the 4096x4096
image once.

    .venv/bin/python benchmarks/deploy.py --run build/demo/nuclei --end-to-end \
        --output build/deploy_end_to_end.json
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from machine import machine


def dice(probabilities, masks):
    predicted = probabilities[..., 0] > 0.5
    truth = masks > 0
    return float(2 * np.sum(predicted & truth) / (np.sum(predicted) + np.sum(truth)))


def best_rate(function, images, repeats):
    function()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a training run folder (binary task)")
    parser.add_argument("--images", type=int, default=32,
                        help="held-out tiles timed, repeated as needed (default: 32)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="build/deploy.json")
    parser.add_argument("--end-to-end", action="store_true",
                        help="raw files in, masks out: segment against predict")
    parser.add_argument("--patch", type=int, default=None,
                        help="--end-to-end: the sliding-window patch (default: the run's)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(*args.child, repeats=args.repeats)
    if args.end_to_end:
        return end_to_end(args)

    import onnxruntime
    import tensorflow as tf

    from attunet_keras import data
    from attunet_keras import export
    from attunet_keras import training

    config = training.read_config(args.run)
    if config.data_format != "channels_last":
        raise SystemExit("deploy.py reads channels_last runs (the train default).")
    dataset = training.load_data(config)
    if dataset.n_label != 1:
        raise SystemExit("deploy.py scores binary runs (e.g. nuclei).")
    model = training.load_run_model(args.run)
    tiles = [(images.numpy(), targets.numpy()) for images, targets in
             data.validation_dataset(dataset, 8)]
    held_out = np.concatenate([images for images, _ in tiles])
    masks = (np.concatenate([targets for _, targets in tiles])[..., 0] > 0.5).astype("uint8")
    timed = np.concatenate([held_out] * (-(-args.images // len(held_out))))[:args.images]
    representative = next(iter(data.training_dataset(dataset, 64, seed=0)))[0].numpy()

    folder = tempfile.mkdtemp(prefix="attunet_deploy_")
    paths = {"savedmodel": os.path.join(folder, "savedmodel"),
             "onnx": os.path.join(folder, "model.onnx"),
             "litert": os.path.join(folder, "model.tflite"),
             "litert_int8": os.path.join(folder, "model_int8.tflite")}
    export.export_serving(model, paths["savedmodel"], sample=held_out[:2])
    export.export_onnx(model, paths["onnx"], sample=held_out[:2])
    export.export_litert(model, paths["litert"], sample=held_out[:2])
    export.export_litert(model, paths["litert_int8"], quantize="int8",
                         representative=representative)

    serving = tf.saved_model.load(os.path.join(paths["savedmodel"], "1"))
    signature = serving.signatures["probabilities"]
    session = onnxruntime.InferenceSession(paths["onnx"], providers=["CPUExecutionProvider"])
    onnx_input = session.get_inputs()[0].name
    interpreters = {name: export.litert_interpreter(paths[name], threads=os.cpu_count())
                    for name in ("litert", "litert_int8")}

    def batched(function, images):
        return np.concatenate([function(images[i:i + args.batch])
                               for i in range(0, len(images), args.batch)])

    runners = {
        "keras_float32": lambda images: batched(
            lambda x: np.asarray(model.predict_on_batch(x)), images),
        "savedmodel": lambda images: batched(
            lambda x: signature(images=tf.constant(x))["probabilities"].numpy(), images),
        "onnxruntime": lambda images: batched(
            lambda x: session.run(None, {onnx_input: x})[0], images),
        "litert_float32": lambda images: export.litert_predict(
            interpreters["litert"], images),
        "litert_int8": lambda images: export.litert_predict(
            interpreters["litert_int8"], images),
    }
    report = {"machine": machine(), "run": os.path.abspath(args.run),
              "held_out_tiles": len(held_out), "timed_images": len(timed),
              "batch": args.batch, "file_bytes": {name: _size(path)
                                                  for name, path in paths.items()},
              "paths": {}}
    for name, run in runners.items():
        report["paths"][name] = {
            "dice": dice(run(held_out), masks),
            "images_per_s": best_rate(lambda run=run: run(timed), timed, args.repeats),
        }
        print(name, report["paths"][name], flush=True)
    keras_rate = report["paths"]["keras_float32"]["images_per_s"]
    keras_dice = report["paths"]["keras_float32"]["dice"]
    for result in report["paths"].values():
        result["speedup_vs_keras"] = result["images_per_s"] / keras_rate
        result["dice_change"] = result["dice"] - keras_dice
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(report, file, indent=2)
    print()
    print("| path | held-out Dice | Dice change | images/s | vs Keras float32 |")
    print("| --- | --- | --- | --- | --- |")
    for name, result in report["paths"].items():
        print(f"| {name} | {result['dice']:.4f} | {result['dice_change']:+.4f} | "
              f"{result['images_per_s']:.1f} | {result['speedup_vs_keras']:.2f}x |")
    return 0


def _rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def _child(path, run, target, files, repeats):
    """One path (`predict` or `segment`) on each of `files` (comma-separated): prints
    JSON with the seconds per image and the peak resident memory after each."""
    import tifffile
    from PIL import Image

    files = files.split(",")
    patch = json.loads(target)["patch"]
    output = tempfile.mkdtemp(prefix="attunet_e2e_")
    if path == "predict":
        from attunet_keras import cli

        def once(file):
            assert cli.main(["predict", file, "--run", run, "--output", output,
                             "--patch", str(patch), "--overwrite"]) == 0
    else:
        import tensorflow as tf

        signature = tf.saved_model.load(json.loads(target)["saved"]).signatures[
            "segment_uint16"]

        def once(file):
            pixels = tifffile.imread(file)
            mask = signature(images=tf.constant(pixels[None, ..., None]))["mask"]
            Image.fromarray(mask.numpy()[0, ..., 0] * 255).save(
                os.path.join(output, os.path.basename(file) + "_mask.png"))
    report = {"loaded_rss_gb": _rss_gb(), "images": {}}  # imports (and SavedModel) only
    for index, file in enumerate(files):
        times = []
        for _ in range(repeats + 1 if index == 0 else 1):  # the first traces
            start = time.perf_counter()
            once(file)
            times.append(time.perf_counter() - start)
        best = min(times[1:] or times)
        report["images"][os.path.basename(file)] = {
            "seconds": best, "megapixels_per_s": _megapixels(file) / best,
            "peak_rss_gb": _rss_gb()}
    print("RESULT " + json.dumps(report), flush=True)
    return 0


def _megapixels(file):
    import tifffile

    with tifffile.TiffFile(file) as tiff:
        return float(np.prod(tiff.pages[0].shape[:2])) / 1e6


def end_to_end(args):
    import tifffile

    from attunet_keras import cli
    from attunet_keras import data
    from attunet_keras import training

    config = training.read_config(args.run)
    patch = args.patch or config.tile or data.DEFAULT_TILE[2]
    folder = tempfile.mkdtemp(prefix="attunet_deploy_e2e_")
    nuclei = data.package_file("stardist", os.path.join("data", "images", "img2d.tif"))
    big = os.path.join(folder, "synthetic_4096.tif")
    # blobs on a ramp, uint16: a large raw image in the range of the nuclei
    rng = np.random.default_rng(0)
    small = rng.random((64, 64))
    field = np.kron(small, np.ones((64, 64)))
    tifffile.imwrite(big, (field * 200 + np.linspace(0, 35, 4096)[None]).astype("uint16"))
    saved = os.path.join(folder, "saved")
    assert cli.main(["export", "--run", args.run, "--output", saved,
                     "--patch", str(patch)]) == 0
    target = json.dumps({"patch": patch, "saved": os.path.join(saved, "1")})
    report = {"machine": machine(), "run": os.path.abspath(args.run), "patch": patch,
              "repeats": args.repeats, "paths": {}}
    for path in ("predict", "segment"):
        child = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--run", args.run, "--repeats",
             str(args.repeats), "--child", path, args.run, target, f"{nuclei},{big}"],
            capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode != 0 or not lines:
            raise SystemExit(f"{path} failed:\n{child.stdout[-2000:]}{child.stderr[-3000:]}")
        report["paths"][path] = json.loads(lines[-1][len("RESULT "):])
        print(path, report["paths"][path], flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(report, file, indent=2)
    print()
    print("| image | path | seconds | megapixels/s | peak memory (GB) | before the first image (GB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in ("img2d.tif", "synthetic_4096.tif"):
        for path, result in report["paths"].items():
            row = result["images"][name]
            print(f"| {name} | {path} | {row['seconds']:.2f} | {row['megapixels_per_s']:.3f} | "
                  f"{row['peak_rss_gb']:.2f} | {result['loaded_rss_gb']:.2f} |")
    return 0


def _size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


if __name__ == "__main__":
    raise SystemExit(main())
