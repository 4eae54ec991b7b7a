"""Held-out segmentation quality on the built-in datasets, with CPU training time.

Trains the demo settings on `nuclei` and `brain` (30 epochs of 20 batches of 8,
att_unet depth 4, 16 base features, channels_last), and on `brain3d` the same
template as a volume (att_unet_3d, depth 4, 16 features, 25 epochs of 20 batches of
2 patches of 16 slices: about 1.6 s a step on 2 cores), then prints
and writes JSON with the held-out Dice and IoU of the best checkpoint next to an Otsu
baseline on the same held-out pixels, the training time and the machine.

Both go through the streaming pipeline (`data.training_dataset`: random patches, a
third centred on foreground); the scores are those of the whole held-out images.

`brainmsd` is the same template as a Decathlon folder (tests/medical_cases.py): six
two-channel cases (T1 and a contrast-reversed second channel) at mixed spacings of
1.75 to 2.5 mm, one with a rotated affine, two held out; the run plans nnU-Net's
target spacing and z-scores, trains att_unet_3d on the resampled cases and scores
each held-out case on its own grid (`train` on the folder as it is on disk).

Targets (from the project's issues): nuclei held-out Dice >= 0.94 and >= Otsu + 0.05;
brain mean grey/white-matter Dice >= 0.93, each within about 10 minutes of CPU
training on 2 cores; brain3d >= 0.93 within 15 minutes. `brain` and `brain3d` hold
out the same slices.

    .venv/bin/python benchmarks/quality.py [--output build/quality] [--datasets nuclei brain brain3d]
"""

import argparse
import json
import os
import shutil
import sys
import time

from machine import machine

TARGETS = {"nuclei": 0.94, "brain": 0.93, "brain3d": 0.93,
           "brainmsd": None}  # no target in the issues: reported next to brain3d
MINUTES = {"nuclei": 10, "brain": 10, "brain3d": 15, "brainmsd": 15}
SETTINGS = {
    "nuclei": dict(epochs=30, steps_per_epoch=20, batch_size=8),
    "brain": dict(epochs=30, steps_per_epoch=20, batch_size=8),
    "brain3d": dict(epochs=25, steps_per_epoch=20, batch_size=2),
    "brainmsd": dict(epochs=25, steps_per_epoch=20, batch_size=2, depth=3, tile=32,
                     val_fraction=0.34),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="build/quality")
    parser.add_argument("--datasets", nargs="+", choices=sorted(TARGETS),
                        default=["nuclei", "brain"])
    parser.add_argument("--epochs", type=int, default=None,
                        help="override every dataset's epochs")
    args = parser.parse_args(argv)

    from attunet_keras import training

    report = {"machine": machine(), "runs": {}}
    for name in args.datasets:
        run_dir = os.path.join(args.output, name)
        shutil.rmtree(run_dir, ignore_errors=True)
        settings = dict(SETTINGS[name])
        if args.epochs:
            settings["epochs"] = args.epochs
        dataset = name
        if name == "brainmsd":
            sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                            "..", "tests"))
            import medical_cases

            dataset = os.path.join(args.output, "brainmsd_data")
            shutil.rmtree(dataset, ignore_errors=True)
            medical_cases.decathlon_brain(dataset, scale=0.5)
        config = training.TrainConfig(dataset=dataset, output=run_dir, **settings)
        start = time.perf_counter()
        result = training.train(config, verbose=2)
        seconds = time.perf_counter() - start
        dice, otsu = result["model"]["dice"], result["otsu"]["dice"]
        report["runs"][name] = dict(result, train_seconds=round(seconds, 1),
                                    settings=settings, target_dice=TARGETS[name],
                                    target_minutes=MINUTES[name],
                                    meets_target=(TARGETS[name] is None
                                                  or dice >= TARGETS[name]) and (
                                        name != "nuclei" or dice >= otsu + 0.05)
                                    and seconds <= 60 * MINUTES[name])
        print(f"{name}: held-out Dice {dice:.4f} (Otsu {otsu:.4f}), "
              f"{seconds / 60:.1f} min", flush=True)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "quality.json"), "w") as file:
        json.dump(report, file, indent=2)
    print(json.dumps(report, indent=2))
    return 0 if all(run["meets_target"] for run in report["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
