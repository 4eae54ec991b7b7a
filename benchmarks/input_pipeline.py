"""Memory and speed of the streaming input pipeline on folders of 512x512 PNG pairs.

Writes a synthetic folder of N pairs (grey discs on noise, binary masks) into a
temporary folder and reports, for each N:

- the peak resident memory (`ru_maxrss` of the process) of a 5-step
  `attunet-keras train --dataset DIR --n-label 1` run with the command line's
  defaults (batch 8 of 128x128 patches, att_unet depth 4, features 16, 20% of the
  files held out, `--val-batches 50`);
- the seconds from starting the command to the end of its first training step (the
  first backup, `--backup-every 1`): Python and TensorFlow start-up, indexing the
  files, the first batches and tracing the step;
- the seconds of the epoch: from that first step to its row in `log.csv`, so the
  rest of the 5 steps and the per-epoch validation (at most 50 batches of held-out
  patches, drawn once; every held-out image used to be validated whole, each epoch);
  the run's final evaluation of every held-out image comes after and is in `run_s`;
- the pipeline alone (`data.training_dataset`, the same settings, in this process):
  patches/s and files/s, next to the model's training throughput (patches/s of
  `fit` steps on one batch held in memory, after two warm-up steps).

Targets on the 2-core CPU (from the project's issue): peak < 3 GB at 2,000 images
and within 1.3x of the 200-image run; first step < 60 s; pipeline >= 3x the model; an
epoch at 2,000 images within 1.3x of one at 200.

    .venv/bin/python benchmarks/input_pipeline.py --sizes 200 2000 --output build/input_pipeline.json
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from machine import machine

SIZE = 512


def write_folder(root, count, seed=0):
    """`count` pairs of 512x512 8-bit PNGs: 3 to 12 bright discs on noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for sub in ("images", "masks"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for index in range(count):
        mask = np.zeros((SIZE, SIZE), "uint8")
        for _ in range(rng.integers(3, 13)):
            y, x, radius = rng.integers(0, SIZE, 2).tolist() + [int(rng.integers(10, 40))]
            mask[(yy - y) ** 2 + (xx - x) ** 2 < radius ** 2] = 1
        image = rng.normal(60, 20, (SIZE, SIZE)) + 100 * mask
        Image.fromarray(np.clip(image, 0, 255).astype("uint8")).save(
            os.path.join(root, "images", f"img{index:05d}.png"))
        Image.fromarray(mask * 255).save(os.path.join(root, "masks", f"img{index:05d}.png"))


def measure_train(folder, output):
    """Peak memory (MB) and seconds to the first step of a 5-step train command, in
    a child process that reports its child's `ru_maxrss`."""
    script = os.path.join(os.path.dirname(sys.executable), "attunet-keras")
    command = [script, "train", "--dataset", folder, "--n-label", "1", "--output", output,
               "--epochs", "1", "--steps-per-epoch", "5", "--backup-every", "1",
               "--verbose", "0"]
    wrapper = ("import resource, subprocess, sys; "
               "code = subprocess.run(sys.argv[1:]).returncode; "
               "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
               "sys.exit(code)")
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", wrapper, *command],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environment)
    first_step = epoch_end = None
    backup = os.path.join(output, "backup")
    log = os.path.join(output, "log.csv")
    while process.poll() is None:
        if first_step is None and os.path.isdir(backup):
            first_step = time.perf_counter() - start
        if epoch_end is None and os.path.isfile(log) and len(open(log).readlines()) > 1:
            epoch_end = time.perf_counter() - start
        time.sleep(0.05)
    out, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"train failed:\n{out[-2000:]}\n{err[-3000:]}")
    peak_kb = int(next(line for line in out.splitlines() if line.startswith("PEAK")).split()[1])
    return {"peak_mb": round(peak_kb / 1024), "first_step_s": round(first_step, 1),
            "epoch_s": round(epoch_end - first_step, 1),
            "run_s": round(time.perf_counter() - start, 1)}


