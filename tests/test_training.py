"""Tests of attunet_keras.training: learning on real data, run folders, resuming."""

import csv
import re
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from attunet_keras import data
from attunet_keras import evaluation
from attunet_keras import inference
from attunet_keras import recorder as recorder_lib
from attunet_keras import run_folder
from attunet_keras import training
from helpers import kill_training_at
from helpers import write_pairs


def _numpy_dice(predicted, truth):
    """2 TP / (2 TP + FP + FN) of two boolean arrays; 1 when both are empty."""
    tp = np.sum(predicted & truth)
    denominator = 2 * tp + np.sum(predicted & ~truth) + np.sum(~predicted & truth)
    return 1.0 if denominator == 0 else 2 * tp / denominator


def _tiny_config(tmp_path, **changes):
    values = dict(dataset="nuclei", output=str(tmp_path / "run"), epochs=2,
                  steps_per_epoch=3, batch_size=4, learning_rate=1e-2, depth=2,
                  features=4, tile=64, seed=0, backup_every=1)
    values.update(changes)
    return training.TrainConfig(**values)


def _loss_before_and_after(config, dataset, steps):
    """Loss on a fixed training batch before and after `steps` steps of fit."""
    keras.utils.set_random_seed(config.seed)
    model = training.build_model(config, dataset)
    images, targets = next(iter(data.training_dataset(dataset, 8, seed=99)))
    before = float(model.evaluate(images, targets, verbose=0, return_dict=True)["loss"])
    model.fit(data.training_dataset(dataset, config.batch_size, seed=config.seed),
              steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
    after = float(model.evaluate(images, targets, verbose=0, return_dict=True)["loss"])
    return before, after


def test_loss_goes_down_on_nuclei(tmp_path):
    config = _tiny_config(tmp_path, features=8)
    before, after = _loss_before_and_after(config, data.nuclei(tile=64), steps=15)
    assert after < 0.9 * before


def test_loss_goes_down_on_brain(tmp_path):
    config = _tiny_config(tmp_path, dataset="brain", features=8)
    dataset = data.brain(scale=4)  # 48x64 slices keep the test short
    before, after = _loss_before_and_after(config, dataset, steps=15)
    assert after < 0.9 * before


def test_train_writes_a_complete_run_folder(tmp_path):
    config = _tiny_config(tmp_path)
    result = training.train(config, verbose=0)

    run = tmp_path / "run"
    assert {"config.json", "best.keras", "last.keras", "log.csv", "result.json",
            "tensorboard"} <= set(os.listdir(run))
    assert not (run / "backup").exists()  # removed when training finishes
    with open(run / "log.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert result["dataset"] == "nuclei" and result["held_out_images"] == 1
    # The held-out score is the Dice of best.keras on the whole held-out quarter,
    # counted here with NumPy from the blended windows' labels.
    dataset = data.nuclei(tile=64)
    image, truth = dataset.read(dataset.val[0])
    best = keras.saving.load_model(run / "best.keras")
    probabilities = inference.predict_sliding_window(best, image, 64, overlap=0.25,
                                                     batch_size=4, normalized=True)
    assert result["model"]["dice"] == pytest.approx(
        _numpy_dice(probabilities[..., 0] > 0.5, truth > 0), abs=1e-6)
    assert 0.8 < result["otsu"]["dice"] < 0.95  # Otsu on this image: about 0.85
    assert json.loads((run / "result.json").read_text()) == result
    keras.saving.load_model(run / "best.keras", safe_mode=True)


def test_a_finished_run_is_not_trained_again_nor_with_other_settings(tmp_path):
    config = _tiny_config(tmp_path, epochs=1, steps_per_epoch=1)
    training.train(config, verbose=0)
    with pytest.raises(ValueError, match="holds a finished run.*--overwrite"):
        training.train(config, verbose=0)
    with pytest.raises(ValueError, match=r"other settings \(learning_rate: 0.01 -> 0.5\)"):
        training.train(_tiny_config(tmp_path, epochs=1, steps_per_epoch=1,
                                    learning_rate=0.5), verbose=0)
    training.train(config, overwrite=True, verbose=0)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(epochs=0), r"epochs=0 is not allowed"),
        (dict(learning_rate=-1.0), r"learning_rate=-1.0 is not allowed"),
        (dict(loss="mse"), r"loss='mse' is not supported"),
        (dict(tile=62), r"tile=62 must be divisible by 2\*\*depth=4"),
        (dict(dataset="no/such/folder"), r"neither a built-in dataset"),
        (dict(n_label=2), r"n_label is fixed by the built-in dataset 'nuclei'"),
        (dict(data_format="NHWC"), r"data_format='NHWC' is not supported"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        training.train(_tiny_config(tmp_path, **changes), verbose=0)
    assert not (tmp_path / "run").exists()


def test_training_stops_with_a_clear_error_when_the_loss_becomes_nan(tmp_path,
                                                                     monkeypatch):
    def nan_times_prediction(y_true, y_pred):
        return keras.ops.mean(y_pred) * float("nan")

    def nan_loss(name, n_label, data_format=None):
        return nan_times_prediction

    monkeypatch.setattr(training.losses_lib, "get", nan_loss)
    with pytest.raises(RuntimeError, match="the loss became NaN"):
        training.train(_tiny_config(tmp_path), verbose=0)
    assert not (tmp_path / "run" / "result.json").exists()


def test_backup_restores_weights_optimizer_state_and_epoch(tmp_path):
    config = _tiny_config(tmp_path)
    dataset = data.nuclei(tile=64)
    keras.utils.set_random_seed(0)
    model = training.build_model(config, dataset)
    recorder = recorder_lib.RunRecorder(str(tmp_path), lambda model: {"val_dice": 0.5},
                                        backup_every=2)
    model.fit(data.training_dataset(dataset, 4), epochs=2,
              steps_per_epoch=3, verbose=0, shuffle=False, callbacks=[recorder])

    fresh = training.build_model(config, dataset)
    epoch = run_folder.restore_backup(fresh, str(tmp_path / "backup"))

    assert epoch == 2
    assert int(fresh.optimizer.iterations.numpy()) == 6
    for saved, restored in zip(model.weights + model.optimizer.variables,
                               fresh.weights + fresh.optimizer.variables):
        np.testing.assert_array_equal(saved.numpy(), restored.numpy())
    assert sorted(os.listdir(tmp_path / "backup")) == ["state"]


def _train_command(output, epochs):
    script = os.path.join(os.path.dirname(sys.executable), "attunet-keras")
    return [script, "train", "--dataset", "nuclei", "--output", str(output),
            "--epochs", str(epochs), "--steps-per-epoch", "8", "--batch-size", "4",
            "--depth", "2", "--features", "4", "--tile", "64", "--backup-every", "1"]


def test_a_killed_run_resumes_where_it_was(tmp_path):
    """SIGKILL a real training process mid-epoch, then run the same command again."""
    output = tmp_path / "run"
    command = _train_command(output, epochs=4)
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    # a backup taken inside the third epoch (epoch index 2)
    kill_training_at(command, output / "backup",
                     lambda progress: progress["epoch"] == 2 and progress["step"] >= 2,
                     "mid-epoch backup", seconds=240, env=environment)

    assert not (output / "result.json").exists()
    resume_epoch = run_folder.backup_progress(str(output / "backup"))["epoch"]
    assert resume_epoch >= 2  # two epochs done: not a restart from scratch
    with open(output / "log.csv") as file:
        epochs_before = [int(row["epoch"]) for row in csv.DictReader(file)]
    assert epochs_before[:resume_epoch] == list(range(resume_epoch))
    log_before = (output / "log.csv").read_bytes()

    # The run folder has one writer. While another process holds its lock (the lock
    # train takes), the same command is refused at once, naming the folder and holder,
    # and writes nothing; the holder killed, the kernel frees the lock.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from attunet_keras import runs\n"
         f"with runs.folder_lock({str(output)!r}):\n"
         "    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environment)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                 env=environment)
    finally:
        holder.kill()
        holder.wait()
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"attunet-keras train: error: run folder {output} is in use by process "
        f"{holder.pid}@")
    assert (output / "log.csv").read_bytes() == log_before

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600,
                             env=environment)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming {output} from its backup at epoch {resume_epoch + 1} of 4" in \
        resumed.stdout
    assert "Epoch 1/4" not in resumed.stdout
    assert f"Epoch {resume_epoch + 1}/4" in resumed.stdout
    with open(output / "log.csv") as file:
        epochs_after = [row["epoch"] for row in csv.DictReader(file)]
    assert epochs_after == ["0", "1", "2", "3"]  # every epoch logged once
    assert (output / "result.json").exists() and not (output / "backup").exists()


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match=r"is not a run of attunet_keras .* --overwrite "
                                         r"only replaces a run"):
        training.train(_tiny_config(tmp_path), overwrite=True, verbose=0)
    assert (folder / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("where", ["same", "parent"])
def test_the_run_folder_may_never_hold_the_dataset(tmp_path, where):
    from PIL import Image

    dataset = tmp_path / "set"
    for sub in ("images", "masks"):
        (dataset / sub).mkdir(parents=True)
        for name in ("a", "b"):
            Image.fromarray(np.zeros((64, 64), "uint8")).save(dataset / sub / f"{name}.png")
    output = dataset if where == "same" else tmp_path
    config = _tiny_config(tmp_path, dataset=str(dataset), n_label=1, output=str(output))
    with pytest.raises(ValueError, match=r"holds the dataset"):
        training.train(config, overwrite=True, verbose=0)
    assert sorted(os.listdir(dataset / "images")) == ["a.png", "b.png"]


def test_a_failed_start_writes_nothing(tmp_path):
    """The check that fails (a mask of another size, from the files' headers) needs
    the dataset indexed; the run folder is written only after it passed."""
    from PIL import Image

    dataset = tmp_path / "set"
    for sub in ("images", "masks"):
        (dataset / sub).mkdir(parents=True)
        for name in ("a", "b"):
            Image.fromarray(np.zeros((64, 64), "uint8")).save(dataset / sub / f"{name}.png")
    Image.fromarray(np.zeros((32, 64), "uint8")).save(dataset / "masks" / "b.png")
    config = _tiny_config(tmp_path, dataset=str(dataset), n_label=1, epochs=1,
                          steps_per_epoch=1)
    with pytest.raises(ValueError, match=r"b.png is 64x64 but .*b.png is 32x64"):
        training.train(config, verbose=0)
    assert not (tmp_path / "run").exists()
    Image.fromarray(np.zeros((64, 64), "uint8")).save(dataset / "masks" / "b.png")
    training.train(config, verbose=0)
    assert (tmp_path / "run" / "result.json").is_file()


@pytest.mark.parametrize("content, match", [
    ("{not json", r"config.json is not valid JSON"),
    ('{"model": "resnet", "lr": 1}', r"config.json is not the config.json of an "
                                     r"attunet_keras run"),
])
def test_a_corrupt_or_foreign_config_is_named(tmp_path, content, match):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        training.read_config(str(tmp_path))


def test_a_run_without_a_model_yet_says_so(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_tiny_config(tmp_path).to_json()))
    with pytest.raises(FileNotFoundError, match=r"holds no best.keras or last.keras yet"):
        training.load_run_model(str(tmp_path))


