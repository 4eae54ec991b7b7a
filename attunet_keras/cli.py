"""The `attunet-keras` command line: inspect, train, evaluate, predict and export."""

import argparse
import json
import os
import sys

_DESCRIPTION = """\
Build, inspect, train and export the Attention U-Net of attunet_keras.

summary, plot and export build att_unet() from the model options (defaults: the
reference model, att_unet(160, 160, n_label=1), channels_first, 7,977,941 parameters),
or use a trained model: --model FILE.keras, or --run DIR for a training run's best.
"""

_EPILOG = """\
examples:
  attunet-keras summary
  attunet-keras summary --img-w 256 --img-h 256 --data-format channels_last
  attunet-keras plot --output att_unet.png
  attunet-keras train --dataset nuclei --output runs/nuclei
  attunet-keras evaluate runs/nuclei
  attunet-keras predict --run runs/nuclei --output predictions [IMAGE_OR_FOLDER]
  attunet-keras attention --run runs/nuclei --output attention.png [IMAGE]
  attunet-keras export --run runs/nuclei --output saved_model
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
    _trained_model_options(group)
    return parent


def _trained_model_options(group, required=False):
    which = group.add_mutually_exclusive_group(required=required)
    which.add_argument(
        "--model", metavar="FILE.keras",
        help="use this saved model" + ("" if required else
                                        " instead of building one from the options"),
    )
    which.add_argument(
        "--run", metavar="DIR",
        help="use the best model of this training run (attunet-keras train --output)",
    )


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
        help="export to SavedModel (TF Serving), ONNX or LiteRT, reloaded and checked",
        description=(
            "Export the model, reload the export and compare it with Keras on a random "
            "batch. savedmodel: TF Serving's layout OUTPUT/1/ with the signatures "
            "'probabilities' (= serving_default) and 'mask' (uint8). onnx: an .onnx "
            "file (needs tf2onnx; checked with onnxruntime when installed). litert: a "
            ".tflite file, float32 or --quantize int8 (calibrated on the training "
            "tiles of --run). Every export is written beside OUTPUT and renamed into "
            "place only when complete and checked."
        ),
    )
    export.add_argument("--output", required=True, metavar="PATH",
                        help="folder (savedmodel), .onnx or .tflite file to create")
    export.add_argument("--format", choices=("savedmodel", "onnx", "litert"),
                        default="savedmodel", help="export format (default: savedmodel)")
    export.add_argument("--quantize", choices=("int8",), default=None,
                        help="LiteRT only: int8 post-training quantization")
    export.add_argument("--threshold", type=float, default=0.5,
                        help="threshold of the SavedModel's mask signature for sigmoid "
                             "outputs (default: 0.5)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace OUTPUT when it exists")
    export.add_argument("--seed", type=int, default=0,
                        help="seed of the random check batch (default: 0)")

    _add_train_parser(commands)

    evaluate = commands.add_parser(
        "evaluate", help="held-out Dice and IoU of a run, next to an Otsu baseline",
        description=(
            "Print the held-out Dice and IoU of a training run's best model and of an "
            "Otsu threshold on the same held-out pixels."
        ),
    )
    evaluate.add_argument("run", metavar="RUN_DIR", help="folder of a training run")
    evaluate.add_argument("--json", action="store_true", help="print JSON")

    predict = commands.add_parser(
        "predict", help="write masks and overlay PNGs for an image or a folder",
        description=(
            "Write NAME_mask.png (0/255 for binary models, class indices otherwise) "
            "and NAME_overlay.png for each image. Without IMAGE, a run's held-out "
            "images are used."
        ),
    )
    predict.add_argument("input", nargs="?", metavar="IMAGE_OR_FOLDER",
                         help="a PNG/JPEG/TIFF image or a folder of them")
    _trained_model_options(predict.add_argument_group("model"), required=True)
    predict.add_argument("--output", required=True, metavar="DIR",
                         help="folder for the PNGs (created)")
    predict.add_argument("--threshold", type=float, default=0.5,
                         help="probability threshold of binary models (default: 0.5)")
    predict.add_argument("--overwrite", action="store_true",
                         help="replace PNGs that exist")

    attention = commands.add_parser(
        "attention", help="one figure of every attention gate's coefficients",
        description=(
            "Draw the image, the prediction and the sigmoid attention map of every "
            "gate (deepest first) in one figure. Without IMAGE, a run's first "
            "held-out image is used."
        ),
    )
    attention.add_argument("input", nargs="?", metavar="IMAGE",
                           help="a PNG/JPEG/TIFF image")
    _trained_model_options(attention.add_argument_group("model"), required=True)
    attention.add_argument("--output", required=True, metavar="FILE.png",
                           help="the figure to write")
    attention.add_argument("--overwrite", action="store_true",
                           help="replace FILE when it exists")
    return parser


def _add_train_parser(commands):
    from attunet_keras import distribute
    from attunet_keras import losses
    from attunet_keras import training

    defaults = training.TrainConfig()
    train = commands.add_parser(
        "train", help="train on nuclei, brain or a folder of images and masks",
        description=(
            "Train an att_unet with Keras fit. The run folder gets config.json, "
            "best.keras (best held-out Dice), last.keras, log.csv, tensorboard/ and "
            "result.json. A run that was killed resumes from its last backup when "
            "the same command is run again."
        ),
    )
    train.add_argument("--dataset", required=True, metavar="nuclei|brain|PATH",
                       help="built-in dataset, or a folder with images/ and masks/")
    train.add_argument("--output", required=True, metavar="DIR", help="the run folder")
    train.add_argument("--epochs", type=int, default=defaults.epochs,
                       help=f"epochs (default: {defaults.epochs})")
    train.add_argument("--steps-per-epoch", type=int, default=None, metavar="N",
                       help="batches per epoch (default: one pass over the tiles)")
    train.add_argument("--batch-size", type=int, default=defaults.batch_size,
                       metavar="N", help=f"batch size (default: {defaults.batch_size})")
    train.add_argument("--learning-rate", type=float, default=defaults.learning_rate,
                       metavar="LR", help=f"Adam (default: {defaults.learning_rate})")
    train.add_argument("--loss", choices=losses.LOSSES, default=defaults.loss,
                       help=f"loss (default: {defaults.loss}; bce and focal are "
                            "categorical for several classes)")
    train.add_argument("--seed", type=int, default=defaults.seed,
                       help=f"seed (default: {defaults.seed})")
    train.add_argument("--depth", type=int, default=defaults.depth, metavar="N",
                       help=f"att_unet depth (default: {defaults.depth})")
    train.add_argument("--features", type=int, default=defaults.features, metavar="N",
                       help=f"att_unet base features (default: {defaults.features})")
    train.add_argument("--tile", type=int, default=defaults.tile, metavar="N",
                       help=f"tile side for nuclei and folders (default: {defaults.tile})")
    train.add_argument("--data-format", choices=("channels_first", "channels_last"),
                       default=defaults.data_format,
                       help=f"layout (default: {defaults.data_format}, faster on CPUs)")
    train.add_argument("--n-label", type=int, default=None, metavar="N",
                       help="classes of a folder dataset: 1 for binary masks")
    variants = train.add_argument_group("architecture options (att_unet)")
    variants.add_argument("--dropout", type=float, default=defaults.dropout,
                          metavar="RATE", help=f"dropout rate (default: {defaults.dropout})")
    variants.add_argument("--batch-norm", action="store_true",
                          help="Conv-BN-ReLU, and BN in the gates")
    variants.add_argument("--upsampling", choices=("nearest", "bilinear", "transpose"),
                          default=defaults.upsampling,
                          help=f"decoder up-sampling (default: {defaults.upsampling})")
    variants.add_argument("--gate", choices=("additive", "grid"), default=defaults.gate,
                          help=f"attention gate (default: {defaults.gate})")
    variants.add_argument("--deep-supervision", action="store_true",
                          help="extra 1x1 heads at the lower decoder levels, "
                               "loss weights 0.5**(level-1)")
    train.add_argument("--backup-every", type=int, default=defaults.backup_every,
                       metavar="N", help="steps between resumable backups "
                                         f"(default: {defaults.backup_every})")
    train.add_argument("--overwrite", action="store_true",
                       help="delete an existing run in DIR and start again")
    scale = train.add_argument_group("distribution and precision")
    scale.add_argument("--strategy", choices=distribute.STRATEGIES, default=defaults.strategy,
                       help="tf.distribute strategy (default: auto = TPU if found, "
                            "mirrored over several GPUs, else one device); --batch-size "
                            "is then per replica")
    scale.add_argument("--precision", choices=distribute.PRECISIONS,
                       default=defaults.precision,
                       help=f"Keras dtype policy (default: {defaults.precision}); the "
                            "output layer stays float32")
    scale.add_argument("--jit-compile", choices=distribute.JIT_CHOICES,
                       default=defaults.jit_compile,
                       help="XLA (default: auto = off under several replicas, where "
                            "it fails, and on CPUs)")
    scale.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                       help="split the CPU into N logical devices, so 'mirrored' has N "
                            "replicas without a GPU (testing)")
    train.add_argument("--verbose", choices=("auto", "0", "1", "2"), default="auto",
                       help="Keras fit output: 1 progress bar, 2 one line per epoch "
                            "(default: auto)")


def main(argv=None):
    """Runs the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as error:
        parser.exit(2, f"attunet-keras {args.command}: error: {error}\n")


