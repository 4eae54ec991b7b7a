"""The settings of a training run (`TrainConfig`), as written in its `config.json`,
and the dataset they name (`load_data`).

Every `TrainConfig` field is an `attunet-keras train` flag of the same name, declared
in `attunet_keras_cli` (the parser runs before TensorFlow loads) with the same default
(`TRAIN_DEFAULTS`); `tests/test_cli.py` checks the two against each other both ways,
and `TrainConfig.validate` checks every value.
"""

import dataclasses
import json
import math
import os

from attunet_keras import _validation
from attunet_keras import data as data_lib
from attunet_keras import losses as losses_lib

CONFIG_FILE = "config.json"


@dataclasses.dataclass
class TrainConfig:
    """The settings of a training run (every `attunet-keras train` option).

    Args:
        dataset: str. `"nuclei"`, `"brain"`, `"brain3d"`, a folder with `images/`
            and `masks/` (2D images or NIfTI volumes), or a Decathlon / nnU-Net v2
            folder (`dataset.json`, `imagesTr/`, `labelsTr/`: `data.medical`).
        output: str. The run folder.
        epochs: int. Epochs to train.
        steps_per_epoch: int or None. Batches per epoch; `None`: the training images'
            patches of an epoch (`patches_per_image` each) once.
        batch_size: int. Batch size.
        learning_rate: float. Adam's learning rate.
        loss: str. One of `attunet_keras.losses.LOSSES`.
        seed: int. Seed of weights, shuffling and augmentation.
        depth: int. `att_unet` depth.
        features: int. `att_unet` base features.
        tile: int or None. Patch side for `nuclei` and folder datasets (the model's
            input size); `None`: 128 for images, 64 for volumes.
        dims: int or None. 2 (`att_unet`) or 3 (`att_unet_3d`, NIfTI volumes);
            `None`: from the dataset's files.
        patches_per_image: int or None. Random patches drawn from each training image
            per epoch; `None`: as many as the image's area holds tiles.
        foreground_fraction: float. Share of the patches centred on a labelled pixel.
        cache: str or None. A folder for decoded, normalised pairs of a folder dataset.
        val_fraction: float. Share of a folder dataset's files held out.
        folds: int or None. K-fold cross-validation by case (`folds.py`): hold out
            fold `fold` of `folds`, instead of `val_fraction`.
        fold: int or None. The held-out fold, 0..folds-1 (with `folds`).
        splits: str or None. The `splits.json` of the folds; `None`: beside the run
            folder (in the parent of `output`).
        val_batches: int or None. Batches of held-out patches behind every epoch's
            `val_dice` (and the choice of `best.keras`): the held-out images' tiles
            when they hold no more, else a fixed seeded draw of patches
            (`data.validation_dataset`), so validation does not grow with the data;
            `None` (runs recorded before the option): every held-out tile.
        val_files: list of str or None. The held-out files of a folder dataset; drawn
            with `seed` when the run starts and recorded, so a resumed run and
            `evaluate` use the same files.
        spacing: str or None. Decathlon / nnU-Net folders: `auto` (nnU-Net's target
            spacing), `none` (voxels as stored) or `X,Y,Z` in mm; None: `auto`.
        normalization: str or None. Decathlon / nnU-Net folders: a
            `data.planning.SCHEMES` name for every channel, or one per channel
            (comma-separated); None: from each channel's modality (CT -> ct,
            others -> zscore).
        plan: str or None. A `plan.json` of `attunet-keras plan`; None: planned when
            the run starts and recorded in the run folder.
        data_format: str. Layout of the model and the batches.
        n_label: int or None. Classes of a folder dataset (1: binary).
        backup_every: int. Steps between backups (`recorder.RunRecorder`).
        dropout, batch_norm, upsampling, gate, deep_supervision: `att_unet` options.
            With deep supervision the head of decoder level k gets the loss weight
            0.5 ** (k - 1), and the metrics and the checkpoint follow the main output.
        init_from: str or None. A `.keras` model to train from (its architecture and
            weights, e.g. a PyTorch AttU_Net from `attunet-keras convert`) instead of
            building an `att_unet` from the options above.
        backbone: str or None. A `backbones.BACKBONES` encoder for `att_unet`.
        backbone_weights: str or None. `"imagenet"` or a weights file of the encoder.
        freeze_epochs: int. With a backbone, train the first `freeze_epochs` epochs
            with the encoder frozen, then unfreeze it and go on at
            `learning_rate * FINE_TUNE_LEARNING_RATE_FACTOR` (two-stage fine-tuning).
        strategy: str. A `distribute.STRATEGIES` name; `batch_size` is per replica.
        precision: str. `float32`, `mixed_float16` or `mixed_bfloat16`.
        jit_compile: str. `auto` (off under several replicas), `on` or `off`.
    """

    dataset: str = "nuclei"
    output: str = "runs/nuclei"
    epochs: int = 30
    steps_per_epoch: int = None
    batch_size: int = 8
    learning_rate: float = 2e-3
    loss: str = "bce_dice"
    seed: int = 0
    depth: int = 4
    features: int = 16
    tile: int = None
    dims: int = None
    patches_per_image: int = None
    foreground_fraction: float = data_lib.FOREGROUND_FRACTION
    cache: str = None
    val_fraction: float = 0.2
    folds: int = None
    fold: int = None
    splits: str = None
    val_batches: int = data_lib.VAL_BATCHES
    val_files: list = None
    spacing: str = None
    normalization: str = None
    plan: str = None
    data_format: str = "channels_last"
    n_label: int = None
    backup_every: int = 5
    dropout: float = 0.2
    batch_norm: bool = False
    upsampling: str = "nearest"
    gate: str = "additive"
    deep_supervision: bool = False
    init_from: str = None
    backbone: str = None
    backbone_weights: str = None
    freeze_epochs: int = 0
    strategy: str = "auto"
    precision: str = "float32"
    jit_compile: str = "auto"

    def validate(self):
        """Checks every setting; raises one ValueError naming the first bad one."""
        for name in ("epochs", "batch_size", "depth", "features", "backup_every"):
            _validation.check_int(name, getattr(self, name), 1)
        if self.val_batches is not None:  # None: every held-out tile (older runs)
            _validation.check_int("val_batches", self.val_batches, 1)
        if self.tile is not None:
            _validation.check_int("tile", self.tile, 1)
        if self.dims not in (None, 2, 3):
            raise ValueError(f"dims={self.dims!r} is not supported; expected 2, 3 or None "
                             "(from the files).")
        _validation.check_int("seed", self.seed, 0)
        if self.steps_per_epoch is not None:
            _validation.check_int("steps_per_epoch", self.steps_per_epoch, 1)
        if self.n_label is not None:
            _validation.check_int("n_label", self.n_label, 1)
        data_lib.pipeline.check_pipeline_arguments(
            self.batch_size, self.patches_per_image, self.foreground_fraction)
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0
                and math.isfinite(self.learning_rate)):
            raise ValueError(
                f"learning_rate={self.learning_rate!r} is not allowed; expected a "
                "positive number."
            )
        if self.loss not in losses_lib.LOSSES:
            raise ValueError(
                f"loss={self.loss!r} is not supported; expected one of "
                f"{losses_lib.LOSSES}."
            )
        tile = self.tile or data_lib.DEFAULT_TILE[self.dims or 2]
        if tile % 2**self.depth:
            raise ValueError(
                f"tile={tile} must be divisible by 2**depth={2**self.depth}."
            )
        from attunet_keras import distribute
        from attunet_keras import models

        for name, value, choices in (("strategy", self.strategy, distribute.STRATEGIES),
                                     ("precision", self.precision, distribute.PRECISIONS),
                                     ("jit_compile", self.jit_compile,
                                      distribute.JIT_CHOICES)):
            if value not in choices:
                raise ValueError(
                    f"{name}={value!r} is not supported; expected one of {choices}."
                )
        options = dict(
            n_label=self.n_label or 1, depth=self.depth, features=self.features,
            data_format=self.data_format, in_channels=1, output_activation="sigmoid",
            dropout=self.dropout, batch_norm=self.batch_norm, upsampling=self.upsampling,
            gate=self.gate, deep_supervision=self.deep_supervision, name="att_unet",
            backbone=self.backbone, backbone_weights=self.backbone_weights,
            freeze_backbone=False)
        models.check_arguments(2, {"tile": tile}, options)
        _validation.check_int("freeze_epochs", self.freeze_epochs, 0)
        if self.backbone is not None:
            from attunet_keras import backbones

            backbones.check_backbone_arguments({"tile": tile}, options)
            if self.dims == 3:
                raise ValueError("backbones are 2D keras.applications encoders; volumes "
                                 "(dims=3) train att_unet_3d without one.")
            if self.dataset in ("brain", "brain3d"):
                raise ValueError(
                    "the brain dataset's slices are 112x128, not multiples of 32, so they "
                    "cannot go through a backbone; use nuclei or a folder dataset."
                )
        if self.init_from is not None:
            if self.backbone is not None or self.deep_supervision:
                raise ValueError("init_from trains the architecture of its file; leave "
                                 "backbone and deep_supervision out.")
            if not os.path.isfile(self.init_from):
                raise ValueError(f"init_from={self.init_from!r}: no such .keras file.")
        if self.freeze_epochs and self.backbone is None:
            raise ValueError(
                f"freeze_epochs={self.freeze_epochs} needs a backbone to freeze.")
        if self.freeze_epochs >= self.epochs:
            raise ValueError(
                f"freeze_epochs={self.freeze_epochs} must be less than epochs={self.epochs} "
                "(the encoder is unfrozen for the epochs after it)."
            )
        if self.freeze_epochs and self.strategy == "multiworker":
            raise ValueError("freeze_epochs (two-stage fine-tuning) runs under Keras fit, "
                             "not the multiworker loop.")
        if self.dataset not in data_lib.BUILTIN and not os.path.isdir(self.dataset):
            raise ValueError(
                f"dataset={self.dataset!r} is neither a built-in dataset "
                f"{data_lib.BUILTIN} nor an existing folder with images/ and masks/."
            )
        medical = self.is_medical()
        self._validate_medical(medical)
        if self.dataset not in data_lib.BUILTIN and self.n_label is None and not medical:
            raise ValueError(
                f"dataset={self.dataset!r} is a folder; give n_label (1 for binary "
                "masks, else the number of classes with background)."
            )
        if self.dataset in data_lib.BUILTIN and self.n_label is not None:
            raise ValueError(
                f"n_label is fixed by the built-in dataset {self.dataset!r}; leave it out."
            )
        if not (isinstance(self.val_fraction, (int, float)) and 0.0 < self.val_fraction < 1.0):
            raise ValueError(f"val_fraction={self.val_fraction!r} is not allowed; expected "
                             "a number between 0 and 1.")
        builtin_dims = {"nuclei": 2, "brain": 2, "brain3d": 3}.get(self.dataset)
        if builtin_dims and self.dims not in (None, builtin_dims):
            raise ValueError(f"the built-in {self.dataset!r} is {builtin_dims}D; leave "
                             "dims out.")
        default_fraction = next(field.default for field in dataclasses.fields(self)
                                if field.name == "val_fraction")
        if self.dataset in data_lib.BUILTIN and self.val_fraction != default_fraction:
            raise ValueError(f"val_fraction is fixed by the built-in dataset "
                             f"{self.dataset!r}; leave it out.")
        self._validate_folds(default_fraction)
        if self.dataset in data_lib.BUILTIN and self.cache is not None:
            raise ValueError(
                f"cache is for folder datasets; the built-in {self.dataset!r} is decoded "
                "once and held in memory already.")

    def is_medical(self):
        """True for a Decathlon or nnU-Net v2 folder."""
        return (self.dataset not in data_lib.BUILTIN and os.path.isdir(self.dataset)
                and data_lib.medical.layout(self.dataset) is not None)

    def _validate_medical(self, medical):
        given = [name for name in ("spacing", "normalization", "plan")
                 if getattr(self, name) is not None]
        if not medical:
            if given:
                raise ValueError(f"{given[0]} applies to Decathlon and nnU-Net folders "
                                 "(dataset.json, imagesTr/, labelsTr/); "
                                 f"{self.dataset!r} is not one.")
            return
        data_lib.planning.parse_spacing(self.spacing)
        if self.normalization is not None:
            unknown = [part for part in self.normalization.split(",")
                       if part.strip() not in data_lib.planning.SCHEMES]
            if unknown:
                raise ValueError(f"normalization={self.normalization!r} is not allowed; "
                                 f"expected one of {data_lib.planning.SCHEMES}, or one per "
                                 "channel separated by commas.")
        if self.plan is not None:
            if not os.path.isfile(self.plan):
                raise ValueError(f"plan={self.plan!r}: no such plan.json.")
            if self.spacing is not None or self.normalization is not None:
                raise ValueError("a plan fixes the spacing and the normalization; give "
                                 "--plan or those options, not both.")

    def _validate_folds(self, default_fraction):
        if self.folds is None:
            if self.fold is not None or self.splits is not None:
                raise ValueError("fold and splits go with folds (K-fold cross-validation); "
                                 "give --folds K too.")
            return
        _validation.check_int("folds", self.folds, 2)
        if self.dataset in data_lib.BUILTIN:
            raise ValueError(f"folds split a folder dataset's cases; the built-in "
                             f"{self.dataset!r} has its own fixed split.")
        if self.fold is None:
            raise ValueError(f"folds={self.folds} needs the held-out fold: --fold F, "
                             f"0..{self.folds - 1} (or attunet-keras cross-validate for "
                             "every fold).")
        _validation.check_int("fold", self.fold, 0)
        if self.fold >= self.folds:
            raise ValueError(f"fold={self.fold} is not one of 0..{self.folds - 1}.")
        if self.val_fraction != default_fraction:
            raise ValueError("folds replace val_fraction (the held-out cases are the "
                             "fold's); give one or the other.")

    def to_json(self):
        values = dataclasses.asdict(self)
        values["output"] = os.path.abspath(self.output)
        if self.dataset not in data_lib.BUILTIN:
            values["dataset"] = os.path.abspath(self.dataset)
        if self.backbone_weights not in (None, "imagenet"):
            values["backbone_weights"] = os.path.abspath(self.backbone_weights)
        if self.init_from is not None:
            values["init_from"] = os.path.abspath(self.init_from)
        if self.cache is not None:
            values["cache"] = os.path.abspath(self.cache)
        if self.plan is not None:
            values["plan"] = os.path.abspath(self.plan)
        if self.folds is not None:
            from attunet_keras import folds

            values["splits"] = folds.splits_path(self.output, self.splits)
        return values


