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
"""

import argparse
import json
import os
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
    args = parser.parse_args(argv)

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


def _size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


if __name__ == "__main__":
    raise SystemExit(main())
