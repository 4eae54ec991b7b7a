"""Segmentation data: datasets as an index of files, and streaming `tf.data` pipelines.

- `datasets`: `SegmentationData` and the built-in `nuclei` and `brain` datasets,
  folder datasets and in-memory arrays.
- `files`: reading, normalising, pairing and checking image files.
- `pipeline`: the training and validation `tf.data` pipelines.
- `medical`: Decathlon and nnU-Net v2 folders (dataset.json, imagesTr/, labelsTr/).
- `planning`: target spacing, resampling, normalisation by modality, plan.json.

Everything is importable from `attunet_keras.data` directly.
"""

from attunet_keras.data.datasets import BRAIN_FILES
from attunet_keras.data.datasets import BUILTIN
from attunet_keras.data.datasets import DEFAULT_TILE
from attunet_keras.data.datasets import Item
from attunet_keras.data.datasets import SegmentationData
from attunet_keras.data.datasets import brain
from attunet_keras.data.datasets import brain3d
from attunet_keras.data.datasets import brain_volumes
from attunet_keras.data.datasets import case_names
from attunet_keras.data.datasets import medical_folder
from attunet_keras.data.datasets import folder
from attunet_keras.data.datasets import from_arrays
from attunet_keras.data.datasets import nuclei
from attunet_keras.data.datasets import split_blocks
from attunet_keras.data import medical
from attunet_keras.data import planning
from attunet_keras.data.files import IMAGE_EXTENSIONS
from attunet_keras.data.files import VOLUME_EXTENSIONS
from attunet_keras.data.files import PairCache
from attunet_keras.data.files import check_folder
from attunet_keras.data.files import find_pairs
from attunet_keras.data.files import is_volume_file
from attunet_keras.data.files import load_pair
from attunet_keras.data.files import mask_problems
from attunet_keras.data.files import normalize
from attunet_keras.data.files import normalize_channels
from attunet_keras.data.files import normalize_volume
from attunet_keras.data.files import package_file
from attunet_keras.data.files import pad_to_multiple
from attunet_keras.data.files import read_header
from attunet_keras.data.files import read_image
from attunet_keras.data.files import read_volume
from attunet_keras.data.pipeline import FOREGROUND_FRACTION
from attunet_keras.data.pipeline import VAL_BATCHES
from attunet_keras.data.pipeline import fixed_patches
from attunet_keras.data.pipeline import grid_tiles
from attunet_keras.data.pipeline import read_failure
from attunet_keras.data.pipeline import sample_patches
from attunet_keras.data.pipeline import targets
from attunet_keras.data.pipeline import training_dataset
from attunet_keras.data.pipeline import validation_dataset
