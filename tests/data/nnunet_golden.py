"""Computes the golden target spacings of tests/test_medical.py with nnU-Net v2's own
code. Run once, outside the suite (nnU-Net is not a dependency):

    .venv/bin/pip install --target /tmp/nnunet --no-deps nnunetv2==2.8.1 \
        batchgenerators dynamic_network_architectures acvl_utils SimpleITK pandas \
        blosc2 numexpr msgpack ndindex httpx connected-components-3d
    PYTHONPATH=/tmp/nnunet .venv/bin/python tests/data/nnunet_golden.py

It builds the test's Decathlon brain and CT folders (tests/medical_cases.py), crops
every case with nnU-Net's `crop_to_nonzero`, and calls
`ExperimentPlanner.determine_fullres_target_spacing` on their spacings and cropped
shapes (the dataset fingerprint's `spacings` and `shapes_after_crop`), and on three
lists of spacings and sizes written below that take the function's other branches.
Printed on 2026-12-02 with nnunetv2 2.8.1; the values are in tests/test_medical.py.
"""

import json
import os
import sys
import tempfile
import types

import numpy as np

for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
    os.environ.setdefault(variable, tempfile.gettempdir())
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (  # noqa: E402
    ExperimentPlanner)
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero  # noqa: E402
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape  # noqa: E402

import medical_cases  # noqa: E402
from attunet_keras.data import medical  # noqa: E402


def nnunet_target(spacings, shapes):
    planner = types.SimpleNamespace(
        overwrite_target_spacing=None, anisotropy_threshold=3,
        dataset_fingerprint={"spacings": spacings, "shapes_after_crop": shapes})
    return ExperimentPlanner.determine_fullres_target_spacing(planner).tolist()


def folder_fingerprint(root):
    spacings, shapes = [], []
    for case in medical.describe(root).cases:
        image, labels, geometry = medical.read_case(case)
        cropped, _, _ = crop_to_nonzero(np.moveaxis(image, -1, 0),
                                        labels[None].astype(np.int8))
        spacings.append(list(geometry.spacing))
        shapes.append(list(cropped.shape[1:]))
    return spacings, shapes


OTHER_BRANCHES = {
    # ACDC-like: anisotropic in spacing and in voxels -> 10th percentile of that axis
    "anisotropic": ([[1.5, 1.5, 10.0], [1.25, 1.25, 10.0], [1.6, 1.6, 5.0],
                     [1.4, 1.4, 6.5], [1.5, 1.5, 10.0]],
                    [[200, 200, 9], [220, 210, 10], [190, 180, 18], [200, 200, 14],
                     [210, 200, 9]]),
    # the 10th percentile below the other axes' spacing -> raised to it + 1e-5
    "raised": ([[1.0, 1.0, 4.0], [1.0, 1.0, 4.0], [1.0, 1.0, 0.9], [1.0, 1.0, 4.0],
                [1.0, 1.0, 0.8]],
               [[300, 300, 20], [300, 300, 22], [300, 300, 80], [300, 300, 21],
                [300, 300, 90]]),
    # anisotropic spacing but not voxels -> the median
    "spacing_only": ([[1.0, 1.0, 3.5]] * 3, [[100, 100, 90]] * 3),
}


def main():
    out = {}
    with tempfile.TemporaryDirectory() as root:
        for name, build in (("brain", medical_cases.decathlon_brain),
                            ("ct", medical_cases.nnunet_ct)):
            spacings, shapes = folder_fingerprint(build(os.path.join(root, name)))
            out[name] = {"spacings": spacings, "shapes_after_crop": shapes,
                         "target": nnunet_target(spacings, shapes)}
    for name, (spacings, shapes) in OTHER_BRANCHES.items():
        out[name] = {"target": nnunet_target(spacings, shapes)}
    out["new_shape"] = compute_new_shape([41, 52, 31], [3.5, 3.5, 5.0],
                                         [4.0, 4.0, 4.75]).tolist()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
