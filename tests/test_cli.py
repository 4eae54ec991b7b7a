"""The attunet-keras command line."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from attunet_keras import cli
from attunet_keras import commands
from attunet_keras import visualize

TINY = ["--img-w", "32", "--img-h", "32", "--depth", "2", "--features", "4"]


def _console_script():
    script = os.path.join(os.path.dirname(sys.executable), "attunet-keras")
    return script if os.path.exists(script) else shutil.which("attunet-keras")


def test_console_script_help_explains_the_subcommands():
    result = subprocess.run([_console_script(), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    for command in ("summary", "plot", "export"):
        assert command in result.stdout


def test_subcommand_help_lists_the_model_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--img-w", "--img-h", "--n-label", "--depth", "--features",
                   "--data-format", "--in-channels", "--output", "--overwrite"):
        assert option in text


def test_summary_prints_the_reference_parameter_count():
    result = subprocess.run([_console_script(), "summary"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    # reference summary: Total params: 7,977,941
    assert "Parameters: 7,977,941" in result.stdout
    assert "dec4_gate_sigmoid" in result.stdout


def test_summary_takes_the_builder_arguments(capsys):
    assert cli.main(["summary", *TINY, "--data-format", "channels_last",
                     "--n-label", "3", "--in-channels", "1"]) == 0
    text = capsys.readouterr().out
    assert "(None, 32, 32, 1)" in text and "(None, 32, 32, 3)" in text


def test_plot_writes_the_image(tmp_path, capsys):
    output = tmp_path / "model.svg"
    tiny = ["--img-w", "64", "--img-h", "64", "--depth", "2", "--features", "4"]
    assert cli.main(["plot", *tiny, "--output", str(output)]) == 0
    svg = output.read_text()
    assert "<svg" in svg and "dec2_gate_sigmoid" in svg
    assert "polyline" not in capsys.readouterr().out


def test_export_writes_a_checked_saved_model(tmp_path, capsys):
    output = tmp_path / "saved"
    assert cli.main(["export", *TINY, "--img-w", "none", "--output", str(output)]) == 0
    assert (output / "1" / "saved_model.pb").is_file()
    assert "max |export - keras|" in capsys.readouterr().out


def test_export_of_a_saved_keras_model(tmp_path, capsys):
    from attunet_keras import models

    path = tmp_path / "trained.keras"
    models.att_unet(32, 32, 1, depth=2, features=4).save(path)
    output = tmp_path / "saved"
    assert cli.main(["export", "--model", str(path), "--output", str(output)]) == 0
    assert (output / "1" / "saved_model.pb").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["summary", "--img-w", "100"], "img_w=100 must be divisible by 2**depth=16"),
        (["summary", "--features", "1"], "features=1 is not allowed"),
        (["summary", "--model", "missing.keras"], "missing.keras: no such file"),
        (["plot", "--output", "model.bmp"], "has extension '.bmp'"),
    ],
)
def test_bad_arguments_exit_2_with_one_clear_message(argv, message, capsys, tmp_path,
                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_existing_output_is_refused_before_building(tmp_path, capsys, monkeypatch):
    output = tmp_path / "saved"
    output.mkdir()
    monkeypatch.setattr(commands, "_load_or_build", lambda args: pytest.fail("built"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--output", str(output)])
    assert exit_info.value.code == 2
    assert "already exists" in capsys.readouterr().err


def test_size_none_is_accepted_and_garbage_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["summary", "--img-w", "big"])
    assert exit_info.value.code == 2
    assert "expected an integer or 'none'" in capsys.readouterr().err


def test_plot_falls_back_to_polyline_when_graphviz_ortho_fails(tmp_path, capsys):
    # Graphviz's orthogonal router aborts on this tiny graph (maze.c: chkSgraph).
    output = tmp_path / "tiny.png"
    assert cli.main(["plot", *TINY, "--output", str(output)]) == 0
    assert output.read_bytes()[:4] == b"\x89PNG"
    assert "polyline" in capsys.readouterr().out


TINY_TRAIN = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4",
              "--depth", "2", "--features", "4", "--tile", "64", "--verbose", "0"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished tiny training run on nuclei, made through the command line."""
    run = tmp_path_factory.mktemp("cli") / "run"
    assert cli.main(["train", "--dataset", "nuclei", "--output", str(run),
                     *TINY_TRAIN]) == 0
    return run