def _check_output(args, extensions=None):
    """Refuses to replace an existing output, or to write an unknown file type."""
    output = args.output
    if os.path.lexists(output) and not args.overwrite:
        raise FileExistsError(
            f"{output} already exists; choose another path or pass --overwrite."
        )
    if extensions:
        extension = os.path.splitext(output)[1].lower()
        if extension not in extensions:
            raise ValueError(
                f"--output {output!r} has extension {extension!r}; expected one of "
                f"{', '.join(extensions)}."
            )


def _load_or_build(args):
    import keras

    if args.run:
        from attunet_keras import training

        return training.load_run_model(args.run)
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


def _summary(args):
    model = _load_or_build(args)
    model.summary(line_length=args.line_length)
    print(f"Parameters: {model.count_params():,}")
    return 0


def _plot(args):
    import keras

    _check_output(args, (".png", ".svg", ".pdf", ".dot", ".jpg", ".jpeg"))
    model = _load_or_build(args)

    def draw(splines):
        # What plot_model does, without its IPython display step, which fails for
        # .svg and .dot files whenever IPython is installed.
        graph = keras.utils.model_to_dot(
            model, show_shapes=True, show_layer_names=True, rankdir=args.rankdir,
            dpi=args.dpi, splines=splines,
        )
        graph.write(args.output, format=os.path.splitext(args.output)[1][1:].lower())

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


