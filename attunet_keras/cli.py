"""The `attunet-keras` command line: summary, plot and export of an Attention U-Net."""

import argparse
import os
import sys

_DESCRIPTION = """\
Build, inspect and export the Attention U-Net of attunet_keras.

Every subcommand builds att_unet() from the model options below (defaults: the
reference model, att_unet(160, 160, n_label=1), channels_first, 7,977,941 parameters),
or loads a trained model with --model FILE.keras instead.
"""

_EPILOG = """\
examples:
  attunet-keras summary
  attunet-keras summary --img-w 256 --img-h 256 --data-format channels_last
  attunet-keras plot --output att_unet.png
  attunet-keras export --output saved_model --img-w none --img-h none
"""


def _size(text):
    """An image size: a positive integer, or `none` for a size chosen at call time."""
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer or 'none', received {text!r}"
        ) from None


def _model_options():
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("model options (att_unet arguments)")
    group.add_argument(
        "--img-w", type=_size, default=160, metavar="N",
        help="first spatial axis, divisible by 2**depth, or 'none' (default: 160)",
    )
    group.add_argument(
        "--img-h", type=_size, default=160, metavar="N",
        help="second spatial axis, divisible by 2**depth, or 'none' (default: 160)",
    )
    group.add_argument(
        "--n-label", type=int, default=1, metavar="N",
        help="output channels, one sigmoid map each (default: 1)",
    )
    group.add_argument(
        "--depth", type=int, default=4, metavar="N",
        help="number of pooling levels (default: 4)",
    )
    group.add_argument(
        "--features", type=int, default=32, metavar="N",
        help="filters of the first level, doubled at each level down (default: 32)",
    )
    group.add_argument(
        "--data-format", choices=("channels_first", "channels_last"),
        default="channels_first",
        help="tensor layout (default: channels_first, as the reference)",
    )
    group.add_argument(
        "--in-channels", type=int, default=3, metavar="N",
        help="channels of the input image (default: 3)",
    )
    group.add_argument(
        "--model", metavar="FILE.keras",
        help="load this saved model instead of building one from the options above",
    )
    return parent


