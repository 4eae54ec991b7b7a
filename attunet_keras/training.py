"""Training and evaluation runs: a run folder, Keras `fit`, and resumable state.

A run lives in one output folder:

- `config.json`: the settings (`TrainConfig`); a second start with the same settings
  resumes, with other settings it is refused.
- `best.keras`: the model with the best held-out Dice so far; `last.keras` at the end.
- `log.csv` (one row per epoch) and `tensorboard/`.
- `backup/`: the resumable state (`ResumableBackup`): weights, optimizer state and
  progress, saved every `backup_every` steps and at every epoch end, and removed when
  the run finishes. A run killed at any moment and started again with the same command
  goes on from the last backup: weights, optimizer state and epoch counter are
  restored, the log keeps each finished epoch once and the best checkpoint keeps its
  best score. The steps of the interrupted epoch are run again from the backed-up
  weights (at most `backup_every` steps of work are repeated on top of the epoch's
  start), with a fresh draw of training patches.
- `result.json`: the final held-out scores, written when training finishes.
"""

import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
import traceback

import keras
import numpy as np

from attunet_keras import _validation
from attunet_keras import data as data_lib
from attunet_keras import inference
from attunet_keras import losses as losses_lib
from attunet_keras import metrics as metrics_lib
from attunet_keras import runs

CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"
BEST_MODEL = "best.keras"
LAST_MODEL = "last.keras"
LOG_FILE = "log.csv"
BACKUP_DIR = "backup"
MONITOR = "val_dice"
DEEP_SUPERVISION_DECAY = 0.5
# The learning rate of the second stage of two-stage fine-tuning (unfrozen encoder),
# relative to `learning_rate`.
FINE_TUNE_LEARNING_RATE_FACTOR = 0.1
# Multi-Otsu's cost grows combinatorially with the classes (6 classes: 78 s on 2 cores).
MAX_OTSU_CLASSES = 5
# Overlap of the sliding windows that predict the whole held-out images in evaluation.
EVALUATE_OVERLAP = 0.25
_STATE = "state"
_WEIGHTS = "latest.weights.h5"
_PROGRESS = "progress.json"