def test_a_corrupt_best_model_is_not_reported_as_missing(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_tiny_config(tmp_path).to_json()))
    (tmp_path / "best.keras").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"best.keras is not a Keras model file"):
        training.load_run_model(str(tmp_path))


def test_many_classes_skip_the_multi_otsu_baseline(tmp_path):
    from attunet_keras import models

    n_label = 7
    rng = np.random.default_rng(0)
    images = rng.random((2, 32, 32, 1)).astype("float32")
    masks = rng.integers(0, n_label, (2, 32, 32)).astype("uint8")
    dataset = data.from_arrays("seven", images, masks, images, masks, n_label,
                               tuple(f"c{i}" for i in range(n_label)))
    model = models.att_unet(32, 32, n_label, depth=2, features=4, in_channels=1,
                            data_format="channels_last", output_activation="softmax")
    result = evaluation.evaluate_model(model, dataset, _tiny_config(tmp_path))
    assert result["otsu"] is None
    assert "multi-Otsu is skipped above 5 classes" in result["otsu_note"]
    # dataset-wide Dice per class over both held-out images, then the mean of 1..6
    predicted = [inference.predict_sliding_window(model, image, (32, 32), overlap=0.25,
                                                  normalized=True).argmax(-1)
                 for image in images]
    per_class = [_numpy_dice(np.stack(predicted) == label, masks == label)
                 for label in range(1, n_label)]
    assert result["model"]["dice"] == pytest.approx(np.mean(per_class), abs=1e-6)