def measure_pipeline(folder, batches=40, batch_size=8):
    """Patches/s and files/s of the training pipeline alone, after 5 warm-up batches."""
    from attunet_keras import data

    dataset = data.folder(folder, 1, tile=128, val_fraction=0.01)
    iterator = iter(data.training_dataset(dataset, batch_size, seed=0))
    for _ in range(5):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    patches = batches * batch_size
    files = patches / dataset.patch_count(dataset.train[0])
    return {"pipeline_patches_per_s": round(patches / seconds, 1),
            "pipeline_files_per_s": round(files / seconds, 1)}


def measure_model(steps=10, batch_size=8):
    """Training patches/s of the default model on one batch held in memory."""
    import numpy as np
    import tensorflow as tf

    from attunet_keras import data
    from attunet_keras import training

    config = training.TrainConfig()
    rng = np.random.default_rng(0)
    images = rng.random((2, 128, 128, 1), dtype="float32")
    masks = (images[..., 0] > 0.5).astype("uint8")
    dataset = data.from_arrays("random", images[:1], masks[:1], images[1:], masks[1:], 1)
    model = training.build_model(config, dataset)
    batch = (tf.constant(np.repeat(images[:1], batch_size, axis=0)),
             tf.constant(np.repeat(masks[:1, ..., None], batch_size, axis=0), tf.float32))
    batches = tf.data.Dataset.from_tensors(batch).repeat()
    model.fit(batches, steps_per_epoch=2, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0)
    return {"model_train_patches_per_s": round(steps * batch_size
                                               / (time.perf_counter() - start), 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--output", default="build/input_pipeline.json")
    parser.add_argument("--workdir", default=None,
                        help="where the folders are written (default: a temporary folder)")
    args = parser.parse_args(argv)

    workdir = args.workdir or tempfile.mkdtemp(prefix="attunet_pipeline_")
    report = {"machine": machine(), "runs": {}}
    try:
        report.update(measure_model())
        for count in sorted(args.sizes):
            folder = os.path.join(workdir, f"pngs_{count}")
            if not os.path.isdir(folder):
                start = time.perf_counter()
                write_folder(folder, count)
                print(f"wrote {count} pairs in {time.perf_counter() - start:.0f} s",
                      flush=True)
            run = {"disk_mb": round(sum(
                os.path.getsize(os.path.join(root, name))
                for root, _, names in os.walk(folder) for name in names) / 2**20)}
            run.update(measure_train(folder, os.path.join(workdir, f"run_{count}")))
            shutil.rmtree(os.path.join(workdir, f"run_{count}"), ignore_errors=True)
            run.update(measure_pipeline(folder))
            run["pipeline_over_model"] = round(
                run["pipeline_patches_per_s"] / report["model_train_patches_per_s"], 1)
            report["runs"][str(count)] = run
            print(json.dumps({count: run}), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    sizes = sorted(report["runs"], key=int)
    if len(sizes) > 1:
        report["peak_ratio_largest_over_smallest"] = round(
            report["runs"][sizes[-1]]["peak_mb"] / report["runs"][sizes[0]]["peak_mb"], 2)
        report["epoch_ratio_largest_over_smallest"] = round(
            report["runs"][sizes[-1]]["epoch_s"] / report["runs"][sizes[0]]["epoch_s"], 2)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(report, file, indent=2)
    print(f"\n| images | on disk | peak memory | first step | epoch | pipeline | model (train) |")
    print("|---|---|---|---|---|---|---|")
    for count in sizes:
        run = report["runs"][count]
        print(f"| {int(count):,} | {run['disk_mb']} MB | {run['peak_mb'] / 1024:.2f} GB | "
              f"{run['first_step_s']} s | {run['epoch_s']} s | "
              f"{run['pipeline_patches_per_s']} patches/s "
              f"({run['pipeline_files_per_s']} files/s) | "
              f"{report['model_train_patches_per_s']} patches/s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