class ResumableBackup(keras.callbacks.Callback):
    """Backs up weights, optimizer state and progress so a killed run can resume.

    Like `keras.callbacks.BackupAndRestore`, but a backup survives a kill at any
    instant: it is written whole into `backup_dir/staging` and then renamed to
    `backup_dir/state` (the previous state is renamed aside first and removed last),
    so there is always one complete state to resume from. Nothing is backed up once
    the loss is NaN. Restore with `restore_backup`.

    Args:
        backup_dir: str. Folder of the backups.
        save_freq: int. Steps between backups; a backup is also taken at the end of
            every epoch.
    """

    def __init__(self, backup_dir, save_freq):
        super().__init__()
        self.backup_dir = backup_dir
        self.save_freq = save_freq
        self._epoch = 0
        self._steps = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        if self._steps % self.save_freq == 0 and _finite(logs):
            self._save(epoch=self._epoch, step=batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        if _finite(logs):
            self._save(epoch=epoch + 1, step=0)

    def _save(self, epoch, step):
        save_backup(self.model, self.backup_dir, epoch, step)


def save_backup(model, backup_dir, epoch, step):
    """Writes a complete backup (weights, optimizer state, progress), then swaps it in."""
    staging = os.path.join(backup_dir, "staging")
    state = os.path.join(backup_dir, _STATE)
    retired = os.path.join(backup_dir, "retired")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    model.save_weights(os.path.join(staging, _WEIGHTS))
    with open(os.path.join(staging, _PROGRESS), "w") as file:
        json.dump({"epoch": epoch, "step": step, "frozen": encoder_frozen(model)}, file)
    shutil.rmtree(retired, ignore_errors=True)
    if os.path.isdir(state):
        os.rename(state, retired)
    os.rename(staging, state)
    shutil.rmtree(retired, ignore_errors=True)


def _finite(logs):
    loss = (logs or {}).get("loss")
    return loss is None or bool(np.isfinite(loss))


def backup_progress(backup_dir):
    """`{"epoch", "step"}` of the last complete backup, or None when there is none."""
    for name in (_STATE, "retired"):  # "retired" only when killed between two renames
        path = os.path.join(backup_dir, name, _PROGRESS)
        if os.path.isfile(path) and os.path.isfile(
                os.path.join(backup_dir, name, _WEIGHTS)):
            with open(path) as file:
                progress = json.load(file)
            return dict(progress, folder=os.path.join(backup_dir, name))
    return None


def encoder_frozen(model):
    """True when the model's pretrained encoder (a nested model) is frozen."""
    return any(isinstance(layer, keras.Model) and not layer.trainable for layer in model.layers)


def restore_backup(model, backup_dir):
    """Loads the last backup into a compiled `model`; returns the epoch to resume at.

    The model's encoder must be frozen or not as it was when the backup was taken
    (`backup_progress(...)["frozen"]`): the optimizer's variables follow it.
    """
    progress = backup_progress(backup_dir)
    if progress is None:
        return 0
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(os.path.join(progress["folder"], _WEIGHTS))
    return int(progress["epoch"])


@dataclasses.dataclass
class TrainConfig:
    """The settings of a training run (every `attunet-keras train` option).

    Args:
        dataset: str. `"nuclei"`, `"brain"`, `"brain3d"` or a folder with `images/`
            and `masks/` (2D images or NIfTI volumes).
        output: str. The run folder.
        epochs: int. Epochs to train.
        steps_per_epoch: int or None. Batches per epoch; `None`: the training images'
            patches of an epoch (`patches_per_image` each) once.
        batch_size: int. Batch size.
        learning_rate: float. Adam's learning rate.
        loss: str. One of `attunet_keras.losses.LOSSES`.
        seed: int. Seed of weights, shuffling and augmentation.
        depth: int. `att_unet` depth.
        features: int. `att_unet` base features.
        tile: int or None. Patch side for `nuclei` and folder datasets (the model's
            input size); `None`: 128 for images, 64 for volumes.
        dims: int or None. 2 (`att_unet`) or 3 (`att_unet_3d`, NIfTI volumes);
            `None`: from the dataset's files.
        patches_per_image: int or None. Random patches drawn from each training image
            per epoch; `None`: as many as the image's area holds tiles.
        foreground_fraction: float. Share of the patches centred on a labelled pixel.
        cache: str or None. A folder for decoded, normalised pairs of a folder dataset.
        val_fraction: float. Share of a folder dataset's files held out.
        val_batches: int or None. Batches of held-out patches behind every epoch's
            `val_dice` (and the choice of `best.keras`): the held-out images' tiles
            when they hold no more, else a fixed seeded draw of patches
            (`data.validation_dataset`), so validation does not grow with the data;
            `None` (runs recorded before the option): every held-out tile.
        val_files: list of str or None. The held-out files of a folder dataset; drawn
            with `seed` when the run starts and recorded, so a resumed run and
            `evaluate` use the same files.
        data_format: str. Layout of the model and the batches.
        n_label: int or None. Classes of a folder dataset (1: binary).
        backup_every: int. Steps between backups (`ResumableBackup`).
        dropout, batch_norm, upsampling, gate, deep_supervision: `att_unet` options.
            With deep supervision the head of decoder level k gets the loss weight
            0.5 ** (k - 1), and the metrics and the checkpoint follow the main output.
        backbone: str or None. A `backbones.BACKBONES` encoder for `att_unet`.
        backbone_weights: str or None. `"imagenet"` or a weights file of the encoder.
        freeze_epochs: int. With a backbone, train the first `freeze_epochs` epochs
            with the encoder frozen, then unfreeze it and go on at
            `learning_rate * FINE_TUNE_LEARNING_RATE_FACTOR` (two-stage fine-tuning).
        strategy: str. A `distribute.STRATEGIES` name; `batch_size` is per replica.
        precision: str. `float32`, `mixed_float16` or `mixed_bfloat16`.
        jit_compile: str. `auto` (off under several replicas), `on` or `off`.
    """

    dataset: str = "nuclei"
    output: str = "runs/nuclei"
    epochs: int = 30
    steps_per_epoch: int = None
    batch_size: int = 8
    learning_rate: float = 2e-3
    loss: str = "bce_dice"
    seed: int = 0
    depth: int = 4
    features: int = 16
    tile: int = None
    dims: int = None
    patches_per_image: int = None
    foreground_fraction: float = data_lib.FOREGROUND_FRACTION
    cache: str = None
    val_fraction: float = 0.2
    val_batches: int = data_lib.VAL_BATCHES
    val_files: list = None
    data_format: str = "channels_last"
    n_label: int = None
    backup_every: int = 5
    dropout: float = 0.2
    batch_norm: bool = False
    upsampling: str = "nearest"
    gate: str = "additive"
    deep_supervision: bool = False
    backbone: str = None
    backbone_weights: str = None
    freeze_epochs: int = 0
    strategy: str = "auto"
    precision: str = "float32"
    jit_compile: str = "auto"

    def validate(self):
        """Checks every setting; raises one ValueError naming the first bad one."""
        for name in ("epochs", "batch_size", "depth", "features", "backup_every"):
            _validation.check_int(name, getattr(self, name), 1)
        if self.val_batches is not None:  # None: every held-out tile (older runs)
            _validation.check_int("val_batches", self.val_batches, 1)
        if self.tile is not None:
            _validation.check_int("tile", self.tile, 1)
        if self.dims not in (None, 2, 3):
            raise ValueError(f"dims={self.dims!r} is not supported; expected 2, 3 or None "
                             "(from the files).")
        _validation.check_int("seed", self.seed, 0)
        if self.steps_per_epoch is not None:
            _validation.check_int("steps_per_epoch", self.steps_per_epoch, 1)
        if self.n_label is not None:
            _validation.check_int("n_label", self.n_label, 1)
        data_lib.pipeline.check_pipeline_arguments(
            self.batch_size, self.patches_per_image, self.foreground_fraction)
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0
                and math.isfinite(self.learning_rate)):
            raise ValueError(
                f"learning_rate={self.learning_rate!r} is not allowed; expected a "
                "positive number."
            )
        if self.loss not in losses_lib.LOSSES:
            raise ValueError(
                f"loss={self.loss!r} is not supported; expected one of "
                f"{losses_lib.LOSSES}."
            )
        tile = self.tile or data_lib.DEFAULT_TILE[self.dims or 2]
        if tile % 2**self.depth:
            raise ValueError(
                f"tile={tile} must be divisible by 2**depth={2**self.depth}."
            )
        from attunet_keras import distribute
        from attunet_keras import models

        for name, value, choices in (("strategy", self.strategy, distribute.STRATEGIES),
                                     ("precision", self.precision, distribute.PRECISIONS),
                                     ("jit_compile", self.jit_compile,
                                      distribute.JIT_CHOICES)):
            if value not in choices:
                raise ValueError(
                    f"{name}={value!r} is not supported; expected one of {choices}."
                )
        options = dict(
            n_label=self.n_label or 1, depth=self.depth, features=self.features,
            data_format=self.data_format, in_channels=1, output_activation="sigmoid",
            dropout=self.dropout, batch_norm=self.batch_norm, upsampling=self.upsampling,
            gate=self.gate, deep_supervision=self.deep_supervision, name="att_unet",
            backbone=self.backbone, backbone_weights=self.backbone_weights,
            freeze_backbone=False)
        models.check_arguments(2, {"tile": tile}, options)
        _validation.check_int("freeze_epochs", self.freeze_epochs, 0)
        if self.backbone is not None:
            from attunet_keras import backbones

            backbones.check_backbone_arguments({"tile": tile}, options)
            if self.dims == 3:
                raise ValueError("backbones are 2D keras.applications encoders; volumes "
                                 "(dims=3) train att_unet_3d without one.")
            if self.dataset in ("brain", "brain3d"):
                raise ValueError(
                    "the brain dataset's slices are 112x128, not multiples of 32, so they "
                    "cannot go through a backbone; use nuclei or a folder dataset."
                )
        if self.freeze_epochs and self.backbone is None:
            raise ValueError(
                f"freeze_epochs={self.freeze_epochs} needs a backbone to freeze.")
        if self.freeze_epochs >= self.epochs:
            raise ValueError(
                f"freeze_epochs={self.freeze_epochs} must be less than epochs={self.epochs} "
                "(the encoder is unfrozen for the epochs after it)."
            )
        if self.freeze_epochs and self.strategy == "multiworker":
            raise ValueError("freeze_epochs (two-stage fine-tuning) runs under Keras fit, "
                             "not the multiworker loop.")
        if self.dataset not in data_lib.BUILTIN and not os.path.isdir(self.dataset):
            raise ValueError(
                f"dataset={self.dataset!r} is neither a built-in dataset "
                f"{data_lib.BUILTIN} nor an existing folder with images/ and masks/."
            )
        if self.dataset not in data_lib.BUILTIN and self.n_label is None:
            raise ValueError(
                f"dataset={self.dataset!r} is a folder; give n_label (1 for binary "
                "masks, else the number of classes with background)."
            )
        if self.dataset in data_lib.BUILTIN and self.n_label is not None:
            raise ValueError(
                f"n_label is fixed by the built-in dataset {self.dataset!r}; leave it out."
            )
        if not (isinstance(self.val_fraction, (int, float)) and 0.0 < self.val_fraction < 1.0):
            raise ValueError(f"val_fraction={self.val_fraction!r} is not allowed; expected "
                             "a number between 0 and 1.")
        builtin_dims = {"nuclei": 2, "brain": 2, "brain3d": 3}.get(self.dataset)
        if builtin_dims and self.dims not in (None, builtin_dims):
            raise ValueError(f"the built-in {self.dataset!r} is {builtin_dims}D; leave "
                             "dims out.")
        default_fraction = next(field.default for field in dataclasses.fields(self)
                                if field.name == "val_fraction")
        if self.dataset in data_lib.BUILTIN and self.val_fraction != default_fraction:
            raise ValueError(f"val_fraction is fixed by the built-in dataset "
                             f"{self.dataset!r}; leave it out.")
        if self.dataset in data_lib.BUILTIN and self.cache is not None:
            raise ValueError(
                f"cache is for folder datasets; the built-in {self.dataset!r} is decoded "
                "once and held in memory already.")

    def to_json(self):
        values = dataclasses.asdict(self)
        values["output"] = os.path.abspath(self.output)
        if self.dataset not in data_lib.BUILTIN:
            values["dataset"] = os.path.abspath(self.dataset)
        if self.backbone_weights not in (None, "imagenet"):
            values["backbone_weights"] = os.path.abspath(self.backbone_weights)
        if self.cache is not None:
            values["cache"] = os.path.abspath(self.cache)
        return values