def run_plan(config, run_dir=None, say=None):
    """The plan of a Decathlon / nnU-Net run: the one recorded in `run_dir` (a run
    that has started: evaluate, predict, a resumed run), else the `plan` file given,
    or planned now from the folder and the run's settings."""
    from attunet_keras.data import planning

    recorded = run_dir and os.path.join(run_dir, planning.PLAN_FILE)
    if recorded and os.path.isfile(recorded):
        return planning.read_plan(recorded)
    if config.plan is not None:
        return planning.read_plan(config.plan)
    return planning.make_plan(config.dataset, spacing=config.spacing or "auto",
                              normalization=config.normalization,
                              batch_size=config.batch_size, depth=config.depth,
                              features=config.features, say=say)


def load_data(config, run_dir=None):
    """The dataset of a run, split as in training (a folder's recorded held-out files).

    `run_dir`: the run folder whose recorded plan a Decathlon / nnU-Net dataset uses
    (evaluate, predict, a resumed run); None plans afresh (a new run)."""
    if config.is_medical():
        plan = run_plan(config, run_dir)
        dataset = data_lib.medical_folder(
            config.dataset, plan, tile=config.tile, val_fraction=config.val_fraction,
            seed=config.seed, val_files=config.val_files, cache=config.cache,
            n_label=config.n_label)
        dataset.plan = plan
        return dataset
    if config.dataset == "nuclei":
        return data_lib.nuclei(tile=config.tile or data_lib.DEFAULT_TILE[2])
    if config.dataset == "brain":
        return data_lib.brain()
    if config.dataset == "brain3d":
        return data_lib.brain3d()
    return data_lib.folder(config.dataset, config.n_label, tile=config.tile,
                           val_fraction=config.val_fraction, seed=config.seed,
                           val_files=config.val_files, cache=config.cache, dims=config.dims)


# Settings added after runs were recorded without them: what such a run did then
# (val_batches None: every held-out tile, every epoch).
UNRECORDED = {"val_batches": None}


def read_config(run_dir):
    """The `TrainConfig` saved in a run folder."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{run_dir} is not a training run: it has no {CONFIG_FILE}."
        )
    values = read_json_object(path)
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - fields)
    if unknown or "dataset" not in values:
        raise ValueError(
            f"{path} is not the config.json of an attunet_keras run (unknown keys "
            f"{unknown[:5]}, or no 'dataset')."
        )
    return TrainConfig(**{**UNRECORDED, **values})


def read_json_object(path):
    try:
        with open(path) as file:
            values = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path} does not hold a JSON object.")
    return values
