"""Training a run: build and compile the model, fit it, and finish with the held-out
evaluation.

`train(config)` checks everything first, then writes the run folder (`run_folder`)
and fits the model with Keras `fit`; every epoch ends in `recorder.RunRecorder`
(validation on fixed held-out batches, `log.csv`, `best.keras`, the backup, the NaN
stop), which the multi-worker loop (`multiworker`) shares. The settings are
`config.TrainConfig`; the final scores come from `evaluation.evaluate_run`.
"""

import contextlib
import dataclasses
import math
import os
import shutil
import traceback

import keras

from attunet_keras import config as config_lib
from attunet_keras import data as data_lib
from attunet_keras import evaluation
from attunet_keras import inference
from attunet_keras import losses as losses_lib
from attunet_keras import metrics as metrics_lib
from attunet_keras import recorder as recorder_lib
from attunet_keras import run_folder
from attunet_keras import runs
# The run's settings and its scores, long reached through this module (the public API).
from attunet_keras.config import TrainConfig  # noqa: F401
from attunet_keras.config import load_data
from attunet_keras.config import read_config  # noqa: F401
from attunet_keras.evaluation import evaluate_run
from attunet_keras.evaluation import load_run_model  # noqa: F401

DEEP_SUPERVISION_DECAY = 0.5


# The learning rate of the second stage of two-stage fine-tuning (unfrozen encoder),
# relative to `learning_rate`.
FINE_TUNE_LEARNING_RATE_FACTOR = 0.1


def build_model(config, dataset, jit_compile="auto", frozen=False):
    """The `att_unet` of a run, compiled with its loss, Adam and Dice/IoU metrics.

    Call it inside `strategy.scope()` and under the run's dtype policy. `frozen`
    freezes a backbone's encoder.
    """
    from attunet_keras import models

    if config.init_from is not None:
        model = initial_model(config, dataset)
        compile_model(model, config, dataset, config.learning_rate, jit_compile)
        return model
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


def check_init_from(config, dataset):
    """Refuses an `--init-from` model that cannot train on the run's data, before
    anything is written (the model is loaded and checked, then dropped)."""
    if config.init_from is not None:
        initial_model(config, dataset)


def initial_model(config, dataset):
    """The model of `--init-from FILE.keras` (e.g. from `attunet-keras convert`): its
    architecture and weights, checked against the run's data and layout; the model
    then trains as any other (its sizes freed when they are not the run's tile)."""
    from attunet_keras import model_info

    model = model_info.load_model(config.init_from)
    what = f"--init-from {config.init_from}"
    evaluation.check_model_fits(model, dataset, what)
    if model_info.model_data_format(model) != config.data_format:
        raise ValueError(f"{what} is a {model_info.model_data_format(model)} model; give "
                         f"--data-format {model_info.model_data_format(model)}.")
    multiple = model_info.size_multiple(model)
    if any(side % multiple for side in dataset.tile_shape):
        raise ValueError(f"{what} takes sizes that are multiples of {multiple}; the tile "
                         f"{'x'.join(map(str, dataset.tile_shape))} is not (--tile).")
    if model_info.own_size(model) not in (None, tuple(dataset.tile_shape)):
        model = inference.fully_convolutional(model)
    return model