def load_data(config):
    """The dataset of a run, split as in training (a folder's recorded held-out files)."""
    if config.dataset == "nuclei":
        return data_lib.nuclei(tile=config.tile or data_lib.DEFAULT_TILE[2])
    if config.dataset == "brain":
        return data_lib.brain()
    if config.dataset == "brain3d":
        return data_lib.brain3d()
    return data_lib.folder(config.dataset, config.n_label, tile=config.tile,
                           val_fraction=config.val_fraction, seed=config.seed,
                           val_files=config.val_files, cache=config.cache, dims=config.dims)


def build_model(config, dataset, jit_compile="auto", frozen=False):
    """The `att_unet` of a run, compiled with its loss, Adam and Dice/IoU metrics.

    Call it inside `strategy.scope()` and under the run's dtype policy. `frozen`
    freezes a backbone's encoder.
    """
    from attunet_keras import models

    options = dict(
        depth=config.depth, features=config.features, data_format=config.data_format,
        in_channels=dataset.in_channels,
        output_activation="sigmoid" if dataset.n_label == 1 else "softmax",
        dropout=config.dropout, batch_norm=config.batch_norm,
        upsampling=config.upsampling, gate=config.gate,
        deep_supervision=config.deep_supervision)
    if dataset.dims == 3:
        model = models.att_unet_3d(*dataset.tile_shape, dataset.n_label, **options)
    else:
        model = models.att_unet(
            *dataset.tile_shape, dataset.n_label, backbone=config.backbone,
            backbone_weights=config.backbone_weights, freeze_backbone=frozen, **options)
    compile_model(model, config, dataset, config.learning_rate, jit_compile)
    return model


