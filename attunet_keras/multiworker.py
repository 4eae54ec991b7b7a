"""Multi-worker training with MultiWorkerMirroredStrategy and a custom training step.

Keras 3's `fit` fails under `MultiWorkerMirroredStrategy` (keras-team/keras#20585), so
`attunet-keras train --strategy multiworker` runs its own loop instead: the optimizer's
variables are created before the step is traced, each step runs the model and
`model.compute_loss` (which divides the loss by the replica count) under
`strategy.run`, and the Keras optimizer sums the gradients across workers. Every epoch ends in the
same `recorder.RunRecorder` as under `fit` (validation on the same fixed held-out
batches, the log, the best checkpoint, the backups, the NaN stop). The run
folder is the same as for `fit`: worker 0 (the chief) writes the log, the best
checkpoint, the resumable backups and the result; every worker also writes its final
weights to `workers/worker{index}.weights.h5`.

Start one process per worker with the same command and a `TF_CONFIG` naming the
cluster and that process's index, e.g. for two workers on one machine:

    TF_CONFIG='{"cluster": {"worker": ["localhost:12345", "localhost:12346"]},
                "task": {"type": "worker", "index": 0}}' attunet-keras train ...
    TF_CONFIG='{... "task": {"type": "worker", "index": 1}}' attunet-keras train ...

`--batch-size` is per worker replica. Each worker reads a disjoint share of the
training files, every worker-count-th file of the index (`Dataset.shard` on the file
index inside `distribute_datasets_from_function`, before anything is decoded;
tf.distribute's auto-shard policy does not apply there). With fewer training images
than workers (the one-image `nuclei` set) every worker reads the same global batches
and keeps its own slice. Before it starts, a worker checks that it can
listen on its own port (and stops naming the port when it cannot); every worker then
waits at most `cluster_timeout` seconds (`--cluster-timeout`) for the others to join,
and stops with a message naming the cluster when they do not. TensorFlow's wait for
the cluster cannot be interrupted, so a watchdog process prints the message and ends
the waiting process (SIGKILL, exit status 137).
When a worker dies later, the others stop with an error within
`COLLECTIVE_TIMEOUT_SECONDS`; starting every worker again with the same command
resumes from the chief's last backup.
"""

import contextlib
import json
import os
import shutil
import socket
import sys

import keras
import numpy as np

from attunet_keras import data as data_lib
from attunet_keras import distribute
from attunet_keras import evaluation
from attunet_keras import recorder as recorder_lib
from attunet_keras import run_folder
from attunet_keras import runs
from attunet_keras import training

COLLECTIVE_TIMEOUT_SECONDS = 60
CLUSTER_TIMEOUT_SECONDS = 300


def task():
    """`(type, index)` of this process from `TF_CONFIG`."""
    try:
        spec = json.loads(os.environ["TF_CONFIG"])
        return spec["task"]["type"], int(spec["task"]["index"])
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError(
            "TF_CONFIG must be JSON with 'cluster' and 'task': {'type': 'worker', "
            f"'index': N}} ({error!r})."
        ) from error


def own_address():
    """`host:port` of this worker in `TF_CONFIG`'s cluster."""
    task_type, task_index = task()
    try:
        return json.loads(os.environ["TF_CONFIG"])["cluster"][task_type][task_index]
    except (KeyError, IndexError, TypeError) as error:
        raise ValueError(
            f"TF_CONFIG's cluster has no address for task {task_type} {task_index} "
            f"({error!r})."
        ) from error


def check_port_free(address):
    """Raises a RuntimeError naming the port when this process cannot listen on it."""
    host, _, port = address.rpartition(":")
    try:
        port = int(port)
    except ValueError:
        raise ValueError(f"TF_CONFIG address {address!r} has no port number.") from None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host.strip("[]") or "localhost", port))
        except OSError as error:
            raise RuntimeError(
                f"this worker cannot listen on {address} (port {port}): "
                f"{error.strerror or error}. Free the port or give this worker another "
                "one in every worker's TF_CONFIG."
            ) from error


# Run by `deadline` in a process of its own: TensorFlow holds the interpreter lock while
# it waits for the cluster, so no thread of the waiting process can act.
_WATCHDOG = """
import os, signal, sys, time
pid, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
time.sleep(seconds)
sys.stderr.write("attunet-keras train: error: " + message + "\\n")
sys.stderr.flush()
os.kill(pid, signal.SIGKILL)
"""