def test_a_model_of_another_task_is_refused(tmp_path):
    from attunet_keras import models

    dataset = data.nuclei(tile=64)
    three_classes = models.att_unet(64, 64, 3, depth=2, features=4, in_channels=1,
                                    output_activation="softmax")
    with pytest.raises(ValueError, match=r"gives 3 output channel\(s\) but the run's dataset "
                                         r"'nuclei' is binary .* another task"):
        evaluation.check_model_fits(three_classes, dataset)
    rgb = models.att_unet(64, 64, 1, depth=2, features=4, in_channels=3)
    with pytest.raises(ValueError, match=r"takes 3 input channel\(s\) but the run's images "
                                         r"have 1"):
        evaluation.check_model_fits(rgb, dataset)


def test_training_does_not_import_the_multiworker_loop():
    """The dependency is one way: multiworker uses training, never the reverse."""
    import ast

    tree = ast.parse(open(training.__file__).read())
    imported = {alias.name for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert "multiworker" not in imported and "attunet_keras.multiworker" not in imported
    with pytest.raises(ValueError, match=r"call attunet_keras.multiworker.train"):
        training.train(training.TrainConfig(strategy="multiworker"), verbose=0)


def test_evaluation_reports_hd95_per_class_in_pixels(tmp_path):
    """A model that returns its input, given the one-hot masks as images: a perfect
    prediction (HD95 0); then the same masks shifted 3 pixels (HD95 3, the squares
    of tests/test_metrics.py); an image with an empty class counts as MONAI's mean does."""
    masks = np.zeros((3, 32, 32), "uint8")
    masks[:, 4:14, 4:14] = 1
    masks[:2, 18:28, 18:28] = 2  # class 2 is empty in the third tile
    # one-hot, each class at its own intensity (so Otsu has three levels to split)
    one_hot = np.eye(3, dtype="float32")[masks] * np.array([0.2, 0.5, 0.9], "float32")
    inputs = keras.Input((32, 32, 3))
    identity = keras.layers.Conv2D(3, 1, use_bias=False)
    model = keras.Model(inputs, identity(inputs))
    identity.set_weights([np.eye(3, dtype="float32")[None, None]])
    dataset = data.from_arrays("squares", one_hot, masks, one_hot, masks, 3, ("bg", "a", "b"))
    scores = evaluation.evaluate_model(model, dataset, _tiny_config(tmp_path))["model"]
    assert scores["dice"] == 1.0
    assert scores["hd95_a"] == scores["hd95_b"] == scores["hd95"] == 0.0  # NaN image left out

    shifted = np.roll(one_hot, 3, axis=2)
    dataset = data.from_arrays("squares", one_hot, masks, shifted, masks, 3, ("bg", "a", "b"))
    scores = evaluation.evaluate_model(model, dataset, _tiny_config(tmp_path))["model"]
    assert scores["hd95_a"] == pytest.approx(3.0) and scores["hd95_b"] == pytest.approx(3.0)
    assert scores["hd95"] == pytest.approx(3.0)
    masks[2, 18:28, 18:28] = 2  # now the third image's prediction of class b is empty
    dataset = data.from_arrays("squares", one_hot, masks, shifted, masks, 3, ("bg", "a", "b"))
    scores = evaluation.evaluate_model(model, dataset, _tiny_config(tmp_path))["model"]
    assert scores["hd95_b"] == np.inf and scores["hd95_a"] == pytest.approx(3.0)


def test_constant_held_out_images_get_no_otsu_baseline_instead_of_an_error(tmp_path):
    from attunet_keras import models

    masks = np.zeros((2, 32, 32), "uint8")
    masks[:, 8:16, 8:16] = 1
    flat = np.full((2, 32, 32, 1), 0.5, "float32")
    dataset = data.from_arrays("flat", flat, masks, flat, masks, 3, ("bg", "a", "b"))
    model = models.att_unet(32, 32, 3, depth=2, features=4, in_channels=1,
                            data_format="channels_last", output_activation="softmax")
    result = evaluation.evaluate_model(model, dataset, _tiny_config(tmp_path))
    assert result["otsu"] is None
    assert result["otsu_note"].startswith("no Otsu baseline: ")
    assert set(result["model"]) >= {"dice", "hd95", "hd95_a", "hd95_b"}


def _folder(root, count, start=0):
    from PIL import Image

    rng = np.random.default_rng(start)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for index in range(start, start + count):
        image = (rng.random((64, 64)) * 255).astype("uint8")
        Image.fromarray(image).save(root / "images" / f"img{index:02d}.png")
        Image.fromarray((image > 128).astype("uint8")).save(
            root / "masks" / f"img{index:02d}.png")


def test_a_file_that_fails_mid_epoch_stops_training_naming_it(tmp_path):
    """A truncated PNG: its header reads (so indexing passes), its pixels do not."""
    dataset = tmp_path / "set"
    _folder(dataset, 4)
    bad = dataset / "images" / "img02.png"
    bad.write_bytes(bad.read_bytes()[:300])
    config = _tiny_config(tmp_path, dataset=str(dataset), n_label=1, epochs=1,
                          steps_per_epoch=4, val_files=["img00.png"])
    with pytest.raises(ValueError, match=r"training stopped: cannot read dataset item "
                                         r"'img02.png': .*img02.png: cannot be read as an "
                                         r"image .*check-data"):
        training.train(config, verbose=0)


def test_the_held_out_files_are_recorded_and_used_again(tmp_path):
    dataset = tmp_path / "set"
    _folder(dataset, 6)
    config = _tiny_config(tmp_path, dataset=str(dataset), n_label=1, epochs=1,
                          steps_per_epoch=1)
    result = training.train(config, verbose=0)
    recorded = training.read_config(str(tmp_path / "run")).val_files
    assert recorded == data.folder(str(dataset), 1, tile=64, seed=0).val_names
    assert len(recorded) == 1 and result["held_out_images"] == 1

    _folder(dataset, 5, start=6)  # new files change the seeded draw...
    assert data.folder(str(dataset), 1, tile=64, seed=0).val_names != recorded
    # ...but not the run's held-out files, for evaluation or a resumed run
    assert training.load_data(training.read_config(str(tmp_path / "run"))).val_names == \
        recorded
    _, resumed = training.run_dataset(config, str(tmp_path / "run"), resuming=True)
    assert resumed.val_names == recorded and len(resumed.train) == 10


def _backbone_config(tmp_path, weights):
    return _tiny_config(tmp_path, backbone="mobilenetv2", backbone_weights=str(weights),
                        depth=4, tile=64, epochs=1, steps_per_epoch=1)


def test_a_wrong_backbone_weights_file_is_refused_before_anything_is_written(tmp_path):
    text = tmp_path / "weights.h5"
    text.write_text("these are not weights")
    with pytest.raises(ValueError) as error:
        training.train(_backbone_config(tmp_path, text), verbose=0)
    message = str(error.value)
    assert message == (f"backbone_weights={text}: is not an HDF5 weights file (.h5 or "
                       ".weights.h5). Expected a weights file of keras.applications."
                       "MobileNetV2(include_top=False).")
    assert not (tmp_path / "run").exists()

    vgg = tmp_path / "vgg16_notop.weights.h5"
    keras.applications.VGG16(include_top=False, weights=None,
                             input_shape=(None, None, 3)).save_weights(vgg)
    with pytest.raises(ValueError) as error:
        training.train(_backbone_config(tmp_path, vgg), verbose=0)
    message = str(error.value)
    assert "\\n" not in message and len(message) < 400, message  # not a dump of 104 layers
    # VGG16 without its top: 13 convolutions, 5 poolings and the input
    assert message.startswith(f"backbone_weights={vgg}: holds the weights of 19 layers "
                              "(13 conv2d, 5 max_pooling2d, 1 input_layer), where this "
                              "network has ")
    assert "the weights of another network" in message
    assert not (tmp_path / "run").exists()


def test_a_start_that_failed_after_config_json_blocks_neither_a_rerun_nor_overwrite(
        tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the model could not be built")

    monkeypatch.setattr(training, "build_model", broken)
    with pytest.raises(RuntimeError, match="could not be built"):
        training.train(_tiny_config(tmp_path, epochs=3), verbose=0)
    assert (tmp_path / "run" / "config.json").is_file()
    with pytest.raises(RuntimeError, match="could not be built"):  # other settings
        training.train(_tiny_config(tmp_path, epochs=2), verbose=0, overwrite=True)
    monkeypatch.undo()
    # Other settings again, without --overwrite: nothing was trained, so it starts anew.
    result = training.train(_tiny_config(tmp_path, epochs=1, steps_per_epoch=1), verbose=0)
    assert 0.0 <= result["model"]["dice"] <= 1.0
    assert training.read_config(str(tmp_path / "run")).epochs == 1


def test_a_run_killed_in_its_final_evaluation_says_so_when_resumed(tmp_path, monkeypatch,
                                                                  capsys):
    evaluate_run = training.evaluate_run

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if stopped after the last epoch's backup

    monkeypatch.setattr(training, "evaluate_run", killed)
    config = _tiny_config(tmp_path, epochs=1, steps_per_epoch=1)
    with pytest.raises(KeyboardInterrupt):
        training.train(config, verbose=0)
    assert run_folder.backup_progress(str(tmp_path / "run" / "backup"))["epoch"] == 1
    monkeypatch.setattr(training, "evaluate_run", evaluate_run)
    capsys.readouterr()
    training.train(config, verbose=0)
    out = capsys.readouterr().out
    assert "all 1 epochs were trained; finishing with the final evaluation" in out
    assert "at epoch 2" not in out
    assert (tmp_path / "run" / "result.json").is_file()


def _truncated_folder(folder, count=8):
    """`count` image/mask pairs whose images are cut in half: the headers read (so the
    folder indexes), the pixels do not (so every read fails inside the pipeline)."""
    write_pairs(folder, count)
    for path in (folder / "images").iterdir():
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    return folder


def test_a_reader_failing_mid_epoch_ends_the_process_with_one_line(tmp_path):
    """The error used to be printed and the process then hung, in the tf.data iterator's
    destructor at interpreter exit (1 run in 2 here, and 3 in 3 with a broken cache)."""
    folder = _truncated_folder(tmp_path / "set")
    script = os.path.join(os.path.dirname(sys.executable), "attunet-keras")
    result = subprocess.run(
        [script, "train", "--dataset", str(folder), "--n-label", "1", "--output",
         str(tmp_path / "run"), "--epochs", "1", "--steps-per-epoch", "2", "--batch-size",
         "2", "--depth", "2", "--features", "4", "--tile", "32", "--verbose", "0"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert re.match(r"attunet-keras train: error: training stopped: cannot read dataset "
                    r"item 'im\d\.png': .*im\d\.png: cannot be read as an image", last), last
    assert last.endswith("no backup was taken yet, so it starts from the beginning.")


def test_two_runs_share_one_cache_at_once(tmp_path):
    """Two trains started together on one --cache: both finish, and every entry is
    whole (written under a temporary name and renamed, one writer per entry)."""
    folder = write_pairs(tmp_path / "set", 6, seed=1)
    script = os.path.join(os.path.dirname(sys.executable), "attunet-keras")
    commands = [[script, "train", "--dataset", str(folder), "--n-label", "1", "--output",
                 str(tmp_path / f"run{index}"), "--epochs", "1", "--steps-per-epoch", "2",
                 "--batch-size", "2", "--depth", "2", "--features", "4", "--tile", "32",
                 "--verbose", "0", "--cache", str(tmp_path / "cache"), "--seed", str(index)]
                for index in range(2)]
    processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for command in commands]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
    names = sorted(os.listdir(tmp_path / "cache"))
    assert len(names) == 6 and all(name.endswith(".pair.npz") and not name.startswith(".")
                                   for name in names)  # no temporary file or lock left
    for name in names:
        with np.load(tmp_path / "cache" / name) as entry:
            assert entry["image"].shape == (64, 64, 1) and entry["mask"].shape == (64, 64)


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_the_recorder_s_validation_equals_keras_evaluate_on_the_same_batches(
        tmp_path, deep_supervision):
    """Both loops validate each epoch with `recorder.validation_scores` on
    `validation_data`: its loss and Dice are Keras's compiled loss (every output,
    weighted) and the main output's metrics on those batches."""
    config = _tiny_config(tmp_path, val_batches=1, deep_supervision=deep_supervision)
    dataset = data.nuclei(tile=64)
    model = training.build_model(config, dataset)
    outputs = len(model.outputs)
    val_data = training.validation_data(config, dataset, 4, outputs)
    evaluated = model.evaluate(val_data, return_dict=True, verbose=0)
    _, weights = training.run_loss(config, dataset, outputs)
    scores = recorder_lib.validation_scores(
        model, val_data, training.output_losses(config, dataset, outputs), weights,
        dataset.n_label, dataset.class_names, config.data_format)
    prefix = recorder_lib.metric_prefix(model)
    assert (prefix != "") == deep_supervision and outputs == (2 if deep_supervision else 1)
    assert scores["val_loss"] == pytest.approx(evaluated["loss"], rel=1e-5)
    for name in model.output_names if deep_supervision else ():  # each output's own
        assert scores[f"val_{name}_loss"] == pytest.approx(evaluated[f"{name}_loss"],
                                                           rel=1e-5)
    for name in ("dice", "iou"):
        assert scores[f"val_{prefix}{name}"] == pytest.approx(
            evaluated[prefix + name], abs=1e-6)
    assert recorder_lib.monitor_name(model) == f"val_{prefix}dice"
    assert sum(x.shape[0] for x, _ in val_data) == 4  # 1 batch of 4, not the 16 tiles


def test_one_recorder_picks_the_same_best_epoch_and_log_under_both_loops(tmp_path):
    """The recorder given one fixed sequence of val_dice values, under `fit` and under
    the multi-worker loop's `run_epochs` (here in one process, on the default
    strategy): the same best epoch (the first of two equal best scores), the same
    log.csv columns and rows, and best.keras holding that epoch's weights."""
    from attunet_keras import multiworker

    config = _tiny_config(tmp_path, epochs=4, steps_per_epoch=2)
    dataset = data.nuclei(tile=64)
    sequence = [0.2, 0.6, 0.4, 0.6]  # best: epoch 1 (epoch 3 only equals it)
    results = {}
    for loop in ("fit", "run_epochs"):
        output = tmp_path / loop
        output.mkdir()
        keras.utils.set_random_seed(0)
        model = training.build_model(config, dataset)
        snapshots = []

        def validate(model):
            snapshots.append(model.get_weights())
            return {"val_loss": 1.0 - sequence[len(snapshots) - 1],
                    "val_dice": sequence[len(snapshots) - 1]}

        recorder = recorder_lib.RunRecorder(str(output), validate, backup_every=100)
        batches = data.training_dataset(dataset, 4, seed=0)
        if loop == "fit":
            model.fit(batches, epochs=4, steps_per_epoch=2, callbacks=[recorder],
                      verbose=0, shuffle=False)
        else:
            iterator = iter(batches)

            def step():
                images, targets = next(iterator)
                return float(model.train_on_batch(images, targets, return_dict=True)["loss"])

            multiworker.run_epochs(model, recorder, step, 0, 4, 2, say=lambda *a: None)
        with open(output / "log.csv") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
        best = keras.saving.load_model(output / "best.keras").get_weights()
        for saved, expected in zip(best, snapshots[1]):
            np.testing.assert_array_equal(saved, expected)
        assert not np.array_equal(snapshots[1][0], snapshots[3][0])  # weights moved on
        results[loop] = (recorder.best_epoch, recorder.best, reader.fieldnames,
                         [(row["epoch"], row["val_dice"]) for row in rows])
    assert results["fit"] == results["run_epochs"]
    best_epoch, best, fields, rows = results["fit"]
    assert (best_epoch, best) == (1, 0.6)
    assert fields == ["epoch", "loss", "dice", "iou", "val_loss", "val_dice"]
    assert rows == [(str(epoch), str(value)) for epoch, value in enumerate(sequence)]


def test_a_nan_loss_stops_the_multiworker_loop_at_once_without_a_backup(tmp_path):
    from attunet_keras import multiworker

    config = _tiny_config(tmp_path)
    dataset = data.nuclei(tile=64)
    model = training.build_model(config, dataset)
    recorder = recorder_lib.RunRecorder(str(tmp_path), lambda model: {"val_dice": 0.5},
                                        backup_every=1)
    losses = iter([0.5, float("nan"), 0.4, 0.3])
    multiworker.run_epochs(model, recorder, lambda: next(losses), 0, 3, 2,
                           say=lambda *a: None)
    assert recorder.nan_epoch == 1 and next(losses) == 0.4  # no step after the NaN
    # The step before the NaN was backed up; nothing of the NaN epoch was logged.
    assert run_folder.backup_progress(str(tmp_path / "backup"))["step"] == 1
    assert not (tmp_path / "log.csv").exists() and not (tmp_path / "best.keras").exists()


def test_a_log_of_other_columns_is_rewritten_with_the_new_ones(tmp_path):
    """A run recorded by an older version (other columns) goes on with the new ones:
    its epochs keep their values, a column they lack reads nan."""
    log = tmp_path / "log.csv"
    log.write_text("epoch,loss,val_dice\n0,0.9,0.2\n")
    recorder_lib.append_log(str(log), {"epoch": 1, "loss": 0.8, "val_loss": 0.7,
                                       "val_dice": 0.3})
    assert log.read_text().splitlines() == [
        "epoch,loss,val_loss,val_dice", "0,0.9,nan,0.2", "1,0.8,0.7,0.3"]
    assert run_folder.trim_log(str(log), 2, "val_dice") == 0.3


def test_a_log_row_or_checkpoint_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("epoch,loss,val_dice\n0,0.9,0.2\n1,0.8,0.4\n2,0.7")  # row 2 cut short
    assert run_folder.trim_log(str(log), 3, "val_dice") == 0.4
    assert log.read_text().splitlines() == ["epoch,loss,val_dice", "0,0.9,0.2", "1,0.8,0.4"]
    assert run_folder.trim_log(str(log), 1, "val_dice") == 0.2  # epochs from 1 run again
    assert log.read_text().splitlines() == ["epoch,loss,val_dice", "0,0.9,0.2"]
    best = tmp_path / "best.keras"
    keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]).save(best)
    assert not run_folder.drop_broken_checkpoint(str(best)) and best.is_file()
    best.write_bytes(best.read_bytes()[:200])
    assert run_folder.drop_broken_checkpoint(str(best)) and not best.exists()


def test_a_start_killed_before_its_first_backup_keeps_the_user_s_files(tmp_path):
    """Same settings, no backup yet (killed within its first steps), and a file of the
    user's in the run folder: the new start removes only the run's own files."""
    config = _tiny_config(tmp_path, epochs=1, steps_per_epoch=1)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config.to_json()))
    (run / "log.csv").write_text("epoch,loss\n")
    (run / "notes.txt").write_text("mine")
    training.train(config, verbose=0)
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "result.json").is_file()


def test_a_run_recorded_before_val_batches_resumes_validating_every_tile(tmp_path):
    values = _tiny_config(tmp_path).to_json()
    del values["val_batches"]  # as runs were recorded before the option
    (tmp_path / "config.json").write_text(json.dumps(values))
    assert training.read_config(str(tmp_path)).val_batches is None
    config, _ = training.run_dataset(_tiny_config(tmp_path), str(tmp_path), resuming=True)
    assert config.val_batches is None