def unfreeze(model, config, dataset, jit_compile="auto"):
    """Unfreezes a backbone's encoder and compiles again at the fine-tuning rate."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            layer.trainable = True
    compile_model(model, config, dataset,
                  config.learning_rate * FINE_TUNE_LEARNING_RATE_FACTOR, jit_compile)


def compile_model(model, config, dataset, learning_rate, jit_compile="auto"):
    """Compiles `model` with the run's loss, Adam at `learning_rate` and the metrics."""
    loss = losses_lib.get(config.loss, dataset.n_label, config.data_format)
    metrics = metrics_lib.segmentation_metrics(
        dataset.n_label, dataset.class_names, config.data_format)
    if len(model.outputs) == 1:
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss,
                      metrics=metrics, jit_compile=jit_compile)
        return
    # Deep supervision: outputs [main, dec2 head, dec3 head, ...].
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=[loss] * len(model.outputs),
        loss_weights=[DEEP_SUPERVISION_DECAY**index for index in range(len(model.outputs))],
        metrics=[metrics] + [[] for _ in model.outputs[1:]],
        jit_compile=jit_compile,
    )


def monitor_name(model):
    """The logged name of the held-out Dice of the model's main output."""
    if len(model.outputs) == 1:
        return MONITOR
    return f"val_{model.output_names[0]}_dice"


def train(config, *, overwrite=False, verbose="auto"):
    """Trains (or resumes) the run described by `config`; returns its result dict.

    Raises:
        ValueError: a bad setting, or an output folder holding a different or a
            finished run (pass `overwrite=True` to start it again from scratch).
        RuntimeError: the loss became NaN (training stops at once).
    """
    from attunet_keras import distribute

    config.validate()
    distribute.check_strategy_backend(config.strategy)
    if config.strategy == "multiworker":
        raise ValueError(
            "strategy='multiworker' runs one process per worker with its own loop: call "
            "attunet_keras.multiworker.train (attunet-keras train --strategy multiworker)."
        )
    distribute.check_precision_on_device(config.precision, config.data_format)
    output = os.path.abspath(config.output)
    check_output(config, output, overwrite)  # refuses before even the lock is written
    with runs.folder_lock(output):  # one writer: a second train here is refused
        return _train_locked(config, output, overwrite, verbose)


def _train_locked(config, output, overwrite, verbose):
    from attunet_keras import distribute

    # Every check first; the run folder is written only once they have all passed.
    resuming = check_output(config, output, overwrite)
    config, dataset = run_dataset(config, output, resuming)
    check_backbone_weights(config)
    strategy = distribute.get_strategy(config.strategy)
    global_batch, steps = batching(config, strategy, dataset)
    jit_compile = distribute.resolve_jit_compile(config.jit_compile, strategy)
    start_output(config, output, overwrite, resuming)
    # A keras.distribution (JAX) must be active while the model is fitted too.
    active = (strategy.scope() if isinstance(strategy, distribute.KerasDistribution)
              else contextlib.nullcontext())
    with distribute.precision_policy(config.precision), active:
        return _fit(config, output, resuming, dataset, strategy, global_batch, steps,
                    jit_compile, verbose)


def run_dataset(config, output, resuming):
    """`(config, dataset)` of a run: a folder dataset's held-out files are those the
    run recorded when it is resumed, else the seeded draw, which the returned config
    records (`val_files`). A resumed run keeps the settings it recorded before they
    were options (`UNRECORDED`)."""
    if resuming:
        recorded = read_config(output)
        kept = {key: getattr(recorded, key) for key in UNRECORDED
                if key not in _read_json(os.path.join(output, CONFIG_FILE))}
        if config.val_files is None:
            kept["val_files"] = recorded.val_files
        config = dataclasses.replace(config, **kept)
    dataset = load_data(config)
    if dataset.dims == 3 and config.backbone is not None:
        raise ValueError(f"{config.dataset} holds volumes; backbones are 2D "
                         "keras.applications encoders, so att_unet_3d trains without one.")
    if config.dataset not in data_lib.BUILTIN:
        config = dataclasses.replace(config, val_files=dataset.val_names)
    return config, dataset