@contextlib.contextmanager
def deadline(seconds, message):
    """Ends this process with `message` unless the block finishes within `seconds`.

    For waits inside TensorFlow's C++ runtime, which hold the interpreter lock and
    ignore SIGTERM: a watchdog process prints `message` and kills this one (SIGKILL,
    exit status 137 in a shell).
    """
    import subprocess

    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(seconds), message],
        stdin=subprocess.DEVNULL)
    try:
        yield
    finally:
        watchdog.kill()
        watchdog.wait()


def is_chief(task_type, task_index):
    return task_type == "chief" or (task_type == "worker" and task_index == 0)


def train(config, *, overwrite=False, verbose="auto", cluster_timeout=CLUSTER_TIMEOUT_SECONDS):
    """Trains (or resumes) `config` as one worker of a multi-worker cluster.

    Args:
        config: training.TrainConfig with `strategy="multiworker"`.
        overwrite: bool. Replace an earlier run in the output folder (chief only).
        verbose: Keras-style verbosity.
        cluster_timeout: int. Seconds to wait for every worker to join; past them
            the process stops (exit 2) with a message naming the cluster.
    """
    from attunet_keras import distribute

    config.validate()
    distribute.check_strategy_backend(config.strategy)
    import tensorflow as tf

    if "TF_CONFIG" not in os.environ:
        raise ValueError(
            "strategy='multiworker' needs the TF_CONFIG environment variable (cluster "
            "addresses and this worker's index); see attunet_keras.multiworker."
        )
    if config.strategy != "multiworker":
        raise ValueError(f"multiworker.train needs strategy='multiworker', not "
                         f"{config.strategy!r}.")
    task_type, task_index = task()
    chief = is_chief(task_type, task_index)
    address = own_address()
    check_port_free(address)
    output = os.path.abspath(config.output)
    if chief:
        resuming = run_folder.check_output(config, output, overwrite)
    else:
        resuming = run_folder.backup_progress(os.path.join(output, run_folder.BACKUP_DIR)) \
            is not None
    config, dataset = training.run_dataset(config, output, resuming)
    training.check_backbone_weights(config)
    training.check_init_from(config, dataset)
    cluster = json.loads(os.environ["TF_CONFIG"])["cluster"]
    with deadline(cluster_timeout,
                  f"worker {task_index} ({address}): the other workers of {cluster} did "
                  f"not join within {cluster_timeout} s (--cluster-timeout). Check that "
                  "every worker was started with the same TF_CONFIG and can reach the "
                  "others' ports."):
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                timeout_seconds=COLLECTIVE_TIMEOUT_SECONDS))
    global_batch, steps = training.batching(config, strategy, dataset)
    # The chief is the run folder's one writer: it takes the lock once the cluster has
    # formed (a worker ended while waiting for it leaves nothing behind) and checks the
    # folder again under it; the other workers write nothing there.
    with runs.folder_lock(output) if chief else contextlib.nullcontext():
        if chief and run_folder.check_output(config, output, overwrite) != resuming:
            raise ValueError(f"output {output} changed while the workers joined (another "
                             "process wrote to it); run the command again.")
        if chief:
            training.commit_splits(config)
            run_folder.start_output(config, output, overwrite, resuming)
        return _run_guarded(config, output, resuming, dataset, strategy, global_batch,
                            steps, chief, task_index, verbose)


def _run_guarded(config, output, resuming, dataset, strategy, global_batch, steps, chief,
                 task_index, verbose):
    """`_run` under the run's precision, with a lost peer turned into one error."""
    import tensorflow as tf

    with distribute.precision_policy(config.precision):
        try:
            with training.stop_on_read_failure(os.path.join(output, run_folder.BACKUP_DIR)):
                return _run(config, output, resuming, dataset, strategy, global_batch,
                            steps, chief, task_index, verbose)
        except tf.errors.OpError as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            detail = lines[-1][:300] if lines else ""
            raise RuntimeError(
                f"worker {task_index} lost contact with the other workers "
                f"({type(error).__name__}: {detail}). Start every worker again with "
                "the same command to resume from the last backup."
            ) from error