def unfreeze(model, config, dataset, jit_compile="auto"):
    """Unfreezes a backbone's encoder and compiles again at the fine-tuning rate."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            layer.trainable = True
    compile_model(model, config, dataset,
                  config.learning_rate * FINE_TUNE_LEARNING_RATE_FACTOR, jit_compile)


def compile_model(model, config, dataset, learning_rate, jit_compile="auto"):
    """Compiles `model` with the run's loss (`run_loss`), Adam at `learning_rate` and
    the metrics."""
    loss, weights = run_loss(config, dataset, len(model.outputs))
    metrics = metrics_lib.segmentation_metrics(
        dataset.n_label, dataset.class_names, config.data_format)
    if len(model.outputs) == 1:
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss,
                      metrics=metrics, jit_compile=jit_compile)
    else:  # deep supervision: outputs [main, dec2 head, dec3 head, ...]
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss=[loss] * len(model.outputs), loss_weights=weights,
            metrics=[metrics] + [[] for _ in model.outputs[1:]],
            jit_compile=jit_compile,
        )
    # The optimizer's variables now (in the caller's strategy scope), not in the first
    # traced training step: tf.function traces a step that creates variables twice
    # (once more without creating them), 1.9 s of a tiny 9.5 s run on 2 cores, and a
    # replicated multi-worker step cannot create them at all.
    model.optimizer.build(model.trainable_variables)


def run_loss(config, dataset, outputs=1):
    """`(loss, weights)`: the run's loss and each output's weight in the total (1 for
    the main output; with deep supervision, 0.5 ** (k - 1) for decoder level k)."""
    loss = losses_lib.get(config.loss, dataset.n_label, config.data_format)
    return loss, [DEEP_SUPERVISION_DECAY**index for index in range(outputs)]


def output_losses(config, dataset, outputs=1):
    """The run's loss of each output, unweighted, as a function `(targets,
    predictions) -> [float, ...]` of lists (one entry per output), outside any
    strategy; `run_loss`'s weights sum them into what `compile_model` trains on."""
    loss, _ = run_loss(config, dataset, outputs)

    def values(targets, predictions):
        result = []
        for target, prediction in zip(targets, predictions):
            prediction = keras.ops.cast(prediction, "float32")
            target = keras.ops.cast(keras.ops.convert_to_tensor(target), "float32")
            # `call` and a mean is the loss's sum_over_batch_size reduction, without
            # the per-replica scaling `__call__` applies inside a strategy's scope.
            result.append(float(keras.ops.mean(loss.call(target, prediction))))
        return result

    return values


def run_recorder(config, dataset, model, output, val_data, best=None, write=True):
    """The `recorder.RunRecorder` of a run (both loops): validation on `val_data`
    with the run's loss and metrics, the log, the best checkpoint and the backups."""
    losses = output_losses(config, dataset, len(model.outputs))
    _, weights = run_loss(config, dataset, len(model.outputs))

    def validate(model):
        return recorder_lib.validation_scores(model, val_data, losses, weights,
                                              dataset.n_label, dataset.class_names,
                                              config.data_format)

    return recorder_lib.RunRecorder(output, validate, recorder_lib.monitor_name(model),
                                    best=best, backup_every=config.backup_every,
                                    write=write)


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
    # Refused before even the lock is written.
    run_folder.check_output(config, output, overwrite)
    with runs.folder_lock(output):  # one writer: a second train here is refused
        return _train_locked(config, output, overwrite, verbose)


def _train_locked(config, output, overwrite, verbose):
    from attunet_keras import distribute

    # Every check first; the run folder is written only once they have all passed.
    resuming = run_folder.check_output(config, output, overwrite)
    config, dataset = run_dataset(config, output, resuming)
    check_backbone_weights(config)
    check_init_from(config, dataset)
    strategy = distribute.get_strategy(config.strategy)
    global_batch, steps = batching(config, strategy, dataset)
    jit_compile = distribute.resolve_jit_compile(config.jit_compile, strategy)
    commit_splits(config)
    run_folder.start_output(config, output, overwrite, resuming)
    record_plan(dataset, output)
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
    were options (`config_lib.UNRECORDED`)."""
    if resuming:
        recorded = read_config(output)
        written = config_lib.read_json_object(os.path.join(output, run_folder.CONFIG_FILE))
        kept = {key: getattr(recorded, key) for key in config_lib.UNRECORDED
                if key not in written}
        if config.val_files is None:
            kept["val_files"] = recorded.val_files
        config = dataclasses.replace(config, **kept)
    if config.folds is not None and config.val_files is None:
        _, val_files = fold_split(config)
        config = dataclasses.replace(config, val_files=val_files)
    dataset = load_data(config, run_dir=output if resuming else None)
    plan = getattr(dataset, "plan", None)
    if plan is not None and config.plan is not None and not resuming:
        # planning on the fly read every case; a plan from a file did not
        folder = data_lib.medical.describe(config.dataset)
        problems = data_lib.medical.label_values_problems(folder)
        if problems:
            raise ValueError(f"{config.dataset}: {len(problems)} problem(s) in the labels:\n"
                             + data_lib.medical.listing(problems))
    if plan is not None:
        if config.dims is not None and config.dims != dataset.dims:
            raise ValueError(f"dims={config.dims} but {config.dataset} holds "
                             f"{dataset.dims}D cases.")
        odd = [side for side in dataset.tile_shape if side % 2**config.depth]
        if odd:
            raise ValueError(
                f"the patch {'x'.join(map(str, dataset.tile_shape))} (of the plan, or "
                f"--tile) is not divisible by 2**depth={2**config.depth}; train with "
                f"--depth {plan['depth']} (the plan's) or give --tile.")
    if dataset.dims == 3 and config.backbone is not None:
        raise ValueError(f"{config.dataset} holds volumes; backbones are 2D "
                         "keras.applications encoders, so att_unet_3d trains without one.")
    if config.dataset not in data_lib.BUILTIN:
        config = dataclasses.replace(config, val_files=dataset.val_names)
    return config, dataset


def record_plan(dataset, output):
    """Writes a Decathlon / nnU-Net dataset's plan into the run folder (`plan.json`),
    which `evaluate`, `predict` and a resumed run read from then on."""
    plan = getattr(dataset, "plan", None)
    path = os.path.join(output, data_lib.planning.PLAN_FILE)
    if plan is not None and not os.path.isfile(path):
        data_lib.planning.write_plan(plan, path)


def fold_split(config):
    """`(splits, held-out files)` of a `--folds` run: the splits written beside the run
    (or at `--splits`), else a new draw that `commit_splits` writes once the run has
    passed its checks."""
    from attunet_keras import folds

    names = data_lib.case_names(config.dataset)
    return folds.fold_split(names, config.folds, config.fold, config.seed,
                            folds.splits_path(config.output, config.splits))


def commit_splits(config):
    """Writes the splits of a `--folds` run where the other folds will read them."""
    if config.folds is not None:
        from attunet_keras import folds

        folds.commit(folds.splits_path(config.output, config.splits),
                     fold_split(config)[0])


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
    backup_dir = os.path.join(output, run_folder.BACKUP_DIR)
    progress = run_folder.backup_progress(backup_dir) if resuming else None
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
    monitor = recorder_lib.monitor_name(model)

    resumed_epoch = run_folder.restore_backup(model, backup_dir) if resuming else 0
    log_path = os.path.join(output, run_folder.LOG_FILE)
    best_so_far = run_folder.trim_log(log_path, resumed_epoch, monitor)
    best_path = os.path.join(output, run_folder.BEST_MODEL)
    if resuming and run_folder.drop_broken_checkpoint(best_path):
        print(f"{best_path} was cut short (killed while it was written): removed; the "
              "next epoch writes a new best checkpoint")
        best_so_far = None
    recorder = run_recorder(config, dataset, model, output, val_data, best=best_so_far)
    # The recorder first: it adds the epoch's validation scores to the logs the
    # TensorBoard callback and the progress bar show.
    callbacks = [recorder, keras.callbacks.TensorBoard(os.path.join(output, "tensorboard"))]
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

    for first, last, stage_frozen in _stages(config, resumed_epoch):
        if frozen and not stage_frozen:
            with strategy.scope():
                unfreeze(model, config, dataset, jit_compile)
            frozen = False
            print(f"Epoch {first + 1}: encoder unfrozen; learning rate "
                  f"{config.learning_rate * FINE_TUNE_LEARNING_RATE_FACTOR:g}")
        with stop_on_read_failure(backup_dir):
            model.fit(train_data, epochs=last, initial_epoch=first, steps_per_epoch=steps,
                      callbacks=callbacks, verbose=verbose, shuffle=False)
        if recorder.nan_epoch is not None:
            raise nan_stop(recorder.nan_epoch, config, output)
    model.save(os.path.join(output, run_folder.LAST_MODEL))
    result = finish_result(output, evaluate_run(output, dataset=dataset))
    shutil.rmtree(backup_dir, ignore_errors=True)
    return result


def finish_result(output, result):
    """Writes a finished run's `summary.json` / `summary.csv` (per case) and its
    `result.json` (dataset-wide; written last: it marks the run finished); returns the
    result."""
    evaluation.write_summary(output, result.pop("summary"))
    runs.write_json(os.path.join(output, run_folder.RESULT_FILE), result)
    return result


def nan_stop(epoch, config, output):
    """The error of a run stopped by a NaN loss in `epoch` (1-based), both loops."""
    return RuntimeError(
        f"training stopped: the loss became NaN in epoch {epoch}; lower --learning-rate "
        f"(was {config.learning_rate}). Nothing is saved beyond the last good checkpoint "
        f"{os.path.join(output, run_folder.BEST_MODEL)}.")


def validation_data(config, dataset, global_batch, outputs=1):
    """The held-out batches every epoch of the run is validated on (both loops)."""
    return data_lib.validation_dataset(
        dataset, global_batch, data_format=config.data_format, outputs=outputs,
        batches=config.val_batches, seed=config.seed)


def calibration_patches(run_dir, count=64, seed=0):
    """`count` random training patches of a run, in its model's layout: the
    representative images of an int8 LiteRT export (`export --quantize int8`)."""
    config = read_config(run_dir)
    batches = data_lib.training_dataset(
        load_data(config, run_dir=run_dir), count, seed=seed, data_format=config.data_format,
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
    if run_folder.backup_progress(backup_dir):
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
