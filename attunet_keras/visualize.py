"""What a person looks at: images for display, class overlays, mask PNGs, the figure
of the attention gates (`attention_figure`), and the gates of a volume as NIfTI files."""

import os

import numpy as np

from attunet_keras import data as data_lib
from attunet_keras import inference



_CLASS_COLOURS = np.array(
    [[0, 0, 0], [255, 60, 60], [60, 200, 255], [255, 210, 0], [120, 255, 120],
     [200, 100, 255]], dtype="float32")


def display_image(image):
    """An (H, W, 3) uint8 view of a normalised image (channel mean when not RGB)."""
    image = np.asarray(image, dtype="float32")
    if image.ndim == 3 and image.shape[-1] != 3:
        image = image.mean(axis=-1)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    low, high = float(image.min()), float(image.max())
    scaled = (image - low) / max(high - low, 1e-6)
    return (scaled * 255).astype("uint8")


def overlay(image, labels, alpha=0.45):
    """The image with every non-background class tinted and outlined in its colour."""
    base = display_image(image).astype("float32")
    labels = np.asarray(labels)
    colours = _CLASS_COLOURS[labels % len(_CLASS_COLOURS)]
    foreground = (labels > 0)[..., None]
    tinted = np.where(foreground, (1 - alpha) * base + alpha * colours, base)
    edges = np.zeros(labels.shape, dtype=bool)
    edges[1:, :] |= labels[1:, :] != labels[:-1, :]
    edges[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge_colours = _CLASS_COLOURS[np.maximum(labels, 1) % len(_CLASS_COLOURS)]
    tinted[edges] = edge_colours[edges]
    return tinted.astype("uint8")


def mask_png(labels, n_label):
    """A mask image: 0/255 for binary masks, the class index for classes (8-bit, or
    16-bit above 256 classes)."""
    if n_label == 1:
        return np.asarray(labels, dtype="uint8") * 255
    return np.asarray(labels, dtype="uint8" if n_label <= 256 else "uint16")


def save_png(path, array):
    from PIL import Image

    Image.fromarray(np.asarray(array)).save(path)


def attention_figure(path, image, probabilities, gate_maps, title=None):
    """One figure: the image, the prediction and every gate's attention map."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    labels = inference.labels_from_probabilities(probabilities)
    panels = 2 + len(gate_maps)
    height, width = labels.shape
    panel_height = 5.0 if height > width else 3.2
    panel_width = max(1.8, panel_height * width / height) + 0.9  # room for a colour bar
    figure, axes = plt.subplots(1, panels, figsize=(panel_width * panels, panel_height + 0.9),
                                squeeze=False)
    axes = axes[0]
    axes[0].imshow(display_image(image))
    axes[0].set_title("image")
    axes[1].imshow(overlay(image, labels))
    axes[1].set_title("prediction")
    for axis, (name, gate_map) in zip(axes[2:], gate_maps.items()):
        shown = axis.imshow(gate_map, cmap="magma", vmin=0.0, vmax=1.0,
                            extent=(0, width, height, 0), interpolation="nearest")
        axis.set_title(f"{name} gate {gate_map.shape[0]}x{gate_map.shape[1]}\n"
                       f"alpha in [{gate_map.min():.2f}, {gate_map.max():.2f}]")
        figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.04)
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def attention_nifti(model, path, output):
    """The attention gates of a 3D model on a NIfTI volume, as NIfTI files and a figure.

    Writes `output` (a PNG of the middle slice along the first axis: the volume, the
    prediction and every gate's map) and, beside it, `STEM_{gate}.nii.gz` for each
    gate: its coefficients on its own grid, with the input's affine scaled to that
    grid (a gate voxel covers `f` input voxels per axis; its centre is kept).

    Returns:
        `{gate name: path of its NIfTI file}`.
    """
    import nibabel

    array, affine, _ = data_lib.read_volume(path)
    volume = data_lib.normalize_volume(array)
    probabilities, gate_maps = inference.attention_maps(model, volume, normalized=True)
    stem = os.path.splitext(output)[0]
    written = {}
    for name, gate_map in gate_maps.items():
        factor = np.array([-(-side // grid) for side, grid in
                           zip(volume.shape[:3], gate_map.shape)], "float64")
        to_input = np.diag(list(factor) + [1.0])
        to_input[:3, 3] = (factor - 1.0) / 2.0
        gate_path = f"{stem}_{name}.nii.gz"
        nibabel.save(nibabel.Nifti1Image(gate_map.astype("float32"), affine @ to_input),
                     gate_path)
        written[name] = gate_path
    middle = volume.shape[0] // 2
    slices = {name: gate_map[min(middle * gate_map.shape[0] // volume.shape[0],
                                 gate_map.shape[0] - 1)]
              for name, gate_map in gate_maps.items()}
    attention_figure(output, volume[middle], probabilities[middle], slices,
                     title=f"Attention gates of {model.name}, slice {middle} of "
                           f"{os.path.basename(path)}")
    return written
