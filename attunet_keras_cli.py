"""The `attunet-keras` console script: its argument parser, run before TensorFlow loads.

`import attunet_keras` imports Keras (and so TensorFlow) to register the package's
custom objects, which takes seconds. This module stands outside the package so that
`attunet-keras --help` and every argument error answer at once, and so that
TensorFlow's C++ logging can be set before TensorFlow starts: `TF_CPP_MIN_LOG_LEVEL`
defaults to 2 here (errors only; set it in the environment to see more). Once the
arguments are parsed, `attunet_keras.commands` runs the command.

TensorFlow's start-up lines (absl's "All log messages before absl::InitializeLog()",
oneDNN's and the CUDA stub's notices) are printed by its C++ libraries while they
load, before `TF_CPP_MIN_LOG_LEVEL` is read, and twice (two libraries). The CLI
therefore sets `TF_CPP_MIN_LOG_LEVEL=3` when the environment does not set it, and
imports TensorFlow with the standard error stream captured, passing on every line
but those notices. `TF_CPP_MIN_LOG_LEVEL=0 attunet-keras ...` shows everything.
"""

import argparse
import math
import os
import sys
import types

# Choices and defaults of the library, repeated here so that the parser needs no
# TensorFlow; tests/test_cli.py checks that they equal the library's.
LOSSES = ("bce", "dice", "bce_dice", "focal", "tversky")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multiworker", "tpu",
              "data_parallel")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
JIT_CHOICES = ("auto", "on", "off")
CHANNEL_CONVERSIONS = ("gray", "rgb")
# The backends Keras 3 knows (keras.src.backend.config); the package is tested under the
# first three.
NORMALIZATIONS = ("ct", "zscore", "percentile", "rescale_to_0_1", "rgb_to_0_1", "none")
KERAS_BACKENDS = ("tensorflow", "jax", "torch", "numpy", "openvino")
BACKBONES = ("vgg16", "resnet50", "resnet50v2", "efficientnetb0", "efficientnetb1",
             "efficientnetb2", "efficientnetb3", "mobilenetv2", "convnext_tiny")
TRAIN_DEFAULTS = types.SimpleNamespace(
    epochs=30, batch_size=8, learning_rate=2e-3, loss="bce_dice", seed=0, depth=4,
    features=16, tile=None, data_format="channels_last", backup_every=5, dropout=0.2,
    upsampling="nearest", gate="additive", strategy="auto", precision="float32",
    jit_compile="auto", cluster_timeout=300, freeze_epochs=0, foreground_fraction=0.33,
    val_fraction=0.2, val_batches=50,
)


def _fraction(text):
    """A number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, received {text!r}")
    return value


def _positive_int(text):
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, received {text!r}")
    return value


def _probability(text):
    """A number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(
            f"expected a number between 0 and 1 (exclusive), received {text!r}")
    return value