def check_backbone_weights(config):
    """Refuses a `backbone_weights` file that is not the backbone's, before anything
    is written (a fresh application is built and the file loaded into it)."""
    if config.backbone is not None and config.backbone_weights not in (None, "imagenet"):
        from attunet_keras import backbones

        backbones.check_weights_file(config.backbone, config.backbone_weights)


def batching(config, strategy, dataset):
    """`(global batch, steps per epoch)`: per-replica batch x replicas; by default an
    epoch draws each training image's patches once."""
    replicas = strategy.num_replicas_in_sync
    global_batch = config.batch_size * replicas
    patches = dataset.patches_per_epoch(config.patches_per_image)
    return global_batch, config.steps_per_epoch or max(1, math.ceil(patches / global_batch))


def _fit(config, output, resuming, dataset, strategy, global_batch, steps, jit_compile,
         verbose):
    from attunet_keras import distribute

    keras.utils.set_random_seed(config.seed)
    backup_dir = os.path.join(output, BACKUP_DIR)
    progress = backup_progress(backup_dir) if resuming else None
    # Two-stage fine-tuning: the encoder is frozen for the first freeze_epochs epochs;
    # a backup is restored into a model frozen as it was when the backup was taken.
    frozen = progress.get("frozen", False) if progress else config.freeze_epochs > 0
    with strategy.scope():
        model = build_model(config, dataset, jit_compile=jit_compile, frozen=frozen)
    outputs = len(model.outputs)
    train_data = data_lib.training_dataset(
        dataset, global_batch, seed=config.seed, data_format=config.data_format,
        outputs=outputs, patches_per_image=config.patches_per_image,
        foreground_fraction=config.foreground_fraction)
    val_data = validation_data(config, dataset, global_batch, outputs)
    monitor = monitor_name(model)

    resumed_epoch = restore_backup(model, backup_dir) if resuming else 0
    best_so_far = trim_log(os.path.join(output, LOG_FILE), resumed_epoch, monitor)
    if resuming and drop_broken_checkpoint(os.path.join(output, BEST_MODEL)):
        print(f"{os.path.join(output, BEST_MODEL)} was cut short (killed while it was "
              "written): removed; the next epoch writes a new best checkpoint")
        best_so_far = None
    callbacks = [
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.CSVLogger(os.path.join(output, LOG_FILE), append=True),
        keras.callbacks.ModelCheckpoint(
            os.path.join(output, BEST_MODEL), monitor=monitor, mode="max",
            save_best_only=True, initial_value_threshold=best_so_far,
        ),
        keras.callbacks.TensorBoard(os.path.join(output, "tensorboard")),
        # Last, so an epoch's log row and checkpoint exist before its backup does.
        ResumableBackup(backup_dir, save_freq=config.backup_every),
    ]
    describe_dataset(dataset, config)
    print(f"Model {model.name} depth={config.depth} features={config.features}: "
          f"{model.count_params():,} parameters; {steps} steps per epoch")
    print(f"Strategy {distribute.describe(strategy)}; global batch {global_batch} "
          f"({config.batch_size} per replica); precision {config.precision}; "
          f"jit_compile {jit_compile}")
    if resuming and resumed_epoch >= config.epochs:
        print(f"Resuming {output}: all {config.epochs} epochs were trained; finishing "
              "with the final evaluation")
    elif resuming:
        print(f"Resuming {output} from its backup at epoch {resumed_epoch + 1} of "
              f"{config.epochs}")

    losses = []
    for first, last, stage_frozen in _stages(config, resumed_epoch):
        if frozen and not stage_frozen:
            with strategy.scope():
                unfreeze(model, config, dataset, jit_compile)
            frozen = False
            print(f"Epoch {first + 1}: encoder unfrozen; learning rate "
                  f"{config.learning_rate * FINE_TUNE_LEARNING_RATE_FACTOR:g}")
        with stop_on_read_failure(backup_dir):
            history = model.fit(
                train_data, epochs=last, initial_epoch=first,
                steps_per_epoch=steps, validation_data=val_data, callbacks=callbacks,
                verbose=verbose, shuffle=False,
            )
        losses += history.history.get("loss", [])
        if losses and not np.isfinite(losses[-1]):
            break
    if losses and not np.isfinite(losses[-1]):
        raise RuntimeError(
            f"training stopped: the loss became NaN in epoch {len(losses) + resumed_epoch}"
            f"; lower --learning-rate (was {config.learning_rate}). Nothing is saved "
            f"beyond the last good checkpoint {os.path.join(output, BEST_MODEL)}."
        )
    model.save(os.path.join(output, LAST_MODEL))
    result = evaluate_run(output, dataset=dataset)
    runs.write_json(os.path.join(output, RESULT_FILE), result)
    shutil.rmtree(backup_dir, ignore_errors=True)
    return result


def validation_data(config, dataset, global_batch, outputs=1):
    """The held-out batches every epoch of the run is validated on (both loops)."""
    return data_lib.validation_dataset(
        dataset, global_batch, data_format=config.data_format, outputs=outputs,
        batches=config.val_batches, seed=config.seed)