def build_parser():
    """The argument parser of `attunet-keras`."""
    parser = argparse.ArgumentParser(
        prog="attunet-keras",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_options = _model_options()

    summary = commands.add_parser(
        "summary", parents=[model_options],
        help="print model.summary() and the parameter count",
        description="Print model.summary() and the parameter count.",
    )
    summary.add_argument(
        "--line-length", type=int, default=None, metavar="N",
        help="width of the summary table (default: Keras's)",
    )

    plot = commands.add_parser(
        "plot", parents=[model_options],
        help="draw the model with keras.utils.plot_model (needs Graphviz)",
        description=(
            "Draw the model with keras.utils.plot_model, layer names and shapes "
            "shown. The file type follows the extension (.png, .svg, .pdf, .dot)."
        ),
    )
    plot.add_argument("--output", required=True, metavar="FILE",
                      help="image to write, e.g. att_unet.png")
    plot.add_argument("--rankdir", choices=("TB", "LR"), default="TB",
                      help="TB: top to bottom, LR: left to right (default: TB)")
    plot.add_argument("--dpi", type=int, default=96, help="resolution (default: 96)")
    plot.add_argument(
        "--splines", choices=("ortho", "polyline", "spline", "line"), default="ortho",
        help="edge style (default: ortho, as plot_model; when Graphviz's orthogonal "
             "router fails on a graph, the plot is drawn with polyline edges)",
    )
    plot.add_argument("--overwrite", action="store_true",
                      help="replace FILE when it exists")

    export = commands.add_parser(
        "export", parents=[model_options],
        help="export a TensorFlow SavedModel, reload it and check its outputs",
        description=(
            "Export a SavedModel (model.export) with a 'serve' endpoint, reload it "
            "with tf.saved_model.load and compare it with the Keras model on a random "
            "batch. It is written beside DIR and renamed into place only once checked."
        ),
    )
    export.add_argument("--output", required=True, metavar="DIR",
                        help="SavedModel folder to create")
    export.add_argument("--overwrite", action="store_true",
                        help="replace DIR when it exists")
    export.add_argument("--seed", type=int, default=0,
                        help="seed of the random check batch (default: 0)")
    return parser


def main(argv=None):
    """Runs the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_output(args)
        model = _load_or_build(args)
        return _COMMANDS[args.command](model, args)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        parser.exit(2, f"attunet-keras {args.command}: error: {error}\n")


def _check_output(args):
    """Refuses to replace an existing output before any work is done."""
    output = getattr(args, "output", None)
    if output and os.path.lexists(output) and not args.overwrite:
        raise FileExistsError(
            f"{output} already exists; choose another path or pass --overwrite."
        )
    if args.command == "plot":
        extension = os.path.splitext(output)[1].lower()
        if extension not in (".png", ".svg", ".pdf", ".dot", ".jpg", ".jpeg"):
            raise ValueError(
                f"--output {output!r} has extension {extension!r}; expected one of "
                ".png, .svg, .pdf, .dot, .jpg, .jpeg."
            )


def _load_or_build(args):
    import keras

    if args.model:
        if not os.path.isfile(args.model):
            raise FileNotFoundError(f"--model {args.model}: no such file.")
        if not args.model.endswith(".keras"):
            raise ValueError(
                f"--model {args.model!r} is not a .keras file; save models with "
                "model.save('name.keras')."
            )
        return keras.saving.load_model(args.model, safe_mode=True)

    from attunet_keras import models

    return models.att_unet(
        args.img_w, args.img_h, args.n_label, depth=args.depth,
        features=args.features, data_format=args.data_format,
        in_channels=args.in_channels,
    )


def _summary(model, args):
    model.summary(line_length=args.line_length)
    print(f"Parameters: {model.count_params():,}")
    return 0


def _plot(model, args):
    import keras

    def draw(splines):
        keras.utils.plot_model(
            model, to_file=args.output, show_shapes=True, show_layer_names=True,
            rankdir=args.rankdir, dpi=args.dpi, splines=splines,
        )

    try:
        draw(args.splines)
    except AssertionError:
        # pydot raises AssertionError when `dot` fails. Graphviz's orthogonal router
        # aborts on some graphs ("maze.c: chkSgraph"); polyline edges always route.
        if args.splines != "ortho":
            raise
        print("Graphviz's orthogonal edge router failed on this graph; "
              "drawing it with --splines polyline instead.")
        draw("polyline")
    if not os.path.isfile(args.output):
        raise FileNotFoundError(
            f"plot_model wrote no {args.output}; is Graphviz's 'dot' installed "
            "(Debian: apt-get install graphviz)?"
        )
    print(f"Wrote {args.output}")
    return 0


def _export(model, args):
    from attunet_keras import export

    sample = _check_batch(model, args.seed)
    max_diff = export.export_saved_model(
        model, args.output, sample=sample, overwrite=args.overwrite
    )
    print(f"Wrote SavedModel {args.output} (endpoint 'serve', input "
          f"{tuple(model.input.shape)}, output {tuple(model.output.shape)})")
    print(f"Reloaded and checked on a batch of {sample.shape}: "
          f"max |serve - predict| = {max_diff:.3g}")
    return 0


def _check_batch(model, seed):
    """A random batch of two images for the model's input.

    An unknown spatial size becomes the smallest multiple of 2**pooling levels that
    is at least 64.
    """
    import keras
    import numpy as np

    pools = sum(isinstance(layer, keras.layers.MaxPooling2D) for layer in model.layers)
    multiple = 2**pools
    free_size = multiple * max(1, -(-64 // multiple))
    shape = [2] + [free_size if size is None else size for size in model.input.shape[1:]]
    return np.random.default_rng(seed).random(shape, dtype="float32")


def _version():
    from attunet_keras import __version__

    return f"attunet-keras {__version__}"


_COMMANDS = {"summary": _summary, "plot": _plot, "export": _export}


if __name__ == "__main__":
    sys.exit(main())
