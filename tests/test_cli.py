"""The attunet-keras command line."""

import os
import shutil
import subprocess
import sys

import pytest

from attunet_keras import cli

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
    monkeypatch.setattr(cli, "_load_or_build", lambda args: pytest.fail("built"))
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
    assert "Held-out scores on nuclei (16 tiles)" in text
    assert "att_unet" in text and "Otsu" in text and "dice" in text


def test_evaluate_json(tiny_run, capsys):
    import json

    assert cli.main(["evaluate", str(tiny_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["model"]) == set(result["otsu"]) == {"dice", "iou"}


def test_predict_writes_mask_and_overlay_for_held_out_images(tiny_run, tmp_path):
    import numpy as np
    from PIL import Image

    output = tmp_path / "predictions"
    assert cli.main(["predict", "--run", str(tiny_run), "--output", str(output)]) == 0
    with Image.open(output / "nuclei_held_out_mask.png") as mask:
        assert mask.size == (128, 512)
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
    with Image.open(output / "nuclei_held_out_overlay.png") as overlay:
        assert overlay.mode == "RGB" and overlay.size == (128, 512)


def test_predict_on_a_folder_of_images(tiny_run, tmp_path):
    import numpy as np
    from PIL import Image

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


def test_attention_writes_one_figure(tiny_run, tmp_path, capsys):
    output = tmp_path / "attention.png"
    assert cli.main(["attention", "--run", str(tiny_run), "--output", str(output)]) == 0
    assert output.read_bytes()[:4] == b"\x89PNG"
    assert "2 gates (dec2 256x64, dec1 512x128)" in capsys.readouterr().out


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