def validation_scores(model, val_data, dataset, config):
    """Dice and IoU (and per class) of the model's main output on `val_data`: what
    `fit` logs as `val_dice`, ... from the compiled metrics on the same batches (the
    multi-worker loop's per-epoch validation)."""
    metrics = metrics_lib.segmentation_metrics(dataset.n_label, dataset.class_names,
                                               config.data_format)
    for images, targets in val_data:
        outputs = model(images, training=False)
        main = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        truth = targets[0] if isinstance(targets, (list, tuple)) else targets
        for metric in metrics:
            metric.update_state(truth, main)
    return {metric.name: float(metric.result()) for metric in metrics}


def calibration_patches(run_dir, count=64, seed=0):
    """`count` random training patches of a run, in its model's layout: the
    representative images of an int8 LiteRT export (`export --quantize int8`)."""
    config = read_config(run_dir)
    batches = data_lib.training_dataset(
        load_data(config), count, seed=seed, data_format=config.data_format,
        patches_per_image=config.patches_per_image,
        foreground_fraction=config.foreground_fraction)
    return next(iter(batches))[0].numpy()


def describe_dataset(dataset, config, say=print):
    """Prints the dataset of a run: its split, patches and notes (padding, cache)."""
    patches = dataset.patches_per_epoch(config.patches_per_image)
    say(f"Dataset {dataset.name}: {len(dataset.train)} training and {len(dataset.val)} "
        f"held-out images, {patches} random {'x'.join(map(str, dataset.tile_shape))} "
        f"patches per epoch ({config.foreground_fraction:g} "
        f"centred on foreground), n_label={dataset.n_label} ({dataset.source})")
    for note in dataset.notes:
        say(f"  {note}")


@contextlib.contextmanager
def stop_on_read_failure(backup_dir):
    """Turns a file that fails to read mid-epoch into one error naming it.

    The error raised carries no reference to the failed `fit` (its frames hold the
    `tf.data` iterators): those are released, and collected here, before it is raised.
    An iterator still alive when Python exits is destroyed during interpreter
    finalization, while its reader threads wait for the GIL that finalization no
    longer hands out: the process would print the error and hang.
    """
    failure = None
    try:
        yield
    except Exception as error:
        failure = data_lib.read_failure(error)
        if failure is None:
            raise
        # The new error is raised while this one is still being handled (inside
        # contextlib's __exit__), so it keeps it as __context__: drop the locals of
        # the finished frames it passed through, which hold the iterators.
        traceback.clear_frames(error.__traceback__)
    if failure is None:
        return
    release_pipelines()
    if backup_progress(backup_dir):
        again = f"it goes on from the last backup in {backup_dir}"
    else:
        again = "no backup was taken yet, so it starts from the beginning"
    raise ValueError(
        f"training stopped: {failure} Fix or remove the file (attunet-keras "
        f"check-data lists every problem) and run the same command again: {again}.")


def release_pipelines():
    """Collects unreachable `tf.data` iterators now, while their reader threads can
    still finish (see `stop_on_read_failure`)."""
    import gc

    gc.collect()


def _stages(config, first_epoch):
    """`(first, last, frozen)` epoch ranges still to train: frozen, then fine-tuning."""
    stages = [(0, config.freeze_epochs, True)] if config.freeze_epochs else []
    stages.append((config.freeze_epochs, config.epochs, False))
    return [(max(first, first_epoch), last, frozen) for first, last, frozen in stages
            if last > first_epoch]


def is_run_folder(folder):
    """True when `folder` holds a run of this package: a readable config.json and a log."""
    if not (os.path.isdir(folder) and os.path.isfile(os.path.join(folder, LOG_FILE))):
        return False
    try:
        read_config(folder)
    except (ValueError, FileNotFoundError):
        return False
    return True


