"""Facts read off a Keras model: its layout, channels, depth, fixed or free sizes and
attention gates, and `load_model`, which reads a `.keras` file with one clear error for
anything that is not a model. Training, inference, export and the CLI ask these."""

import os
import zipfile

GATE_SUFFIX = "_gate_sigmoid"


def load_model(path):
    """Loads a `.keras` model file (safe mode), with one clear error for a bad file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a `.keras` file name, or a file that is not a valid Keras
            model archive (not a zip, truncated, or weights that do not load).
    """
    import keras

    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            hint = "it is a training run: give its best.keras (or --run on the command line)"
        else:
            hint = "give the path of a .keras file"
        raise ValueError(f"{path} is a folder, not a .keras model file; {hint}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (a .keras model was expected).")
    if not path.endswith(".keras"):
        raise ValueError(
            f"{path} is not a .keras file; save models with model.save('name.keras')."
        )
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a Keras model file (not a .keras zip archive).")
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except Exception as error:  # any failure inside the archive means the same here
        detail = " ".join(str(error).split())[:200]
        raise ValueError(
            f"{path} is not a valid Keras model file: {type(error).__name__}: {detail}"
        ) from error


def is_volume_model(model):
    """True for a model of volumes (5D input, e.g. `att_unet_3d`)."""
    return len(model.inputs[0].shape) == 5


def input_channels(model):
    """The channel count of a model's input."""
    return model.inputs[0].shape[1 if model_data_format(model) == "channels_first" else -1]


def output_channels(model):
    """The channel count of a model's (main) output."""
    output = model.outputs[0]
    return output.shape[1 if model_data_format(model) == "channels_first" else -1]


def all_layers(model):
    """Every layer of `model`, those of models nested in it included."""
    import keras

    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


def model_data_format(model):
    """The `data_format` of a model's convolutions."""
    import keras

    for layer in all_layers(model):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv3D)):
            return layer.data_format
    raise ValueError(f"model {model.name!r} has no convolution to read data_format from.")


def pooling_levels(model):
    """Number of down-sampling levels (2x2 max pooling, or the stride-2 convolutions
    of `variant="monai"`): input sizes must be multiples of 2**levels."""
    import keras

    def strided(layer):
        return (isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv3D))
                and not isinstance(layer, (keras.layers.Conv2DTranspose,
                                           keras.layers.Conv3DTranspose))
                and max(layer.strides) > 1)

    return sum(isinstance(layer, (keras.layers.MaxPooling2D, keras.layers.MaxPooling3D))
               or strided(layer) for layer in all_layers(model))


def size_multiple(model):
    """What every input size must be a multiple of: 2**pooling levels, or 32 with a
    `keras.applications` backbone (its output is at stride 32)."""
    from attunet_keras import layers as layers_lib

    if any(isinstance(layer, layers_lib.BackbonePreprocessing) for layer in all_layers(model)):
        return 32
    return 2 ** pooling_levels(model)


def needs_static_sizes(model):
    """True when a layer of `model` cannot run on sizes known only at run time."""
    import keras

    return any(isinstance(layer, keras.layers.UpSampling2D)
               and layer.interpolation != "nearest" for layer in model.layers)


def own_size(model):
    """The model's fixed spatial input size as a tuple, or None when any is free."""
    shape = tuple(model.inputs[0].shape)
    spatial = shape[2:] if model_data_format(model) == "channels_first" else shape[1:-1]
    return None if any(side is None for side in spatial) else tuple(spatial)


def gate_layers(model):
    """The attention gates' sigmoid layers (`*_gate_sigmoid`), deepest gate first."""
    return [layer for layer in model.layers if layer.name.endswith(GATE_SUFFIX)]