def _run(config, output, resuming, dataset, strategy, global_batch, steps, chief,
         task_index, verbose):
    import tensorflow as tf

    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        # compiled with the optimizer's variables built: they cannot be created
        # inside the traced, replicated step
        model = training.build_model(config, dataset, jit_compile=False)
    outputs = len(model.outputs)
    backup_dir = os.path.join(output, run_folder.BACKUP_DIR)
    resumed_epoch = run_folder.restore_backup(model, backup_dir) if resuming else 0
    monitor = recorder_lib.monitor_name(model)
    best_path = os.path.join(output, run_folder.BEST_MODEL)
    best = None
    if chief:
        best = run_folder.trim_log(os.path.join(output, run_folder.LOG_FILE),
                                   resumed_epoch, monitor)
        if resuming and run_folder.drop_broken_checkpoint(best_path):
            best = None

    def dataset_fn(context):
        # No auto-sharding applies to distribute_datasets_from_function: each worker's
        # pipeline shards the file index itself, so it decodes only its own files.
        per_replica = context.get_per_replica_batch_size(global_batch)
        options = dict(seed=config.seed, data_format=config.data_format, outputs=outputs,
                       patches_per_image=config.patches_per_image,
                       foreground_fraction=config.foreground_fraction)
        if len(dataset.train) >= context.num_input_pipelines:
            return data_lib.training_dataset(
                dataset, per_replica,
                shard=(context.num_input_pipelines, context.input_pipeline_id), **options)
        # Fewer training images than workers (the one-image nuclei set): every worker
        # reads the same global batches and keeps its own slice.
        start = context.input_pipeline_id * per_replica
        batches = data_lib.training_dataset(dataset, global_batch, **options)
        return batches.map(lambda images, targets: tf.nest.map_structure(
            lambda tensor: tensor[start:start + per_replica], (images, targets)))

    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    # Every worker validates on the same fixed held-out batches as a fit run does, and
    # ends its epochs in the same recorder; only the chief writes.
    val_data = training.validation_data(config, dataset, global_batch, outputs)
    recorder = training.run_recorder(config, dataset, model, output, val_data, best=best,
                                     write=chief)

    @tf.function
    def train_step(iterator):
        def step(images, targets):
            with tf.GradientTape() as tape:
                predictions = model(images, training=True)
                loss = model.compute_loss(x=images, y=targets, y_pred=predictions,
                                          training=True)
                scaled = model.optimizer.scale_loss(loss)
            gradients = tape.gradient(scaled, model.trainable_variables)
            model.optimizer.apply_gradients(zip(gradients, model.trainable_variables))
            # The compiled metrics on the training batches, per replica, as Keras's own
            # train_step updates them; `run_epochs` reads them summed over replicas.
            model.compute_metrics(images, targets, predictions)
            return loss

        per_replica_loss = strategy.run(step, args=next(iterator))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_loss, axis=None)

    say = print if chief and verbose != 0 else (lambda *args, **kwargs: None)
    training.describe_dataset(dataset, config, say)
    say(f"Strategy {distribute.describe(strategy)}; global batch {global_batch} "
        f"({config.batch_size} per replica); precision {config.precision}")
    if resuming:
        print(f"Worker {task_index}: resuming {output} from its backup at epoch "
              f"{resumed_epoch + 1}")
    run_epochs(model, recorder, lambda: float(train_step(iterator)), resumed_epoch,
               config.epochs, steps, say)
    if recorder.nan_epoch is not None:
        raise training.nan_stop(recorder.nan_epoch, config, output)

    workers_dir = os.path.join(output, "workers")
    os.makedirs(workers_dir, exist_ok=True)
    model.save_weights(os.path.join(workers_dir, f"worker{task_index}.weights.h5"))
    result = evaluation.evaluate_model(model, dataset, config)
    if chief:
        model.save(os.path.join(output, run_folder.LAST_MODEL))
        best_result = training.finish_result(output, evaluation.evaluate_run(
            output, dataset=dataset))
        shutil.rmtree(backup_dir, ignore_errors=True)
        return best_result
    return result


def run_epochs(model, recorder, train_step, first_epoch, epochs, steps, say=print):
    """The multi-worker loop's epochs: `steps` calls of `train_step() -> loss` each
    (which also updates the model's compiled metrics), with the `recorder.RunRecorder`
    called as `fit` calls its callbacks (it validates, logs, checkpoints, backs up,
    and stops on NaN). Every worker runs it in step: reading the metrics sums them
    over the replicas of all workers."""
    recorder.set_model(model)
    model.stop_training = False
    for epoch in range(first_epoch, epochs):
        model.reset_metrics()
        recorder.on_epoch_begin(epoch)
        losses = []
        for step_index in range(steps):
            losses.append(train_step())
            recorder.on_train_batch_end(step_index, {"loss": losses[-1]})
            if model.stop_training:
                return
        # As fit's epoch logs: the compiled metrics, with the epoch's mean loss (the
        # steps' batches are all of one size).
        logs = {name: float(value) for name, value in model.get_metrics_result().items()}
        logs["loss"] = float(np.mean(losses))
        recorder.on_epoch_end(epoch, logs)
        if model.stop_training:
            return
        say(f"Epoch {epoch + 1}/{epochs} - " + " - ".join(
            f"{name} {value:.4f}" for name, value in logs.items()))