def test_train_prints_held_out_scores_next_to_otsu(tiny_run, capsys):
    assert cli.main(["evaluate", str(tiny_run)]) == 0
    text = capsys.readouterr().out
    assert "Held-out scores on nuclei (1 whole image)" in text
    assert "att_unet" in text and "Otsu" in text and "dice" in text


def test_evaluate_json(tiny_run, capsys):
    assert cli.main(["evaluate", str(tiny_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["model"]) == set(result["otsu"]) == {"dice", "iou", "hd95"}


def test_predict_writes_mask_and_overlay_for_held_out_images(tiny_run, tmp_path):
    output = tmp_path / "predictions"
    assert cli.main(["predict", "--run", str(tiny_run), "--output", str(output)]) == 0
    with Image.open(output / "nuclei_held_out_mask.png") as mask:
        assert mask.size == (128, 512)
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
    with Image.open(output / "nuclei_held_out_overlay.png") as overlay:
        assert overlay.mode == "RGB" and overlay.size == (128, 512)


def test_predict_on_a_folder_of_images(tiny_run, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, size in (("a.png", (40, 60)), ("b.png", (64, 64))):
        Image.fromarray((np.random.default_rng(0).random(size) * 255).astype("uint8")).save(
            folder / name)
    output = tmp_path / "out"
    model = tiny_run / "best.keras"
    assert cli.main(["predict", str(folder), "--model", str(model),
                     "--output", str(output)]) == 0
    assert sorted(os.listdir(output)) == ["a_mask.png", "a_overlay.png", "b_mask.png",
                                          "b_overlay.png"]
    with Image.open(output / "a_mask.png") as mask:
        assert mask.size == (60, 40)


def test_predict_by_sliding_windows_above_the_patch_size(tiny_run, tmp_path, capsys):
    from attunet_keras import data
    from attunet_keras import inference

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("large.png", (150, 100)), ("small.png", (40, 60))):
        Image.fromarray((rng.random(size) * 255).astype("uint8")).save(folder / name)
    output = tmp_path / "out"
    model_path = str(tiny_run / "best.keras")
    assert cli.main(["predict", str(folder), "--model", model_path, "--output", str(output),
                     "--patch", "64", "--overlap", "0.25", "--tta"]) == 0
    model = inference.load_model(model_path)
    for name, expected in (
            ("large", inference.predict_sliding_window(
                model, data.read_image(str(folder / "large.png")), 64, overlap=0.25,
                tta=True)),
            ("small", inference.predict_sliding_window(  # whole: one window, padded
                model, data.read_image(str(folder / "small.png")), (40, 60), tta=True))):
        with Image.open(output / f"{name}_mask.png") as mask:
            np.testing.assert_array_equal(
                np.asarray(mask), visualize.mask_png(
                    inference.labels_from_probabilities(expected), 1))
    with pytest.raises(SystemExit):
        cli.main(["predict", str(folder), "--model", model_path, "--output",
                  str(tmp_path / "other"), "--patch", "30"])
    assert "patch_size=30 is not allowed" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_attention_writes_one_figure(tiny_run, tmp_path, capsys):
    output = tmp_path / "attention.png"
    assert cli.main(["attention", "--run", str(tiny_run), "--output", str(output)]) == 0
    assert output.read_bytes()[:4] == b"\x89PNG"
    assert "2 gates (dec2 256x64, dec1 512x128)" in capsys.readouterr().out


def test_attention_by_sliding_windows_above_the_patch_size(tiny_run, tmp_path, capsys):
    """The held-out quarter (512x128) in 64x64 windows: the same gate grids as whole."""
    output = tmp_path / "attention.png"
    assert cli.main(["attention", "--run", str(tiny_run), "--output", str(output),
                     "--patch", "64", "--overlap", "0.25"]) == 0
    assert output.read_bytes()[:4] == b"\x89PNG"
    assert "2 gates (dec2 256x64, dec1 512x128)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["attention", "--run", str(tiny_run), "--output", str(tmp_path / "x.png"),
                  "--patch", "30"])
    assert "patch_size=30 is not allowed" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_export_of_a_run(tiny_run, tmp_path):
    output = tmp_path / "saved"
    assert cli.main(["export", "--run", str(tiny_run), "--output", str(output)]) == 0
    assert (output / "1" / "saved_model.pb").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "--model", "x.keras", "--output", "out"],
         "give an IMAGE (or folder), or --run DIR"),
        (["train", "--dataset", "nuclei", "--output", "run", "--loss", "dice",
          "--learning-rate", "0"], "learning_rate=0.0 is not allowed"),
        (["train", "--dataset", "missing_folder", "--output", "run"],
         "neither a built-in dataset"),
        (["attention", "--run", "no_run", "--output", "a.png"],
         "no_run is not a training run"),
    ],
)
def test_bad_training_commands_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_architecture_options_train_end_to_end(tmp_path, capsys):
    run = tmp_path / "variant"
    assert cli.main(["train", "--dataset", "nuclei", "--output", str(run), *TINY_TRAIN,
                     "--deep-supervision", "--gate", "grid", "--batch-norm",
                     "--upsampling", "transpose", "--dropout", "0"]) == 0
    import csv

    with open(run / "log.csv") as file:
        columns = next(csv.reader(file))
    # the checkpoint follows the main output's held-out Dice
    assert "val_head_sigmoid_dice" in columns and "val_dec2_head_sigmoid_loss" in columns
    assert (run / "best.keras").is_file()
    assert cli.main(["attention", "--run", str(run), "--output",
                     str(tmp_path / "a.png")]) == 0
    assert cli.main(["export", "--run", str(run), "--output", str(tmp_path / "sm")]) == 0
    assert "max |export - keras|" in capsys.readouterr().out


