"""What a run does at the end of every epoch, the same under `fit` and the multi-worker
loop: one `keras.callbacks.Callback`, `RunRecorder`.

- **Validation** (`validation_scores`): the run's loss, Dice and IoU (and per class) of
  the main output on the run's fixed held-out batches (`training.validation_data`:
  drawn once with the seed, so every epoch's `val_dice` compares).
- **The log**: one row per epoch in `log.csv`: `epoch`, `loss` (the mean training loss
  of the epoch), the model's compiled metrics on the training batches (`dice`, `iou`,
  ...: `model.get_metrics_result()`), then `val_loss`, `val_dice`, `val_iou`, ... The
  columns are the same under both loops.
- **The best checkpoint**: `best.keras` is written when the monitored Dice is strictly
  above the best so far (the first of equal scores is kept).
- **Backups**: every `backup_every` steps and at every epoch's end, after its log row
  and checkpoint (`run_folder.save_backup`).
- **The NaN stop**: a non-finite loss stops training at once; nothing of that epoch is
  validated, logged, checkpointed or backed up (`nan_epoch` says which epoch).
"""

import csv
import math
import os

import keras
import numpy as np

from attunet_keras import metrics as metrics_lib
from attunet_keras import run_folder
from attunet_keras import runs

MONITOR = "val_dice"


def monitor_name(model):
    """The logged name of the held-out Dice of the model's main output."""
    return f"val_{metric_prefix(model)}dice"


def metric_prefix(model):
    """`""`, or `"{main output}_"` for a model with several outputs (deep supervision),
    as Keras names the metrics of one output of several."""
    return "" if len(model.outputs) == 1 else f"{model.output_names[0]}_"


def validation_scores(model, val_data, losses, weights, n_label, class_names,
                      data_format):
    """`{"val_loss", "val_dice", "val_iou", ...}` of `model` on the batches `val_data`.

    `losses(targets, predictions)` gives the run's loss of each output (lists, one
    entry per output) and `weights` their weights: `val_loss` is their weighted sum,
    the training loss's meaning, and a model of several outputs (deep supervision) also
    gets each output's unweighted `val_{output}_loss`, as Keras logs them. The metrics
    are those of the main output (`metrics.segmentation_metrics`), named as Keras names
    them (`metric_prefix`). The model is called in inference mode, batch by batch.
    """
    metrics = metrics_lib.segmentation_metrics(n_label, class_names, data_format)
    sums, count = np.zeros(len(weights)), 0
    batches = val_data.as_numpy_iterator() if hasattr(val_data, "as_numpy_iterator") \
        else val_data
    for images, targets in batches:
        outputs = model(images, training=False)
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        targets = list(targets) if isinstance(targets, (list, tuple)) else [targets]
        size = int(images.shape[0])
        sums += np.asarray(losses(targets, outputs)) * size
        count += size
        for metric in metrics:
            metric.update_state(targets[0], outputs[0])
    means = sums / max(count, 1)
    scores = {"val_loss": float(np.dot(weights, means))}
    if len(model.outputs) > 1:
        scores.update({f"val_{name}_loss": float(value)
                       for name, value in zip(model.output_names, means)})
    prefix = "val_" + metric_prefix(model)
    scores.update({prefix + metric.name: float(metric.result()) for metric in metrics})
    return scores


class RunRecorder(keras.callbacks.Callback):
    """Validates, logs, checkpoints and backs up a run at every epoch; stops on NaN.

    Args:
        output: str. The run folder.
        validate: callable `model -> {"val_loss": ..., "val_dice": ..., ...}`
            (`validation_scores` on the run's fixed held-out batches).
        monitor: str. The logged score `best.keras` follows (`monitor_name`).
        best: float or None. The best `monitor` of the epochs already logged (a
            resumed run, `run_folder.trim_log`).
        backup_every: int. Steps between backups.
        write: bool. False for the workers of a multi-worker run that are not its
            chief: they validate and stop on NaN, and write nothing.

    The recorder writes what `fit` would write with `CSVLogger`, `ModelCheckpoint`
    and `TerminateOnNaN`, in one place, so the multi-worker loop, which calls its
    `on_epoch_begin`, `on_train_batch_end` and `on_epoch_end` itself, writes the same.
    The validation scores are added to the epoch's `logs`, so the callbacks after it
    (TensorBoard, the progress bar) see them.
    """

    def __init__(self, output, validate, monitor=MONITOR, *, best=None, backup_every=5,
                 write=True):
        super().__init__()
        self.output = output
        self.validate = validate
        self.monitor = monitor
        self.best = best
        self.best_epoch = None
        self.backup_every = backup_every
        self.write = write
        self.nan_epoch = None
        self._epoch = 0
        self._steps = 0

    @property
    def backup_dir(self):
        return os.path.join(self.output, run_folder.BACKUP_DIR)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if not _finite(logs):
            self.nan_epoch = self._epoch + 1
            self.model.stop_training = True
            return
        self._steps += 1
        if self.write and self._steps % self.backup_every == 0:
            run_folder.save_backup(self.model, self.backup_dir, self._epoch, batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            logs = {}
        if self.nan_epoch is not None or not _finite(logs):
            self.nan_epoch = self.nan_epoch or epoch + 1
            self.model.stop_training = True
            return
        scores = self.validate(self.model)
        logs.update(scores)
        if not self.write:
            return
        # One column order under both loops (their logs list the metrics in other
        # orders): epoch, loss, the training metrics by name, the validation scores.
        trained = sorted(name for name in logs if name != "loss" and name not in scores)
        row = {"epoch": epoch, "loss": float(logs["loss"])}
        row.update({name: float(logs[name]) for name in trained + list(scores)})
        append_log(os.path.join(self.output, run_folder.LOG_FILE), row)
        score = row.get(self.monitor)
        if score is not None and math.isfinite(score) and (self.best is None
                                                           or score > self.best):
            self.best, self.best_epoch = score, epoch
            self.model.save(os.path.join(self.output, run_folder.BEST_MODEL))
        # Last, so an epoch's log row and checkpoint exist before its backup does.
        run_folder.save_backup(self.model, self.backup_dir, epoch + 1, 0)


def _finite(logs):
    loss = (logs or {}).get("loss")
    return loss is None or bool(np.isfinite(loss))


def append_log(path, row):
    """Appends `row` to the CSV log at `path`, with a header when the log is new.

    A log whose header is not the row's columns (a run recorded by an older version,
    which logged other columns) is first rewritten with them, in one atomic step:
    the epochs it holds keep their values, and a column they lack reads `nan`.
    """
    fields = list(row)
    header = None
    if os.path.isfile(path) and os.path.getsize(path):
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            header, rows = reader.fieldnames, list(reader)
        if header != fields:
            with runs.atomic_path(path) as temporary:
                with open(temporary, "w", newline="") as file:
                    writer = csv.DictWriter(file, fieldnames=fields, extrasaction="ignore")
                    writer.writeheader()
                    writer.writerows({name: old.get(name) or "nan" for name in fields}
                                     for old in rows)
            header = fields
    with open(path, "a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        if header is None:
            writer.writeheader()
        writer.writerow(row)
