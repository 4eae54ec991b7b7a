"""Decathlon and nnU-Net v2 folders made from real and synthetic volumes, as the tests
need them (tests/test_medical.py).

The brain cases are the MNI ICBM152 template of the nilearn wheel (T1, GM / WM labels)
cropped around the head and resampled to each case's own spacing, with a second,
contrast-reversed channel ("T2": bright where T1 is dark inside the head), so that the
mean of the two channels, which the Otsu baseline thresholds, hides the tissue
classes that the two channels together show. The CT cases are synthetic, in
Hounsfield units: air -1000, a body at ~0, an organ at ~130 with a lesion at ~260.
"""

import functools
import json
import os

import nibabel
import numpy as np
from scipy import ndimage

from attunet_keras import data

# (spacing x, y, z in mm, rotation about z in degrees, shift in mm): mixed spacings,
# one rotated affine.
BRAIN_CASES = {
    "brain_000": ((4.0, 4.0, 4.0), 0, (0, 0, 0)),
    "brain_001": ((3.5, 3.5, 5.0), 0, (4, -4, 2)),
    "brain_002": ((4.5, 4.5, 6.0), 0, (-4, 4, 0)),
    "brain_003": ((4.0, 4.0, 4.0), 30, (2, 2, -2)),
    "brain_004": ((3.5, 3.5, 4.5), 0, (-2, 0, 4)),
    "brain_005": ((5.0, 5.0, 5.0), 0, (0, 4, -4)),
}

# imagesTs/brain_900 is this case again (its affine rotated 30 degrees)
TEST_CASE = "brain_003"


@functools.lru_cache(maxsize=1)
def _template():
    t1, labels = data.brain_volumes()  # 1 mm, (X, Y, Z)
    head = np.argwhere(t1 > 0.05)
    low, high = head.min(0), head.max(0) + 1
    box = tuple(slice(a, b) for a, b in zip(low, high))
    return t1[box], labels[box]


@functools.lru_cache(maxsize=None)
def _brain_case(name, scale=1.0):
    return brain_case(name, *_template(), scale=scale)


