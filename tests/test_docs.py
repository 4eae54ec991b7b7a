"""The README and docs/: every relative link resolves, every CLI flag they name exists."""

import glob
import os
import re

import numpy as np
import pytest

import attunet_keras_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
COMMAND = re.compile(r"attunet-keras\s+([a-z]+)")


def _anchors(path):
    """GitHub's heading anchors of a Markdown file."""
    with open(path) as file:
        headings = [line.lstrip("#").strip() for line in file if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def _links():
    for page in PAGES:
        with open(page) as file:
            for target in LINK.findall(file.read()):
                if not re.match(r"[a-z]+://", target):
                    yield page, target


def test_the_pages_exist_and_the_readme_is_one_page():
    names = {os.path.basename(page) for page in PAGES}
    assert {"architecture.md", "reference.md", "data.md", "training.md", "distributed.md",
            "deployment.md", "benchmarks.md"} <= names
    assert os.path.getsize(os.path.join(ROOT, "README.md")) < 12 * 1024
    assert len(list(_links())) > 10  # the check below has links to check


@pytest.mark.parametrize("page, target", list(_links()),
                         ids=lambda value: os.path.basename(str(value)))
def test_every_relative_link_and_image_resolves(page, target):
    path, _, anchor = target.partition("#")
    resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    assert os.path.exists(resolved), f"{page}: {target} does not exist"
    if anchor:
        assert anchor in _anchors(resolved), f"{page}: no heading #{anchor} in {resolved}"


def _help_texts():
    parser = attunet_keras_cli.build_parser()
    commands = next(action for action in parser._actions
                    if action.__class__.__name__ == "_SubParsersAction").choices
    return parser.format_help(), {name: sub.format_help() for name, sub in commands.items()}


def _code_fragments(text):
    """Code lines of fenced blocks and inline code spans."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    for block in blocks:
        yield from block.splitlines()
    yield from re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))


def _mentioned_flags():
    """(page, subcommand or None, flag) for each flag the pages give the command line."""
    for page in PAGES:
        with open(page) as file:
            text = file.read()
        for fragment in _code_fragments(text):
            fragment = fragment.split(" # ")[0]
            command = COMMAND.search(fragment)
            if command:
                for flag in FLAG.findall(fragment[command.end():]):
                    yield os.path.basename(page), command.group(1), flag
            elif fragment.startswith("--"):
                for flag in FLAG.findall(fragment):
                    yield os.path.basename(page), None, flag


def test_every_flag_the_docs_mention_exists_in_its_subcommand_help():
    top, helps = _help_texts()
    mentioned = list(_mentioned_flags())
    assert len(mentioned) > 40
    missing = []
    for page, command, flag in mentioned:
        if command in helps:
            texts = [helps[command]]
        elif command is None:
            texts = list(helps.values()) + [top]
        else:
            continue  # `attunet-keras COMMAND --help`: a placeholder, not a command
        if not any(re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) for text in texts):
            missing.append(f"{page}: {command or 'any command'} {flag}")
    assert not missing, "flags the docs name but the CLI lacks: " + "; ".join(missing)


def test_the_readme_quickstart_runs_and_trains_the_reference_model(tmp_path, monkeypatch,
                                                                   capsys):
    """The first Python block of the README, as a user pastes it: the reference model
    (channels_first) compiled with the package's loss and metric, fitted one epoch."""
    with open(PAGES[0]) as file:
        block = re.findall(r"```python\n(.*?)```", file.read(), flags=re.S)[0]
    assert "model.fit(" in block and "metrics.Dice()" in block
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    model, x = namespace["model"], namespace["x"]
    assert model.count_params() == 7977941  # the reference summary's Total params
    assert (tmp_path / "att_unet.png").stat().st_size > 0
    history = model.history.history
    assert np.isfinite(history["loss"]).all() and 0.0 <= history["dice"][0] <= 1.0
    from attunet_keras import losses

    masks = (x[:, :1] > 0.5).astype("float32")
    expected = float(losses.get("bce_dice", 1, "channels_last")(
        np.moveaxis(masks, 1, -1), np.moveaxis(model.predict(x, verbose=0), 1, -1)))
    assert model.evaluate(x, masks, verbose=0, return_dict=True)["loss"] == pytest.approx(
        expected, rel=1e-4)