def check_output(config, output, overwrite):
    """Checks the run folder without writing anything; True when a run is resumed.

    A new or empty folder starts a run; a folder holding an interrupted run with the
    same settings resumes it. `overwrite` replaces only a folder that holds a run of
    this package (`is_run_folder`), and never a folder that holds the dataset.
    """
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"output {output} exists and is not a folder.")
    if config.dataset not in data_lib.BUILTIN:
        dataset = os.path.realpath(config.dataset)
        real_output = os.path.realpath(output)
        if dataset == real_output or dataset.startswith(real_output + os.sep):
            raise ValueError(
                f"output {output} holds the dataset {config.dataset}; choose a run folder "
                "outside it."
            )
    if not runs.entries(output) or nothing_trained(output):
        return False  # a new folder, or a start that failed before its first epoch
    if overwrite:
        if not is_run_folder(output):
            raise ValueError(
                f"output {output} is not a run of attunet_keras (no readable "
                f"{CONFIG_FILE} with a {LOG_FILE}); --overwrite only replaces a run. "
                "Choose a new folder."
            )
        return False
    config_path = os.path.join(output, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ValueError(
            f"output {output} is a non-empty folder without a run's {CONFIG_FILE}; "
            "choose an empty or new folder."
        )
    previous = _read_json(config_path)
    current = config.to_json()
    # The held-out files are recorded when a run starts, not given again to resume it.
    if current.get("val_files") is None:
        current.pop("val_files")
    # A setting an older run did not record is the one it ran with (see
    # `UNRECORDED`), kept when it resumes: not compared.
    differences = [
        f"{key}: {previous.get(key)!r} -> {current[key]!r}"
        for key in current if key in previous and previous[key] != current[key]
    ]
    if differences:
        raise ValueError(
            f"output {output} holds a run with other settings "
            f"({'; '.join(differences)}); use another --output, the same "
            "settings to resume it, or --overwrite to start again."
        )
    if os.path.isfile(os.path.join(output, RESULT_FILE)):
        raise ValueError(
            f"output {output} holds a finished run; use another --output, or "
            "--overwrite to train it again."
        )
    return backup_progress(os.path.join(output, BACKUP_DIR)) is not None


def nothing_trained(output):
    """True for a run folder whose start failed before anything was trained: only the
    run's own files (config.json, an empty log.csv, tensorboard/), no backup and no
    model. A rerun, with any settings, starts it afresh."""
    names = set(runs.entries(output))
    if not names or not names <= {CONFIG_FILE, LOG_FILE, "tensorboard"}:
        return False
    try:
        read_config(output)
    except (ValueError, FileNotFoundError):
        return False
    log = os.path.join(output, LOG_FILE)
    if os.path.isfile(log):
        with open(log) as file:
            if len(file.read().splitlines()) > 1:
                return False
    return True


RUN_ENTRIES = (CONFIG_FILE, LOG_FILE, BEST_MODEL, LAST_MODEL, RESULT_FILE, BACKUP_DIR,
               "tensorboard")


def start_output(config, output, overwrite, resuming):
    """Creates the run folder and writes config.json. A new run first removes what an
    earlier start left: with `overwrite` the folder's whole content (an earlier run),
    else only the run's own files (`RUN_ENTRIES`: a start killed before its first
    backup). The lock file stays."""
    if resuming:
        return
    os.makedirs(output, exist_ok=True)
    for name in runs.entries(output):
        if not overwrite and name not in RUN_ENTRIES:
            continue
        path = os.path.join(output, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    runs.write_json(os.path.join(output, CONFIG_FILE), config.to_json())


def _read_json(path):
    try:
        with open(path) as file:
            values = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path} does not hold a JSON object.")
    return values


def trim_log(log_path, first_epoch, monitor):
    """Drops log rows of epochs that will run again; returns the best `monitor` kept."""
    if not os.path.isfile(log_path):
        return None
    with open(log_path, newline="") as file:
        reader = csv.DictReader(file)
        rows, fields = list(reader), reader.fieldnames
    if not fields:
        return None

    def whole(row):  # a row cut short by a kill mid-write has missing or empty fields
        return (None not in row and all(row.get(field) not in (None, "") for field in fields)
                and row.get("epoch", "").isdigit())

    kept = [row for row in rows if whole(row) and int(row["epoch"]) < first_epoch]
    with runs.atomic_path(log_path) as temporary:  # a kill now leaves the old log whole
        with open(temporary, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
    scores = [float(row[monitor]) for row in kept if row.get(monitor)]
    return max(scores) if scores else None


def drop_broken_checkpoint(path):
    """Removes `path` (a `.keras` checkpoint) when it is not a whole zip archive (a
    kill while Keras wrote it in place); True when it did."""
    import zipfile

    if not os.path.isfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            whole = archive.testzip() is None
    except Exception:  # BadZipFile, OSError, EOFError, zlib.error: not whole
        whole = False
    if not whole:
        os.remove(path)
    return not whole


# Settings added after runs were recorded without them: what such a run did then
# (val_batches None: every held-out tile, every epoch).
UNRECORDED = {"val_batches": None}


def read_config(run_dir):
    """The `TrainConfig` saved in a run folder."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{run_dir} is not a training run: it has no {CONFIG_FILE}."
        )
    values = _read_json(path)
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - fields)
    if unknown or "dataset" not in values:
        raise ValueError(
            f"{path} is not the config.json of an attunet_keras run (unknown keys "
            f"{unknown[:5]}, or no 'dataset')."
        )
    return TrainConfig(**{**UNRECORDED, **values})


def load_run_model(run_dir):
    """The best checkpoint of a run (the last model when no checkpoint was kept)."""
    read_config(run_dir)  # a clear error for a folder that is not a run
    for name in (BEST_MODEL, LAST_MODEL):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            return inference.load_model(path)
    raise FileNotFoundError(
        f"{run_dir} holds no {BEST_MODEL} or {LAST_MODEL} yet: the run has not finished "
        "an epoch (run the same train command again to resume it)."
    )


def check_model_fits(model, dataset, what="the model"):
    """Refuses a model of another task: other channels in or out, or volumes."""
    if inference.is_volume_model(model) != (dataset.dims == 3):
        kinds = ("3D", "2D") if dataset.dims == 2 else ("2D", "3D")
        raise ValueError(f"{what} is a {kinds[0]} model; the run's dataset "
                         f"{dataset.name!r} is {kinds[1]}.")
    outputs, inputs = inference.output_channels(model), inference.input_channels(model)
    if outputs != dataset.n_label:
        task = "binary (1 channel)" if dataset.n_label == 1 else f"{dataset.n_label} classes"
        raise ValueError(
            f"{what} gives {outputs} output channel(s) but the run's dataset "
            f"{dataset.name!r} is {task}: it is a model of another task."
        )
    if inputs != dataset.in_channels:
        raise ValueError(
            f"{what} takes {inputs} input channel(s) but the run's images have "
            f"{dataset.in_channels}."
        )


def evaluate_run(run_dir, *, dataset=None, model=None, overlap=EVALUATE_OVERLAP):
    """Held-out scores of a run's best model on whole images, next to an Otsu baseline.

    The baseline thresholds the held-out images' intensities (their channel mean)
    with Otsu's method (scikit-image) on their pooled histogram: one threshold for
    binary masks, `n_label - 1` thresholds (multi-Otsu) for classes, the classes
    ordered by intensity.
    """
    config = read_config(run_dir)
    dataset = dataset or load_data(config)
    if model is None:
        model = load_run_model(run_dir)
    else:
        check_model_fits(model, dataset)
    return evaluate_model(model, dataset, config, overlap=overlap)


def evaluate_model(model, dataset, config, overlap=EVALUATE_OVERLAP):
    """Held-out Dice, IoU and HD95 of `model` on the whole held-out images.

    Each image is predicted with `inference.predict_sliding_window` (patches of the
    dataset's tile, `overlap`, Gaussian blending), so the scores count every pixel
    once, whatever the image's size and the model's layout.
    """
    metrics = metrics_lib.segmentation_metrics(
        dataset.n_label, dataset.class_names, "channels_last")
    distances = _HD95(dataset.n_label, dataset.class_names)
    for index in dataset.val:
        image, mask = dataset.read(index)
        probabilities = inference.predict_sliding_window(
            model, image, dataset.tile_shape, overlap=overlap,
            batch_size=config.batch_size, normalized=True)
        truth = data_lib.targets(mask, dataset.n_label)[None]
        for metric in metrics:
            metric.update_state(truth, probabilities[None])
        distances.add(inference.labels_from_probabilities(probabilities), mask,
                      dataset.items[index].spacing)
    scores = {metric.name: float(metric.result()) for metric in metrics}
    scores.update(distances.result())
    result = {"dataset": dataset.name, "held_out_images": len(dataset.val),
              "dims": dataset.dims, "model": scores, "otsu": None}
    if dataset.n_label > MAX_OTSU_CLASSES:
        result["otsu_note"] = (
            f"no Otsu baseline: multi-Otsu is skipped above {MAX_OTSU_CLASSES} classes, "
            "where its search takes minutes to hours")
    else:
        try:
            result["otsu"] = otsu_scores(dataset)
        except ValueError as error:  # e.g. constant intensities: nothing to threshold
            result["otsu_note"] = f"no Otsu baseline: {error}"
    return result


OTSU_BINS = 256


def otsu_scores(dataset):
    """Dice, IoU and HD95 of Otsu thresholds of the held-out images' intensities.

    The thresholds come from the histogram of every held-out pixel (images are
    normalised to [0, 1]), read one image at a time.
    """
    from skimage import filters

    edges = np.linspace(0.0, 1.0, OTSU_BINS + 1)
    counts = np.zeros(OTSU_BINS, "int64")
    for _, image, _ in dataset.examples:
        counts += np.histogram(image.mean(axis=-1), bins=edges)[0]
    histogram = (counts, (edges[:-1] + edges[1:]) / 2)
    if dataset.n_label == 1:
        thresholds = [filters.threshold_otsu(hist=histogram)]
    else:
        thresholds = filters.threshold_multiotsu(classes=dataset.n_label, hist=histogram)
    metrics = metrics_lib.segmentation_metrics(
        dataset.n_label, dataset.class_names, "channels_last")
    distances = _HD95(dataset.n_label, dataset.class_names)
    for index in dataset.val:
        image, mask = dataset.read(index)
        predicted = np.digitize(image.mean(axis=-1), thresholds)
        for metric in metrics:
            metric.update_state(data_lib.targets(mask, dataset.n_label)[None],
                                data_lib.targets(predicted, dataset.n_label)[None])
        distances.add(predicted, mask, dataset.items[index].spacing)
    scores = {metric.name: float(metric.result()) for metric in metrics}
    scores.update(distances.result())
    return scores


class _HD95:
    """Held-out HD95 in pixels (in the voxel spacing's units for volumes with one):
    per image and foreground class, then the mean.

    An image where prediction and truth are both empty (NaN) is left out of the mean,
    as MONAI's `reduction="mean"` leaves NaN out; one empty and the other not makes it
    infinite (`metrics.hausdorff95` says why).
    `hd95` is the foreground's (binary) or the mean over the classes 1.., with
    `hd95_{class}` per class.
    """

    def __init__(self, n_label, class_names):
        self.n_label, self.class_names = n_label, class_names
        self.classes = [1] if n_label == 1 else list(range(1, n_label))
        self.values = {label: [] for label in self.classes}

    def add(self, predicted, truth, spacing=None):
        for label in self.classes:
            self.values[label].append(
                metrics_lib.hausdorff95(predicted == label, truth == label, spacing))

    def result(self):
        per_class = {}
        for label, values in self.values.items():
            values = np.asarray(values, "float64")
            kept = values[~np.isnan(values)]
            per_class[label] = float(kept.mean()) if kept.size else math.nan
        if self.n_label == 1:
            return {"hd95": per_class[1]}
        scores = {"hd95": float(np.mean(list(per_class.values())))}
        scores.update({f"hd95_{self.class_names[label]}": value
                       for label, value in per_class.items()})
        return scores
