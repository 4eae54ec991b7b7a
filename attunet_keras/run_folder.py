"""A run folder's files and its resumable state.

A run lives in one output folder:

- `config.json`: the settings (`config.TrainConfig`); a second start with the same
  settings resumes, with other settings it is refused.
- `best.keras`: the model with the best held-out Dice so far; `last.keras` at the end.
- `log.csv` (one row per epoch) and `tensorboard/`.
- `backup/`: the resumable state: weights, optimizer state and progress, saved every
  `backup_every` steps and at every epoch end (`recorder.RunRecorder`), and removed
  when the run finishes. A run killed at any moment and started again with the same
  command goes on from the last backup: weights, optimizer state and epoch counter
  are restored, the log keeps each finished epoch once and the best checkpoint keeps
  its best score. The steps of the interrupted epoch are run again from the
  backed-up weights (at most `backup_every` steps of work are repeated on top of the
  epoch's start), with a fresh draw of training patches.
- `result.json`: the final held-out scores, written when training finishes.

One process writes a run folder at a time (`runs.folder_lock`, taken by `train`).
"""

import csv
import json
import os
import shutil

import keras

from attunet_keras import config as config_lib
from attunet_keras import data as data_lib
from attunet_keras import runs

CONFIG_FILE = config_lib.CONFIG_FILE
RESULT_FILE = "result.json"
BEST_MODEL = "best.keras"
LAST_MODEL = "last.keras"
LOG_FILE = "log.csv"
BACKUP_DIR = "backup"
_STATE = "state"
_WEIGHTS = "latest.weights.h5"
_PROGRESS = "progress.json"


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


def is_run_folder(folder):
    """True when `folder` holds a run of this package: a readable config.json and a log."""
    if not (os.path.isdir(folder) and os.path.isfile(os.path.join(folder, LOG_FILE))):
        return False
    try:
        config_lib.read_config(folder)
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
    previous = config_lib.read_json_object(config_path)
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
    if not names or not names <= {CONFIG_FILE, LOG_FILE, "tensorboard", PLAN_FILE}:
        return False
    try:
        config_lib.read_config(output)
    except (ValueError, FileNotFoundError):
        return False
    log = os.path.join(output, LOG_FILE)
    if os.path.isfile(log):
        with open(log) as file:
            if len(file.read().splitlines()) > 1:
                return False
    return True


# plan.json: the plan of a Decathlon / nnU-Net run (data.planning)
PLAN_FILE = "plan.json"
RUN_ENTRIES = (CONFIG_FILE, LOG_FILE, BEST_MODEL, LAST_MODEL, RESULT_FILE, BACKUP_DIR,
               "tensorboard", PLAN_FILE)


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