def brain_case(name, t1, labels, scale=1.0):
    """`(image (X, Y, Z, 2) float32, labels (X, Y, Z) uint8, affine)` of one case;
    `scale` multiplies its spacing (0.5: twice as fine)."""
    spacing, degrees, shift = BRAIN_CASES[name]
    spacing = tuple(side * scale for side in spacing)
    shifted = ndimage.shift(t1, shift, order=1)
    shifted_labels = ndimage.shift(labels, shift, order=0)
    zoom = [1.0 / s for s in spacing]
    image = np.clip(ndimage.zoom(shifted, zoom, order=1), 0, None)
    mask = ndimage.zoom(shifted_labels, zoom, order=0).astype("uint8")
    head = image > 0.05
    rng = np.random.default_rng(sum(map(ord, name)))
    first = 1000.0 * image
    second = np.where(head, 800.0 * (1.0 - image) + 100.0, 0.0)
    noise = rng.normal(0, 10, (2,) + image.shape)
    stacked = np.stack([first + noise[0] * head, second + noise[1] * head], axis=-1)
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                         [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = [-90.0, -120.0, -70.0]
    return stacked.astype("float32"), mask, affine


def _save(array, affine, path, dtype):
    image = nibabel.Nifti1Image(np.asarray(array, dtype), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nibabel.save(image, path)


def decathlon_brain(root, names=None, scale=1.0):
    """A Decathlon folder of two-channel brain cases (4D NIfTI, modalities last);
    `scale` multiplies every case's spacing (benchmarks/quality.py uses 0.5)."""
    names = list(names or BRAIN_CASES)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    training = []
    for name in names:
        image, mask, affine = _brain_case(name, scale)
        _save(image, affine, os.path.join(root, "imagesTr", f"{name}.nii.gz"), "float32")
        _save(mask, affine, os.path.join(root, "labelsTr", f"{name}.nii.gz"), "uint8")
        # the macOS resource forks of the Decathlon tarballs
        with open(os.path.join(root, "imagesTr", f"._{name}.nii.gz"), "wb") as file:
            file.write(b"\x00\x05\x16\x07")
        training.append({"image": f"./imagesTr/{name}.nii.gz",
                         "label": f"./labelsTr/{name}.nii.gz"})
    # the test case is the rotated one: predict must keep its affine
    test_image, _, test_affine = _brain_case(TEST_CASE, scale)
    _save(test_image, test_affine, os.path.join(root, "imagesTs", "brain_900.nii.gz"),
          "float32")
    with open(os.path.join(root, "dataset.json"), "w") as file:
        json.dump({"name": "BrainMSD", "modality": {"0": "T1", "1": "T2"},
                   "labels": {"0": "background", "1": "grey_matter", "2": "white_matter"},
                   "numTraining": len(names), "numTest": 1, "training": training,
                   "test": ["./imagesTs/brain_900.nii.gz"]}, file)
    return root


def nnunet_brain(root, names=None):
    """The same cases as an nnU-Net v2 raw folder: one file per channel."""
    names = list(names or BRAIN_CASES)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for name in names:
        image, mask, affine = _brain_case(name)
        for channel in range(2):
            _save(image[..., channel], affine,
                  os.path.join(root, "imagesTr", f"{name}_{channel:04d}.nii.gz"), "float32")
            # the macOS resource forks of tarballs made on a Mac
            with open(os.path.join(root, "imagesTr", f"._{name}_{channel:04d}.nii.gz"),
                      "wb") as file:
                file.write(b"\x00\x05\x16\x07")
        _save(mask, affine, os.path.join(root, "labelsTr", f"{name}.nii.gz"), "uint8")
    image, _, affine = _brain_case(TEST_CASE)
    for channel in range(2):
        _save(image[..., channel], affine,
              os.path.join(root, "imagesTs", f"brain_900_{channel:04d}.nii.gz"), "float32")
    with open(os.path.join(root, "imagesTs", "README.txt"), "w") as file:
        file.write("a stray file: never a case\n")
    with open(os.path.join(root, "dataset.json"), "w") as file:
        json.dump({"name": "BrainNNUNet", "channel_names": {"0": "T1", "1": "T2"},
                   "labels": {"background": 0, "grey_matter": 1, "white_matter": 2},
                   "numTraining": len(names), "file_ending": ".nii.gz"}, file)
    return root


CT_SPACINGS = ((0.8, 0.8, 2.5), (1.0, 1.0, 1.0), (1.5, 1.5, 3.0), (0.8, 0.8, 2.5))


def ct_case(index, spacing, size_mm=(64.0, 64.0, 60.0)):
    """`(HU volume, labels 0 bg / 1 organ / 2 lesion)`: a body, an organ, a lesion."""
    rng = np.random.default_rng(index)
    shape = [int(round(mm / s)) for mm, s in zip(size_mm, spacing)]
    grid = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)],
                                indexing="ij"), -1)
    centre = np.array(size_mm) / 2
    body = (((grid - centre) / (np.array(size_mm) * 0.45)) ** 2).sum(-1) <= 1
    organ_centre = centre + rng.uniform(-5, 5, 3)
    organ = (((grid - organ_centre) / np.array([14.0, 11.0, 12.0])) ** 2).sum(-1) <= 1
    lesion = (((grid - organ_centre - [4, 2, 0]) / 4.0) ** 2).sum(-1) <= 1
    hu = np.full(shape, -1000.0)
    hu[body] = 0.0
    hu[organ] = 130.0
    hu[lesion & organ] = 260.0
    hu += rng.normal(0, 20, shape)
    labels = np.zeros(shape, "uint8")
    labels[organ] = 1
    labels[lesion & organ] = 2
    return hu.astype("float32"), labels


def nnunet_ct(root):
    """An nnU-Net v2 folder of single-channel CT cases in HU at mixed spacings."""
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for index, spacing in enumerate(CT_SPACINGS):
        hu, labels = ct_case(index, spacing)
        affine = np.diag(list(spacing) + [1.0])
        _save(hu, affine, os.path.join(root, "imagesTr", f"ct_{index:03d}_0000.nii.gz"),
              "int16")
        _save(labels, affine, os.path.join(root, "labelsTr", f"ct_{index:03d}.nii.gz"),
              "uint8")
    with open(os.path.join(root, "dataset.json"), "w") as file:
        json.dump({"channel_names": {"0": "CT"},
                   "labels": {"background": 0, "organ": 1, "lesion": 2},
                   "numTraining": len(CT_SPACINGS), "file_ending": ".nii.gz"}, file)
    return root