def _export(args):
    from attunet_keras import export

    _check_output(args, {"onnx": (".onnx",), "litert": (".tflite",)}.get(args.format))
    if args.quantize and args.format != "litert":
        raise ValueError("--quantize int8 applies to --format litert only.")
    if args.quantize and not args.run:
        raise ValueError(
            "--quantize int8 needs --run DIR: the run's training tiles calibrate it."
        )
    model = _load_or_build(args)
    sample = _check_batch(model, args.seed)
    representative = _representative_images(args) if args.quantize else None
    max_diff = export.export_model(
        model, args.output, format=args.format, quantize=args.quantize,
        representative=representative, sample=sample, threshold=args.threshold,
        overwrite=args.overwrite,
    )
    what = {"savedmodel": "SavedModel (signatures probabilities, mask)",
            "onnx": "ONNX model", "litert": "LiteRT model"}[args.format]
    print(f"Wrote {what} {args.output} (input {tuple(model.inputs[0].shape)}"
          f"{', int8' if args.quantize else ''})")
    if max_diff is not None:
        print(f"Reloaded and checked on a batch of {sample.shape}: "
              f"max |export - keras| = {max_diff:.3g}")
    elif args.quantize:
        print("int8 outputs differ from float32 by design; benchmarks/deploy.py "
              "measures the Dice it keeps.")
    return 0


def _representative_images(args, count=64):
    """Up to `count` training tiles of the run, in the model's layout."""
    import numpy as np

    from attunet_keras import training

    config = training.read_config(args.run)
    tiles = training.load_data(config).train.images
    chosen = np.random.default_rng(args.seed).permutation(len(tiles))[:count]
    images = tiles[np.sort(chosen)]
    if config.data_format == "channels_first":
        images = np.transpose(images, (0, 3, 1, 2))
    return images