def _overlap(text):
    """A number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(
            f"expected a number in [0, 1), received {text!r}")
    return value


def _channels_option(parser):
    parser.add_argument(
        "--channels", choices=CHANNEL_CONVERSIONS, default=None,
        help="convert images to the model's channels: gray (channel mean; RGBA drops "
             "alpha first) or rgb (gray repeated, alpha dropped). Without it an image "
             "whose channel count differs from the model's is refused",
    )


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
    group = parent.add_argument_group(
        "model options (att_unet arguments)",
        "The defaults are the reference model's (features 32, channels_first, 3 input "
        "channels); train's differ: features 16, channels_last, the data's channels.")
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


def _version():
    """The installed version, read without importing the package (and TensorFlow)."""
    from importlib import metadata

    try:
        return f"attunet-keras {metadata.version('attunet_keras')}"
    except metadata.PackageNotFoundError:
        return "attunet-keras (not installed)"


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
    plot.add_argument("--dpi", type=_positive_int, default=96,
                      help="resolution in dots per inch (default: 96)")
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
            "'probabilities' (= serving_default) and 'mask' (uint8), and the end-to-end "
            "'segment' (raw float32 images; segment_uint8, segment_uint16, "
            "segment_int16), and 'segment_png' for 2D models: the run's normalisation, "
            "padding and sliding windows inside the graph, checked against predict "
            "(docs/deployment.md). onnx: an .onnx "
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
    export.add_argument("--threshold", type=_probability, default=0.5,
                        help="threshold of the SavedModel's mask signature for sigmoid "
                             "outputs (default: 0.5)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace OUTPUT when it exists")
    export.add_argument("--seed", type=int, default=0,
                        help="seed of the random check batch (default: 0)")
    raw = export.add_argument_group(
        "raw images in, masks out: the segment signatures (savedmodel, by default) or "
        "graph (onnx, litert, with --segment)")
    raw.add_argument("--normalization", default=None, metavar="SCHEME[,SCHEME...]",
                     help=f"what segment applies to raw images, one for every channel or "
                          f"one per channel: {', '.join(n for n in NORMALIZATIONS if n != 'ct')} "
                          "(default: the run's; a model without --run gets no segment "
                          "signature unless this is given)")
    raw.add_argument("--patch", type=_positive_int, default=None, metavar="N",
                     help="segment runs images with a side longer than N by sliding "
                          "windows of N (default: the run's patch, the model's own size; "
                          "a model of free sizes without it runs every image whole)")
    raw.add_argument("--no-segment", action="store_true",
                     help="leave the segment signatures out (a faster export)")
    raw.add_argument("--segment", action="store_true",
                     help="onnx and litert: write the end-to-end graph (raw images in; "
                          "the normalisation, padding and mask inside; every image whole, "
                          "litert at the model's own size) instead of the plain model "
                          "(savedmodel: the default)")

    convert = commands.add_parser(
        "convert", help="a PyTorch AttU_Net or MONAI AttentionUnet checkpoint as a .keras "
                        "model, checked",
        description=(
            "Convert a PyTorch AttU_Net checkpoint (LeeJunHyun/Image_Segmentation's "
            "module names; a bare state_dict, {'state_dict': ...} or {'model': ...}, "
            "'module.' prefixes allowed) into att_unet(..., variant='attu_net'), or, with "
            "--variant monai, a MONAI AttentionUnet one into variant='monai'. The "
            "rank, depth, widths, input channels, classes and up-sampling mode are read "
            "from the checkpoint's tensors (the flags override them), every tensor is "
            "mapped by name, and the result is compared with a PyTorch forward pass of "
            "the checkpoint (within 1e-4) when torch is installed."
        ),
    )
    convert.add_argument("--from-torch", required=True, metavar="CKPT",
                         help="the .pt / .pth checkpoint (read with weights_only=True)")
    convert.add_argument("--output", required=True, metavar="FILE.keras",
                         help="the Keras model to write")
    convert.add_argument("--variant", choices=("attu_net", "monai"), default="attu_net",
                         help="the PyTorch network: attu_net (LeeJunHyun's AttU_Net) or "
                              "monai (monai.networks.nets.AttentionUnet, channels doubling "
                              "from level to level, strides 2) (default: attu_net)")
    convert.add_argument("--data-format", choices=("channels_first", "channels_last"),
                         default="channels_last",
                         help="layout of the Keras model (default: channels_last)")
    for flag, what in (("--depth", "pooling levels"), ("--features", "first width"),
                       ("--in-channels", "input channels"),
                       ("--n-label", "output channels")):
        convert.add_argument(flag, type=_positive_int, default=None, metavar="N",
                             help=f"{what} (default: from the checkpoint)")
    convert.add_argument("--upsampling", choices=("nearest", "transpose"), default=None,
                         help="nn.Upsample or ConvTranspose2d(4, 2, 1) (default: from "
                              "the checkpoint)")
    convert.add_argument("--second-sigmoid", action="store_true",
                         help="the gate applies its sigmoid twice (a blog version)")
    convert.add_argument("--output-activation", choices=("sigmoid", "softmax", "none"),
                         default=None,
                         help="activation after Conv_1x1 (default: sigmoid for one "
                              "output channel, softmax for more; none: PyTorch's logits)")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace FILE.keras when it exists")

    report = commands.add_parser(
        "report", help="one self-contained report.html of a run or a cross-validation",
        description=(
            "Write one self-contained HTML page (every image embedded, no network): "
            "the learning curves of log.csv, the per-case class table with NSD, per-case "
            "Dice box plots, the worst and best held-out cases as overlays with their "
            "scores, and the attention maps of one case. For a cross-validation folder, "
            "every fold's curves and the post-processing decided."
        ),
    )
    report.add_argument("folder", metavar="RUN_OR_CV_DIR",
                        help="a training run, or a cross-validate folder")
    report.add_argument("--output", default=None, metavar="FILE.html",
                        help="the page to write (default: FOLDER/report.html)")
    report.add_argument("--overwrite", action="store_true",
                        help="replace the page when it exists")

    _add_train_parser(commands)
    _add_plan_parser(commands)

    check_data = commands.add_parser(
        "check-data", help="read every image/mask pair of a folder once; list all problems",
        description=(
            "Read every image/mask pair of a folder dataset (DIR/images, DIR/masks) once "
            "and print every problem, each with its file: unreadable or truncated "
            "files, NaN or infinite pixels, float or RGB masks, labels outside "
            "0..N-1, image and mask sizes that differ, images without masks and masks "
            "without images. A Decathlon / nnU-Net v2 folder: every case listed in "
            "dataset.json or imagesTr/ read once: missing files, channels of another "
            "shape or affine, labels outside dataset.json's. Exit status 1 if there is "
            "any."
        ),
    )
    check_data.add_argument("dataset", metavar="DIR",
                            help="folder with images/ and masks/, or a Decathlon / "
                                 "nnU-Net v2 folder")
    check_data.add_argument("--n-label", type=_positive_int, default=None, metavar="N",
                            help="1 for binary masks (0/1 or 0/255), else the number of "
                                 "classes, background included (needed for images/ + "
                                 "masks/; a Decathlon / nnU-Net folder's dataset.json "
                                 "gives it)")

    evaluate = commands.add_parser(
        "evaluate", help="held-out Dice and IoU of a run, next to an Otsu baseline",
        description=(
            "Print the held-out Dice and IoU of a training run's best model and of an "
            "Otsu threshold on the same held-out pixels."
        ),
    )
    evaluate.add_argument("run", metavar="RUN_DIR", help="folder of a training run")
    evaluate.add_argument("--model", metavar="FILE.keras",
                          help="evaluate this saved model on the run's held-out data "
                               "instead of the run's best (it must take the run's "
                               "channels and give its classes)")
    evaluate.add_argument("--with-run", metavar="DIR", action="append", default=None,
                          help="evaluate the ensemble of the run's best model and this "
                               "run's (repeatable; probabilities averaged) on the run's "
                               "held-out data: runs that never saw those cases")
    evaluate.add_argument("--json", action="store_true", help="print JSON")
    evaluate.add_argument("--output", default=None, metavar="DIR",
                          help="folder of summary.json and summary.csv (per case and "
                               "class: Dice, IoU, HD95, NSD, volumes; default: the run "
                               "folder)")
    evaluate.add_argument("--nsd-tolerance", type=float, default=1.0, metavar="MM",
                          help="tolerance of the normalised surface Dice, in mm for "
                               "volumes with a spacing, else pixels (default: 1.0)")
    evaluate.add_argument("--postprocess", choices=("auto", "none"), default="auto",
                          help="auto: apply the post-processing a cross-validation "
                               "decided (postprocessing.json in the run's parent "
                               "folder), when there is one (default: auto)")

    predict = commands.add_parser(
        "predict", help="write masks and overlay PNGs for an image or a folder",
        description=(
            "Write NAME_mask.png (0/255 for binary models, class indices otherwise) "
            "and NAME_overlay.png for each image. Without IMAGE, a run's held-out "
            "images are used."
        ),
    )
    predict.add_argument("input", nargs="?", metavar="IMAGE_OR_FOLDER",
                         help="a PNG/JPEG/TIFF image or a folder of them; or NIfTI volumes "
                              "for a 3D model, written as NAME_mask.nii.gz with the "
                              "input's affine and header")
    which = predict.add_argument_group("model").add_mutually_exclusive_group(required=True)
    which.add_argument("--model", metavar="FILE.keras", help="use this saved model")
    which.add_argument("--run", metavar="DIR", action="append",
                       help="use the best model of this training run; given several "
                            "times, the runs predict as one ensemble (their "
                            "probabilities averaged)")
    which.add_argument("--cross-validation", metavar="CV_DIR",
                       help="the ensemble of every fold of attunet-keras cross-validate, "
                            "with its post-processing")
    predict.add_argument("--output", required=True, metavar="DIR",
                         help="folder for the PNGs (created)")
    predict.add_argument("--threshold", type=_probability, default=0.5,
                         help="probability threshold of binary models, in (0, 1) "
                              "(default: 0.5)")
    _channels_option(predict)
    windows = _window_options(predict)
    windows.add_argument("--tta", action="store_true",
                         help="test-time augmentation: average the predictions of every "
                              "flip of the axes (4 passes)")
    predict.add_argument("--postprocess", choices=("auto", "none"), default="auto",
                         help="auto: apply the post-processing a cross-validation "
                              "decided (postprocessing.json in the parent folder of "
                              "--run), when there is one (default: auto)")
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
                           help="a PNG/JPEG/TIFF image, or a NIfTI volume for a 3D model "
                                "(the figure shows its middle slice, and every gate's map "
                                "is also written as FILE_<gate>.nii.gz)")
    _trained_model_options(attention.add_argument_group("model"), required=True)
    attention.add_argument("--output", required=True, metavar="FILE.png",
                           help="the figure to write")
    attention.add_argument("--overwrite", action="store_true",
                           help="replace FILE when it exists")
    _channels_option(attention)
    _window_options(attention)
    return parser


def _medical_options(group):
    group.add_argument("--spacing", default=None, metavar="auto|none|X,Y,Z",
                       help="target voxel spacing: auto (nnU-Net's rule: the median, or "
                            "the 10th percentile of a coarse axis), none (voxels as "
                            "stored) or X,Y,Z in mm (default: auto)")
    group.add_argument("--normalization", default=None, metavar="SCHEME[,SCHEME...]",
                       help=f"intensity normalisation, one for every channel or one per "
                            f"channel: {', '.join(NORMALIZATIONS)} (default: from each "
                            "channel's modality: CT -> ct, the dataset's foreground "
                            "percentiles and statistics; others -> zscore per image)")


def _add_plan_parser(commands):
    plan = commands.add_parser(
        "plan", help="plan a Decathlon / nnU-Net folder: spacing, normalisation, patch",
        description=(
            "Read a Decathlon or nnU-Net v2 folder's headers and voxels once and write "
            "DIR/plan.json: cases, channels, labels, spacing percentiles and the target "
            "spacing, the median shape after resampling, the patch, batch size and depth "
            "that fit --memory-gb, the normalisation of every channel with its "
            "statistics and the class frequencies. train --plan uses it. The rules are "
            "nnU-Net v2's (docs/data.md)."
        ),
    )
    plan.add_argument("dataset", metavar="DIR", help="folder with dataset.json, imagesTr/, "
                                                      "labelsTr/")
    plan.add_argument("--output", default=None, metavar="PLAN.json",
                      help="where to write the plan (default: DIR/plan.json)")
    _medical_options(plan)
    plan.add_argument("--memory-gb", type=float, default=None, metavar="GB",
                      help="memory one training step may take (default: what is free "
                           "now, at most 8)")
    plan.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                      help="fix the batch size (default: 2 for volumes, 12 for images)")
    plan.add_argument("--depth", type=_positive_int, default=None, metavar="N",
                      help="fix the depth (default: as deep as 4 voxels at the bottom "
                           "allow, at most 5)")
    plan.add_argument("--features", type=_positive_int, default=TRAIN_DEFAULTS.features,
                      metavar="N", help="base features the memory estimate assumes "
                                        f"(default: {TRAIN_DEFAULTS.features})")
    plan.add_argument("--overwrite", action="store_true", help="replace the plan")


def _window_options(command):
    """--patch and --overlap: sliding windows for images larger than a patch."""
    windows = command.add_argument_group("large images")
    windows.add_argument("--patch", type=_positive_int, default=None, metavar="N",
                         help="run an image with a side longer than N by sliding windows "
                              "of NxN patches, Gaussian-blended (N a multiple of "
                              "2**depth); smaller images whole (default: every image "
                              "whole)")
    windows.add_argument("--overlap", type=_overlap, default=0.5,
                         help="fraction of a patch shared with its neighbour, in [0, 1) "
                              "(default: 0.5)")
    return windows


def _add_train_parser(commands):
    train = commands.add_parser(
        "train", help="train on nuclei, brain or a folder of images and masks",
        description=(
            "Train an att_unet with Keras fit. The run folder gets config.json, "
            "best.keras (best held-out Dice), last.keras, log.csv, tensorboard/, "
            "summary.json and summary.csv (per held-out case) and result.json. A run "
            "that was killed resumes from its last backup when the same command is run "
            "again."
        ),
    )
    _add_train_arguments(train)
    cross_validate = commands.add_parser(
        "cross-validate", help="K-fold cross-validation: every fold, then all together",
        description=(
            "Train every fold of a K-fold split of a folder dataset's cases in turn "
            "(OUTPUT/fold_0 ... fold_{K-1}, each a train run with --folds K --fold F "
            "sharing OUTPUT/splits.json; killed and run again, it goes on where it "
            "stopped), then evaluate the held-out cases of all folds together: "
            "OUTPUT/summary.json and summary.csv, and the post-processing decided from "
            "them (nnU-Net's largest-component rule) in OUTPUT/postprocessing.json, "
            "which predict and evaluate apply with --postprocess auto. Takes every "
            "train option; --output is the cross-validation folder."
        ),
    )
    _add_train_arguments(cross_validate, cross_validation=True)


def _add_train_arguments(train, cross_validation=False):
    defaults = TRAIN_DEFAULTS
    train.add_argument("--dataset", required=True, metavar="nuclei|brain|brain3d|PATH",
                       help="built-in dataset, a folder with images/ and masks/ (2D "
                            "images, or NIfTI volumes for att_unet_3d), or a Decathlon / "
                            "nnU-Net v2 folder (dataset.json, imagesTr/, labelsTr/)")
    train.add_argument("--output", required=True, metavar="DIR",
                       help="the cross-validation folder" if cross_validation
                       else "the run folder")
    train.add_argument("--epochs", type=int, default=defaults.epochs,
                       help=f"epochs (default: {defaults.epochs})")
    train.add_argument("--steps-per-epoch", type=int, default=None, metavar="N",
                       help="batches per epoch (default: every training image's patches "
                            "once)")
    train.add_argument("--batch-size", type=int, default=defaults.batch_size,
                       metavar="N", help=f"batch size (default: {defaults.batch_size})")
    train.add_argument("--learning-rate", type=float, default=defaults.learning_rate,
                       metavar="LR", help=f"Adam (default: {defaults.learning_rate})")
    train.add_argument("--loss", choices=LOSSES, default=defaults.loss,
                       help=f"loss (default: {defaults.loss}; bce and focal are "
                            "categorical for several classes)")
    train.add_argument("--seed", type=int, default=defaults.seed,
                       help=f"seed (default: {defaults.seed})")
    train.add_argument("--depth", type=int, default=defaults.depth, metavar="N",
                       help=f"att_unet depth (default: {defaults.depth})")
    train.add_argument("--features", type=int, default=defaults.features, metavar="N",
                       help=f"att_unet base features (default: {defaults.features}; summary, "
                            "plot and export default to the reference's 32)")
    train.add_argument("--tile", type=int, default=defaults.tile, metavar="N",
                       help="side of the training patches (the model's input) for nuclei "
                            "and folders (default: 128 for images, 64 for volumes)")
    train.add_argument("--dims", type=int, choices=(2, 3), default=None,
                       help="2 (att_unet) or 3 (att_unet_3d on NIfTI volumes); default: "
                            "from the dataset's files")
    train.add_argument("--patches-per-image", type=_positive_int, default=None, metavar="N",
                       help="random patches drawn from each training image per epoch "
                            "(default: as many as the image's area holds tiles)")
    train.add_argument("--foreground-fraction", type=_fraction,
                       default=defaults.foreground_fraction, metavar="P",
                       help="share of the patches centred on a labelled pixel "
                            f"(default: {defaults.foreground_fraction})")
    train.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                       metavar="F",
                       help="share of a folder dataset's files held out, drawn with --seed "
                            f"and recorded in config.json (default: {defaults.val_fraction})")
    if cross_validation:
        train.add_argument("--folds", type=int, default=5, metavar="K",
                           help="folds (default: 5)")
    else:
        train.add_argument("--folds", type=int, default=None, metavar="K",
                           help="K-fold cross-validation by case: hold out fold --fold "
                                "of K instead of --val-fraction; the split is written "
                                "once as splits.json in the parent folder of --output "
                                "and reused")
        train.add_argument("--fold", type=int, default=None, metavar="F",
                           help="the held-out fold, 0..K-1 (with --folds)")
    train.add_argument("--splits", default=None, metavar="FILE",
                       help="the splits.json of --folds (default: beside the run folder)")
    train.add_argument("--val-batches", type=_positive_int, default=defaults.val_batches,
                       metavar="N",
                       help="batches of held-out patches behind every epoch's val_dice and "
                            "the choice of best.keras: the held-out images' tiles when "
                            "they hold no more, else N batches drawn once with --seed; "
                            "the whole held-out images are scored at the end "
                            f"(default: {defaults.val_batches})")
    train.add_argument("--cache", default=None, metavar="DIR",
                       help="keep decoded, normalised pairs of a folder dataset in DIR so "
                            "later epochs skip decoding; entries of changed files are "
                            "rebuilt (default: off)")
    medical = train.add_argument_group(
        "Decathlon / nnU-Net folders (dataset.json, imagesTr/, labelsTr/)")
    _medical_options(medical)
    medical.add_argument("--plan", default=None, metavar="PLAN.json",
                         help="the plan of attunet-keras plan (default: planned when the "
                              "run starts, recorded as RUN/plan.json)")
    train.add_argument("--data-format", choices=("channels_first", "channels_last"),
                       default=defaults.data_format,
                       help=f"layout (default: {defaults.data_format}, faster on CPUs; "
                            "summary, plot and export default to the reference's "
                            "channels_first)")
    train.add_argument("--n-label", type=int, default=None, metavar="N",
                       help="classes of a folder dataset: 1 for binary masks (a Decathlon "
                            "/ nnU-Net folder's dataset.json gives it)")
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
    encoders = train.add_argument_group("pretrained encoder (keras.applications)")
    encoders.add_argument("--backbone", choices=BACKBONES, default=None,
                          help="use this application as the encoder (channels_last, tiles "
                               "divisible by 32; see docs/architecture.md)")
    variants.add_argument("--init-from", default=None, metavar="FILE.keras",
                          help="train this saved model (its architecture and weights, "
                               "e.g. a PyTorch AttU_Net from attunet-keras convert) "
                               "instead of building an att_unet from these options")
    encoders.add_argument("--backbone-weights", default=None, metavar="imagenet|PATH",
                          help="imagenet (Keras downloads and caches them) or a weights "
                               "file of the application without its top (default: random)")
    encoders.add_argument("--freeze-epochs", type=int, default=defaults.freeze_epochs,
                          metavar="N",
                          help="train the decoder alone for N epochs, then unfreeze the "
                               "encoder at a tenth of the learning rate (default: 0)")
    train.add_argument("--backup-every", type=int, default=defaults.backup_every,
                       metavar="N", help="steps between resumable backups "
                                         f"(default: {defaults.backup_every})")
    if not cross_validation:
        train.add_argument("--overwrite", action="store_true",
                           help="delete an existing run in DIR and start again")
    scale = train.add_argument_group("distribution and precision")
    scale.add_argument("--strategy", choices=STRATEGIES, default=defaults.strategy,
                       help="tf.distribute strategy under TensorFlow (default: auto = "
                            "TPU if found, mirrored over several GPUs, else one device); "
                            "under KERAS_BACKEND=jax or torch: default (one device), or "
                            "data_parallel (jax: keras.distribution over every local "
                            "device); --batch-size is per replica")
    scale.add_argument("--precision", choices=PRECISIONS,
                       default=defaults.precision,
                       help=f"Keras dtype policy (default: {defaults.precision}); the "
                            "output layer stays float32")
    scale.add_argument("--jit-compile", choices=JIT_CHOICES,
                       default=defaults.jit_compile,
                       help="XLA (default: auto = off under several replicas, where "
                            "it fails, and on CPUs)")
    scale.add_argument("--cpu-devices", type=_positive_int, default=None, metavar="N",
                       help="split the CPU into N logical devices, so 'mirrored' has N "
                            "replicas without a GPU (testing)")
    scale.add_argument("--cluster-timeout", type=_positive_int,
                       default=defaults.cluster_timeout, metavar="SECONDS",
                       help="multiworker: seconds to wait for every worker to join "
                            f"before giving up (default: {defaults.cluster_timeout})")
    train.add_argument("--verbose", choices=("auto", "0", "1", "2"), default="auto",
                       help="Keras fit output: 1 progress bar, 2 one line per epoch "
                            "(default: auto)")


# TensorFlow's notices while its libraries load (see the module docstring).
_STARTUP_NOTICES = (
    "All log messages before absl::InitializeLog() is called",
    "port.cc:", "cudart_stub.cc:", "cpu_feature_guard.cc:", "cuda_platform.cc:",
    "To enable the following instructions:",
)


def _import_commands(quiet):
    """Imports `attunet_keras.commands` (and TensorFlow); with `quiet`, drops TF's
    notices."""
    if not quiet or "tensorflow" in sys.modules:
        from attunet_keras import commands

        return commands
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            # Under KERAS_BACKEND=jax or torch Keras does not import TensorFlow, but the
            # data pipeline (tf.data) does, later: import it here, quietly, for all.
            import tensorflow  # noqa: F401

            from attunet_keras import commands
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines
                                     if not any(n in line for n in _STARTUP_NOTICES)))
    return commands


def main(argv=None):
    """Runs the command line; returns the exit status."""
    quiet = "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    if quiet:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    parser = build_parser()
    args = parser.parse_args(argv)
    backend = os.environ.get("KERAS_BACKEND")
    if backend is not None and backend not in KERAS_BACKENDS:
        parser.exit(2, f"attunet-keras {args.command}: error: KERAS_BACKEND={backend!r} is "
                       f"not a Keras backend; expected one of {', '.join(KERAS_BACKENDS)} "
                       "(this package runs under tensorflow, jax and torch).\n")
    return _import_commands(quiet).run(parser, args)


if __name__ == "__main__":
    sys.exit(main())