# ------------------------------------------------------------ launcher and parser


def test_help_and_argument_errors_do_not_load_tensorflow():
    script = (
        "import sys, attunet_keras_cli\n"
        "for argv in (['--help'], ['train', '--help'], ['plot', '--dpi', '0']):\n"
        "    try:\n"
        "        attunet_keras_cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_parser_choices_and_defaults_are_the_library_s():
    import dataclasses

    import attunet_keras_cli
    from attunet_keras import backbones
    from attunet_keras import distribute
    from attunet_keras import losses
    from attunet_keras import multiworker
    from attunet_keras import training

    assert attunet_keras_cli.LOSSES == losses.LOSSES
    assert attunet_keras_cli.STRATEGIES == distribute.STRATEGIES
    assert attunet_keras_cli.PRECISIONS == distribute.PRECISIONS
    assert attunet_keras_cli.JIT_CHOICES == distribute.JIT_CHOICES
    assert attunet_keras_cli.BACKBONES == tuple(backbones.BACKBONES)
    defaults = dict(vars(attunet_keras_cli.TRAIN_DEFAULTS))
    assert defaults.pop("cluster_timeout") == multiworker.CLUSTER_TIMEOUT_SECONDS
    config = dataclasses.asdict(training.TrainConfig())
    assert defaults == {name: config[name] for name in defaults}


@pytest.mark.parametrize("argv, message", [
    (["plot", "--output", "m.png", "--dpi", "0"], "argument --dpi: expected an integer >= 1"),
    (["plot", "--output", "m.png", "--dpi", "-5"], "argument --dpi: expected an integer >= 1"),
    (["train", "--dataset", "nuclei", "--output", "r", "--cpu-devices", "0"],
     "argument --cpu-devices: expected an integer >= 1"),
    (["predict", "--model", "m.keras", "--output", "o", "--threshold", "1.5"],
     "argument --threshold: expected a number between 0 and 1"),
    (["predict", "--model", "m.keras", "--output", "o", "--threshold", "nan"],
     "argument --threshold: expected a number between 0 and 1"),
    (["predict", "--model", "m.keras", "--output", "o", "--threshold", "0"],
     "argument --threshold: expected a number between 0 and 1"),
])
def test_out_of_range_options_are_refused_by_the_parser(argv, message, capsys, tmp_path,
                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_the_console_script_prints_no_tensorflow_start_up_lines():
    environment = {key: value for key, value in os.environ.items()
                   if key != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([_console_script(), "summary", *TINY], capture_output=True,
                            text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr
    assert "Parameters:" in result.stdout
    for notice in ("absl::InitializeLog", "oneDNN custom operations", "cuInit"):
        assert notice not in result.stderr


def test_an_unwritable_output_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--dataset", "nuclei", "--output", str(blocker / "run"),
                  *TINY_TRAIN])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write or read" in err and str(blocker) in err


# ------------------------------------------------------- predict, evaluate, models


def _images(folder, names, size=(40, 40), channels=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        shape = size + ((channels,) if channels else ())
        array = (rng.random(shape) * 255).astype("uint8")
        if name.endswith((".tif", ".tiff")):
            import tifffile

            tifffile.imwrite(folder / name, array)
        else:
            Image.fromarray(array).save(folder / name)
    return folder


def test_predict_checks_every_output_before_writing_any(tiny_run, tmp_path, capsys):
    folder = _images(tmp_path / "in", ["a.png", "b.png"])
    output = tmp_path / "out"
    output.mkdir()
    (output / "b_mask.png").write_text("an earlier result")
    with pytest.raises(SystemExit):
        cli.main(["predict", str(folder), "--model", str(tiny_run / "best.keras"),
                  "--output", str(output)])
    assert "1 output(s) exist already, e.g." in capsys.readouterr().err
    assert sorted(os.listdir(output)) == ["b_mask.png"]


def test_predict_refuses_two_images_with_one_stem(tiny_run, tmp_path, capsys):
    folder = _images(tmp_path / "in", ["x.png", "x.tif"])
    with pytest.raises(SystemExit):
        cli.main(["predict", str(folder), "--model", str(tiny_run / "best.keras"),
                  "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "x.png and" in err and "x.tif would write the same x_* outputs" in err
    assert not (tmp_path / "out").exists()


def test_predict_refuses_to_write_into_the_input_folder(tiny_run, tmp_path, capsys):
    folder = _images(tmp_path / "in", ["a.png"])
    with pytest.raises(SystemExit):
        cli.main(["predict", str(folder), "--model", str(tiny_run / "best.keras"),
                  "--output", str(folder), "--overwrite"])
    assert "is the input folder" in capsys.readouterr().err
    assert os.listdir(folder) == ["a.png"]


def test_predict_refuses_a_3d_model_before_writing(tmp_path, capsys):
    from attunet_keras import models

    path = tmp_path / "volume.keras"
    models.att_unet_3d(16, 16, 16, 1, depth=2, features=4).save(path)
    folder = _images(tmp_path / "in", ["a.png"])
    with pytest.raises(SystemExit):
        cli.main(["predict", str(folder / "a.png"), "--model", str(path), "--output",
                  str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "a 3D model" in err and "which takes NIfTI volumes (.nii, .nii.gz)" in err
    assert "a.png is a 2D image" in err and "2D models and images only" not in err
    assert not (tmp_path / "out").exists()


def test_predict_names_a_nan_image(tiny_run, tmp_path, capsys):
    import tifffile

    folder = tmp_path / "in"
    folder.mkdir()
    image = np.zeros((32, 32), "float32")
    image[0, 0] = np.nan
    tifffile.imwrite(folder / "nan.tif", image)
    with pytest.raises(SystemExit):
        cli.main(["predict", str(folder), "--model", str(tiny_run / "best.keras"),
                  "--output", str(tmp_path / "out")])
    assert "nan.tif: 1 pixel(s) are NaN or infinite" in capsys.readouterr().err


def test_predict_converts_channels_on_request_and_otherwise_says_how(tiny_run, tmp_path,
                                                                     capsys):
    folder = _images(tmp_path / "in", ["rgb.png"], channels=3)
    argv = ["predict", str(folder), "--model", str(tiny_run / "best.keras"),
            "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert "rgb.png has 3 channel(s) but the model takes 1; --channels gray" in \
        capsys.readouterr().err
    assert cli.main(argv + ["--channels", "gray"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["rgb_mask.png", "rgb_overlay.png"]


def test_evaluate_refuses_a_model_of_another_task(tiny_run, tmp_path, capsys):
    from attunet_keras import models

    path = tmp_path / "three.keras"
    models.att_unet(64, 64, 3, depth=2, features=4, in_channels=1,
                    output_activation="softmax").save(path)
    with pytest.raises(SystemExit):
        cli.main(["evaluate", str(tiny_run), "--model", str(path)])
    assert "it is a model of another task" in capsys.readouterr().err
    assert cli.main(["evaluate", str(tiny_run), "--model",
                     str(tiny_run / "best.keras"), "--json"]) == 0


def test_a_corrupt_model_file_is_named_not_missing(tmp_path, capsys):
    path = tmp_path / "best.keras"
    path.write_text("garbage")
    with pytest.raises(SystemExit):
        cli.main(["summary", "--model", str(path)])
    assert f"{path} is not a Keras model file" in capsys.readouterr().err


def test_train_overwrite_never_deletes_the_dataset(tmp_path, capsys):
    folder = _images(tmp_path / "set" / "images", ["a.png", "b.png"], size=(64, 64))
    _images(tmp_path / "set" / "masks", [])
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((64, 64), "uint8")).save(tmp_path / "set" / "masks" / name)
    with pytest.raises(SystemExit):
        cli.main(["train", "--dataset", str(tmp_path / "set"), "--n-label", "1",
                  "--output", str(tmp_path / "set"), "--overwrite", *TINY_TRAIN])
    assert "holds the dataset" in capsys.readouterr().err
    assert sorted(os.listdir(folder)) == ["a.png", "b.png"]


def test_train_on_a_folder_with_a_cache_and_foreground_patches(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (tmp_path / "set" / sub).mkdir(parents=True)
    for index in range(5):
        image = (rng.random((80, 96)) * 255).astype("uint8")
        Image.fromarray(image).save(tmp_path / "set" / "images" / f"s{index}.png")
        Image.fromarray(((image > 200) * 255).astype("uint8")).save(
            tmp_path / "set" / "masks" / f"s{index}.png")
    command = ["train", "--dataset", str(tmp_path / "set"), "--n-label", "1",
               "--output", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"),
               "--foreground-fraction", "0.5", "--patches-per-image", "3",
               "--val-fraction", "0.4", *TINY_TRAIN]
    assert cli.main(command) == 0
    out = capsys.readouterr().out
    assert "Dataset set: 3 training and 2 held-out images, 9 random 64x64 patches per " \
           "epoch (0.5 centred on foreground)" in out
    assert f"cache {tmp_path / 'cache'}: 0 of 5 pairs cached" in out
    assert len(os.listdir(tmp_path / "cache")) == 5  # training and held-out pairs
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["cache"] == str(tmp_path / "cache") and len(config["val_files"]) == 2
    assert config["foreground_fraction"] == 0.5 and config["patches_per_image"] == 3

    assert cli.main(command + ["--overwrite"]) == 0
    assert f"cache {tmp_path / 'cache'}: 5 of 5 pairs cached" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value, match", [
    ("--foreground-fraction", "1.5", r"expected a number from 0 to 1, received '1.5'"),
    ("--patches-per-image", "0", r"expected an integer >= 1, received '0'"),
])
def test_bad_pipeline_flags_are_refused(flag, value, match, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--dataset", "nuclei", "--output", str(tmp_path / "run"),
                  flag, value])
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_predict_checks_every_image_before_it_writes_any(tiny_run, tmp_path, capsys):
    """A gray and an RGB image: the first's outputs used to be written before the RGB
    one was refused, and the rerun with --channels gray was then refused too."""
    folder = _images(tmp_path / "in", ["a_gray.png"])
    _images(folder, ["b_rgb.png"], channels=3)
    argv = ["predict", str(folder), "--model", str(tiny_run / "best.keras"),
            "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "b_rgb.png has 3 channel(s) but the model takes 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert cli.main(argv + ["--channels", "gray"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == [
        "a_gray_mask.png", "a_gray_overlay.png", "b_rgb_mask.png", "b_rgb_overlay.png"]


def test_predict_refuses_an_output_folder_that_holds_the_input_image(tiny_run, tmp_path,
                                                                     capsys):
    folder = _images(tmp_path / "in", ["x.png"])
    with pytest.raises(SystemExit):
        cli.main(["predict", str(folder / "x.png"), "--model", str(tiny_run / "best.keras"),
                  "--output", str(folder)])
    assert "is the input folder" in capsys.readouterr().err
    assert os.listdir(folder) == ["x.png"]


def test_attention_into_a_missing_folder_is_refused_before_any_work(tiny_run, tmp_path,
                                                                    capsys, monkeypatch):
    monkeypatch.setattr(commands, "_checked_model", lambda args: pytest.fail("computed"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["attention", "--run", str(tiny_run), "--output",
                  str(tmp_path / "missing" / "x.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "missing does not exist; create it first" in err
    assert not (tmp_path / "missing").exists()


def test_an_unknown_keras_backend_is_one_line_and_exit_2():
    result = subprocess.run([_console_script(), "summary"], capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, KERAS_BACKEND="nonsense"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "attunet-keras summary: error: KERAS_BACKEND='nonsense' is not a Keras backend; "
        "expected one of tensorflow, jax, torch, numpy, openvino (this package runs "
        "under tensorflow, jax and torch)."]


def test_the_hd95_footnote_names_the_units_of_volumes(capsys):
    result = {"dataset": "v", "held_out_images": 2, "dims": 3, "otsu": None,
              "model": {"dice": 0.5, "iou": 0.3, "hd95": 2.0}}
    commands._print_scores(result)
    text = capsys.readouterr().out
    assert "in the voxel spacing's units" in text and "pixels" not in text
    commands._print_scores(dict(result, dims=2))
    assert "distance in pixels" in capsys.readouterr().out


def test_an_int8_export_is_calibrated_on_the_run_s_training_patches(tiny_run, tmp_path,
                                                                     capsys):
    from attunet_keras import training

    patches = training.calibration_patches(str(tiny_run), count=4, seed=1)
    assert patches.shape == (4, 64, 64, 1)  # the run's tile, channels_last
    assert 0.0 <= patches.min() and patches.max() <= 1.0 and patches.std() > 0
    np.testing.assert_array_equal(patches, training.calibration_patches(
        str(tiny_run), count=4, seed=1))  # seeded
    output = tmp_path / "m.tflite"
    assert cli.main(["export", "--run", str(tiny_run), "--format", "litert", "--quantize",
                     "int8", "--output", str(output)]) == 0
    assert output.stat().st_size > 0 and ", int8" in capsys.readouterr().out


def test_every_train_option_is_one_trainconfig_field_with_its_default():
    """The train flags and TrainConfig are one declaration seen twice: every field
    (but the recorded held-out files) is a flag of the same name, with the same
    default, and cli's train builds the config from them without a copy by hand."""
    import attunet_keras_cli
    from attunet_keras import training

    args = attunet_keras_cli.build_parser().parse_args(
        ["train", "--dataset", "d", "--output", "o"])
    fields = {field.name: field.default for field in dataclasses.fields(training.TrainConfig)}
    given = {"dataset": "d", "output": "o"}
    missing = set(fields) - set(vars(args)) - {"val_files"}
    assert not missing, f"TrainConfig fields without a train flag: {sorted(missing)}"
    for name, default in fields.items():
        if name != "val_files":
            assert getattr(args, name) == given.get(name, default), name
    only_cli = set(vars(args)) - set(fields)
    assert only_cli == {"command", "overwrite", "cpu_devices", "cluster_timeout", "verbose"}


def test_the_helps_say_that_summary_and_train_default_differently(capsys):
    for command in ("summary", "train"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "The defaults are the reference model's (features 32, channels_first" in text
    assert "train's differ: features 16, channels_last" in text
    assert "summary, plot and export default to the reference's 32" in text
