"""Held-out nuclei Dice of att_unet on random-initialised backbones, at equal training time.

Trains the plain att_unet (the demo's settings: features 16, 128x128 tiles, batch 8,
Adam 2e-3, BCE + Dice) and att_unet on each backbone given (random weights: this
machine cannot download ImageNet's) for the same wall-clock budget on the nuclei
dataset, then scores the final weights on the held-out quarter. The budget includes
each model's graph tracing, a real cost of the bigger models. Writes JSON to --output.

    .venv/bin/python benchmarks/backbones_quality.py --seconds 180
"""

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0,
                        help="training budget of each model (default: 180)")
    parser.add_argument("--backbones", nargs="*", default=["mobilenetv2", "efficientnetb0"])
    parser.add_argument("--output", default="build/backbones/quality.json")
    args = parser.parse_args()

    import keras

    from attunet_keras import data
    from attunet_keras import evaluation
    from attunet_keras import training
    from machine import machine

    class Budget(keras.callbacks.Callback):
        def __init__(self, seconds):
            super().__init__()
            self.seconds, self.steps, self.start = seconds, 0, None

        def on_train_begin(self, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1
            if time.perf_counter() - self.start > self.seconds:
                self.model.stop_training = True

    rows = []
    for backbone in [None] + list(args.backbones):
        config = training.TrainConfig(dataset="nuclei", output=tempfile.mkdtemp(),
                                      backbone=backbone)
        dataset = training.load_data(config)
        keras.utils.clear_session()
        keras.utils.set_random_seed(config.seed)
        model = training.build_model(config, dataset)
        budget = Budget(args.seconds)
        model.fit(data.training_dataset(dataset, config.batch_size, seed=config.seed),
                  epochs=10_000, steps_per_epoch=20, callbacks=[budget], verbose=0)
        result = evaluation.evaluate_model(model, dataset, config)
        rows.append({"model": backbone or "att_unet", "parameters": model.count_params(),
                     "steps": budget.steps, "seconds": round(time.perf_counter() - budget.start, 1),
                     "held_out_dice": round(result["model"]["dice"], 4),
                     "otsu_dice": round(result["otsu"]["dice"], 4)})
        print(rows[-1], flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump({"machine": machine(), "budget_seconds": args.seconds, "rows": rows},
                  file, indent=2)


if __name__ == "__main__":
    main()