def _train(args):
    from attunet_keras import distribute
    from attunet_keras import training

    config = training.TrainConfig(
        dataset=args.dataset, output=args.output, epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
        learning_rate=args.learning_rate, loss=args.loss, seed=args.seed,
        depth=args.depth, features=args.features, tile=args.tile,
        data_format=args.data_format, n_label=args.n_label,
        backup_every=args.backup_every, dropout=args.dropout,
        batch_norm=args.batch_norm, upsampling=args.upsampling, gate=args.gate,
        deep_supervision=args.deep_supervision, strategy=args.strategy,
        precision=args.precision, jit_compile=args.jit_compile,
    )
    config.validate()
    if args.cpu_devices is not None:
        distribute.split_cpu(args.cpu_devices)
    verbose = args.verbose if args.verbose == "auto" else int(args.verbose)
    result = training.train(config, overwrite=args.overwrite, verbose=verbose)
    _print_scores(result)
    return 0


def _evaluate(args):
    from attunet_keras import training

    result = training.evaluate_run(args.run)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_scores(result)
    return 0


def _print_scores(result):
    print(f"Held-out scores on {result['dataset']} ({result['held_out_tiles']} tiles):")
    print(f"  {'metric':<24}{'att_unet':>10}{'Otsu':>10}")
    for name, value in result["model"].items():
        print(f"  {name:<24}{value:>10.4f}{result['otsu'][name]:>10.4f}")


def _inputs(args):
    """(name, image, mask or None, normalized) for the command's images."""
    from attunet_keras import data
    from attunet_keras import inference
    from attunet_keras import training

    if args.input:
        return [(os.path.splitext(os.path.basename(path))[0], data.read_image(path),
                 None, False) for path in inference.image_files(args.input)]
    if not args.run:
        raise ValueError("give an IMAGE (or folder), or --run DIR for its held-out images.")
    dataset = training.load_data(training.read_config(args.run))
    return [(name, image, mask, True) for name, image, mask in dataset.examples]


def _predict(args):
    from attunet_keras import data
    from attunet_keras import inference

    inputs = _inputs(args)
    model = inference.fully_convolutional(_load_or_build(args))
    n_label = model.output.shape[1 if inference.model_data_format(model) ==
                                 "channels_first" else -1]
    os.makedirs(args.output, exist_ok=True)
    for name, image, _, normalized in inputs:
        paths = [os.path.join(args.output, f"{name}_{kind}.png")
                 for kind in ("mask", "overlay")]
        existing = [path for path in paths if os.path.exists(path)]
        if existing and not args.overwrite:
            raise FileExistsError(f"{existing[0]} already exists; pass --overwrite.")
        probabilities = inference.predict_probabilities(model, image, normalized=normalized)
        labels = inference.labels_from_probabilities(probabilities, args.threshold)
        shown = image if normalized else data.normalize(image)
        inference.save_png(paths[0], inference.mask_png(labels, n_label))
        inference.save_png(paths[1], inference.overlay(shown, labels))
        print(f"Wrote {paths[0]} and {paths[1]} ({labels.shape[0]}x{labels.shape[1]})")
    return 0


def _attention(args):
    from attunet_keras import data
    from attunet_keras import inference

    _check_output(args, (".png",))
    name, image, _, normalized = _inputs(args)[0]
    model = _load_or_build(args)
    probabilities, gate_maps = inference.attention_maps(model, image, normalized=normalized)
    shown = image if normalized else data.normalize(image)
    inference.attention_figure(args.output, shown, probabilities, gate_maps,
                               title=f"Attention gates of {model.name} on {name}")
    print(f"Wrote {args.output}: {len(gate_maps)} gates "
          f"({', '.join(f'{g} {m.shape[0]}x{m.shape[1]}' for g, m in gate_maps.items())})")
    return 0


def _check_batch(model, seed):
    """A random batch of two images for the model's input.

    An unknown spatial size becomes the smallest multiple of 2**pooling levels that
    is at least 64.
    """
    import numpy as np

    from attunet_keras import inference

    multiple = 2 ** inference.pooling_levels(model)
    free_size = multiple * max(1, -(-64 // multiple))
    shape = [2] + [free_size if size is None else size for size in model.input.shape[1:]]
    return np.random.default_rng(seed).random(shape, dtype="float32")


def _version():
    from attunet_keras import __version__

    return f"attunet-keras {__version__}"


_COMMANDS = {
    "summary": _summary, "plot": _plot, "export": _export, "train": _train,
    "evaluate": _evaluate, "predict": _predict, "attention": _attention,
}


if __name__ == "__main__":
    sys.exit(main())
