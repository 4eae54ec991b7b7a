"""PyTorch checkpoints into Keras models: `load_torch_state_dict`.

Every tensor of a PyTorch `state_dict` is mapped by name to the Keras layer of the same
module path (`Conv1.conv.0.weight` -> layer `Conv1_conv_0`, its kernel), as the
`variant="attu_net"` builders name their layers (`attunet_keras.variants`):

- `Conv2d` / `Conv3d`: `weight` (out, in, *k) -> kernel (*k, in, out); `bias`.
- `ConvTranspose2d` / `3d`: `weight` (in, out, *k) -> kernel (*k, out, in); `bias`.
- `BatchNorm`: `weight`, `bias`, `running_mean`, `running_var` -> gamma, beta,
  moving mean and variance (`num_batches_tracked` has no Keras counterpart). The
  builders already use PyTorch's epsilon (1e-5) and momentum (0.1, Keras's 0.9).

The kernels do not depend on the Keras layout: a `channels_first` model takes PyTorch's
NCHW tensors as they are, a `channels_last` one their transpose. Nothing is loaded
unless every tensor maps: a missing or unexpected name, or a shape that differs, is
refused in one line naming the tensor. Checkpoints load as people save them: a bare
state_dict, `{"state_dict": ...}` or `{"model": ...}` wrappers, `module.` prefixes
(DataParallel), read with `torch.load(weights_only=True)`; torch is imported only
when a path is given.
"""

import os

import numpy as np

WRAPPERS = ("state_dict", "model")
# PyTorch bookkeeping with no Keras weight.
IGNORED = ("num_batches_tracked",)
_BN = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3}


def read_state_dict(state_dict_or_path):
    """`{name: numpy array}` of a checkpoint path or a dict of tensors or arrays.

    Unwraps `{"state_dict": ...}` and `{"model": ...}` and strips `module.` prefixes.
    """
    source = state_dict_or_path
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such checkpoint file.")
        try:
            import torch
        except ImportError as error:
            raise ImportError(f"reading {path} needs PyTorch (pip install torch); or "
                              "pass the state_dict as a dict of numpy arrays.") from error
        try:
            source = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            detail = " ".join(str(error).split())[:200]
            raise ValueError(f"{path} is not a PyTorch checkpoint torch.load reads with "
                             f"weights_only=True ({type(error).__name__}: {detail}).") \
                from error
    if not isinstance(source, dict):
        raise ValueError(f"expected a state_dict (a dict of tensors), got "
                         f"{type(source).__name__}.")
    for wrapper in WRAPPERS:
        if wrapper in source and isinstance(source[wrapper], dict):
            source = source[wrapper]
            break
    arrays = {}
    for name, value in source.items():
        if not hasattr(value, "shape"):
            continue  # e.g. an epoch counter saved beside the weights
        if name.startswith("module."):
            name = name[len("module."):]
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        arrays[name] = np.asarray(value)
    if not arrays:
        raise ValueError("the checkpoint holds no tensors.")
    return arrays


def load_torch_state_dict(model, state_dict_or_path):
    """Loads a PyTorch state_dict into `model`, every weight or none.

    Args:
        model: a Keras model whose layers are named after the PyTorch modules
            (`att_unet(..., variant="attu_net")`).
        state_dict_or_path: a `.pt` / `.pth` file, or a dict of tensors or arrays.

    Returns:
        `model`, its weights replaced.

    Raises:
        ValueError: a tensor with no layer, a layer weight with no tensor, or a shape
            that differs, named in the message (nothing is loaded then).
    """
    import keras

    arrays = read_state_dict(state_dict_or_path)
    modules = {}
    for name, array in arrays.items():
        path, _, attribute = name.rpartition(".")
        if attribute in IGNORED:
            continue
        modules.setdefault(path, {})[attribute] = (name, array)
    assignments = []
    used = set()
    for layer in model.layers:
        if not layer.weights:
            continue
        path = _module_path(layer.name, modules)
        if path is None:
            raise ValueError(f"layer {layer.name!r} has no tensors in the checkpoint "
                             f"(expected {layer.name.replace('_', '.')}.weight or similar); "
                             "is it a checkpoint of this network and size?")
        used.add(path)
        tensors = modules[path]
        if isinstance(layer, keras.layers.BatchNormalization):
            values = _batch_norm(layer, path, tensors)
        elif isinstance(layer, (keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)):
            values = _conv(layer, path, tensors, transposed=True)
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv3D)):
            values = _conv(layer, path, tensors, transposed=False)
        elif isinstance(layer, keras.layers.PReLU):  # MONAI's PReLU: one parameter
            values = _prelu(layer, path, tensors)
        else:
            raise ValueError(f"layer {layer.name!r} ({type(layer).__name__}) has no PyTorch "
                             "counterpart this converter knows.")
        for weight, value in zip(layer.weights, values):
            if tuple(weight.shape) != value.shape:
                raise ValueError(
                    f"{path}: shape {value.shape} does not fit layer {layer.name!r}'s "
                    f"{weight.name} {tuple(weight.shape)}; the checkpoint is of another "
                    "width, depth, channel count or class count.")
        assignments.append((layer, values))
    unused = sorted(name for path, tensors in modules.items() if path not in used
                    for name, _ in tensors.values())
    if unused:
        raise ValueError(f"tensor {unused[0]!r} ({len(unused)} in all) has no layer in "
                         f"model {model.name!r}; is it a checkpoint of this network?")
    for layer, values in assignments:
        layer.set_weights(values)
    return model


def _prelu(layer, path, tensors):
    if set(tensors) != {"weight"}:
        raise ValueError(f"{path}: expected a PReLU's weight, found "
                         f"{sorted(tensors)}.")
    name, array = tensors["weight"]
    shape = tuple(layer.weights[0].shape)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{name}: {array.size} PReLU parameter(s), but layer "
                         f"{layer.name!r} has {int(np.prod(shape))}.")
    return [array.reshape(shape)]


def _module_path(layer_name, modules):
    """The PyTorch module path whose `.` become `_` in `layer_name`, or None."""
    for path in modules:
        if path.replace(".", "_") == layer_name:
            return path
    return None


def _take(path, tensors, attribute):
    if attribute not in tensors:
        raise ValueError(f"{path}.{attribute} is missing from the checkpoint.")
    return tensors[attribute][1]


def _conv(layer, path, tensors, transposed):
    extra = sorted(set(tensors) - {"weight", "bias"})
    if extra:
        raise ValueError(f"{path}.{extra[0]} has no counterpart in the convolution "
                         f"{layer.name!r}.")
    weight = _take(path, tensors, "weight")
    rank = weight.ndim - 2
    spatial = tuple(range(2, 2 + rank))
    # Conv: (out, in, *k) -> (*k, in, out); ConvTranspose: (in, out, *k) -> (*k, out, in).
    kernel = np.transpose(weight, spatial + (1, 0)).astype("float32")
    values = [kernel]
    if layer.use_bias:
        values.append(_take(path, tensors, "bias").astype("float32"))
    elif "bias" in tensors:
        raise ValueError(f"{path}.bias has no counterpart: layer {layer.name!r} has no "
                         "bias.")
    del transposed  # the same axis order serves both, see above
    return values


def _batch_norm(layer, path, tensors):
    extra = sorted(set(tensors) - set(_BN))
    if extra:
        raise ValueError(f"{path}.{extra[0]} has no counterpart in the batch "
                         f"normalization {layer.name!r}.")
    return [_take(path, tensors, name).astype("float32") for name in _BN]


def attu_net_options(state_dict):
    """The builder options a PyTorch AttU_Net checkpoint's tensors imply: `rank` (2 or
    3), `depth`, `features`, `in_channels`, `n_label`, `upsampling`."""
    arrays = state_dict
    first = arrays.get("Conv1.conv.0.weight")
    head = arrays.get("Conv_1x1.weight")
    if first is None or head is None:
        raise ValueError("not an AttU_Net checkpoint: it has no Conv1.conv.0.weight or "
                         "Conv_1x1.weight tensor.")
    depth = 0
    while f"Conv{depth + 2}.conv.0.weight" in arrays:
        depth += 1
    if depth < 1:
        raise ValueError("not an AttU_Net checkpoint: it has no Conv2 (a second level).")
    return {"rank": first.ndim - 2, "depth": depth, "features": int(first.shape[0]),
            "in_channels": int(first.shape[1]), "n_label": int(head.shape[0]),
            "upsampling": ("transpose" if f"Up{depth + 1}.up.0.weight" in arrays
                           else "nearest")}


def monai_options(state_dict):
    """The builder options a MONAI `AttentionUnet` checkpoint's tensors imply: `rank`,
    `depth`, `features`, `in_channels`, `n_label` (`variant="monai"`). Widths other than
    `features * 2**level` are refused: the builder cannot express them. The strides are
    not in the tensors: 2 is assumed, and `attunet-keras convert` checks the outputs
    against MONAI's forward pass when MONAI is installed."""
    arrays = state_dict
    first = arrays.get("model.0.conv.0.conv.weight")
    head = arrays.get("model.2.conv.weight")
    if first is None or head is None:
        raise ValueError("not a MONAI AttentionUnet checkpoint: it has no "
                         "model.0.conv.0.conv.weight or model.2.conv.weight tensor.")
    features = int(first.shape[0])
    depth, prefix = 0, "model.1"
    while f"{prefix}.upconv.up.conv.weight" in arrays:
        width = int(arrays[f"{prefix}.upconv.up.conv.weight"].shape[0])
        if width != features * 2 ** (depth + 1):
            raise ValueError(f"{prefix}.upconv.up.conv.weight: width {width} at level "
                             f"{depth + 1}, not {features * 2 ** (depth + 1)}; "
                             "variant='monai' builds channels = features * 2**level only.")
        depth += 1
        prefix += ".submodule.1"
    if depth < 1:
        raise ValueError("not a MONAI AttentionUnet checkpoint: no model.1.upconv tensors.")
    return {"rank": first.ndim - 2, "depth": depth, "features": features,
            "in_channels": int(first.shape[1]), "n_label": int(head.shape[0])}


def torch_attu_net(rank, depth, features, in_channels, n_label, upsampling="nearest",
                   second_sigmoid=False):
    """The PyTorch AttU_Net (LeeJunHyun/Image_Segmentation's module names) at any
    depth, width and rank: what `attunet-keras convert` runs its checkpoint through to
    check the Keras model. Needs torch."""
    import torch
    from torch import nn

    conv = {2: nn.Conv2d, 3: nn.Conv3d}[rank]
    norm = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[rank]
    transpose = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[rank]
    pool = {2: nn.MaxPool2d, 3: nn.MaxPool3d}[rank]

    class ConvBlock(nn.Module):
        def __init__(self, ch_in, ch_out):
            super().__init__()
            self.conv = nn.Sequential(
                conv(ch_in, ch_out, 3, padding=1), norm(ch_out), nn.ReLU(),
                conv(ch_out, ch_out, 3, padding=1), norm(ch_out), nn.ReLU())

        def forward(self, x):
            return self.conv(x)

    class UpConv(nn.Module):
        def __init__(self, ch_in, ch_out):
            super().__init__()
            first = (transpose(ch_in, ch_in, 4, stride=2, padding=1)
                     if upsampling == "transpose" else nn.Upsample(scale_factor=2))
            self.up = nn.Sequential(first, conv(ch_in, ch_out, 3, padding=1),
                                    norm(ch_out), nn.ReLU())

        def forward(self, x):
            return self.up(x)

    class AttentionBlock(nn.Module):
        def __init__(self, f_g, f_l, f_int):
            super().__init__()
            self.W_g = nn.Sequential(conv(f_g, f_int, 1), norm(f_int))
            self.W_x = nn.Sequential(conv(f_l, f_int, 1), norm(f_int))
            self.psi = nn.Sequential(conv(f_int, 1, 1), norm(1), nn.Sigmoid())
            self.relu = nn.ReLU()

        def forward(self, g, x):
            psi = self.psi(self.relu(self.W_g(g) + self.W_x(x)))
            return x * (torch.sigmoid(psi) if second_sigmoid else psi)

    class AttUNet(nn.Module):
        def __init__(self):
            super().__init__()
            widths = [features * 2**level for level in range(depth + 1)]
            self.Maxpool = pool(2, 2)
            for level in range(1, depth + 2):
                ch_in = in_channels if level == 1 else widths[level - 2]
                setattr(self, f"Conv{level}", ConvBlock(ch_in, widths[level - 1]))
            for level in range(depth + 1, 1, -1):
                width = widths[level - 2]
                setattr(self, f"Up{level}", UpConv(widths[level - 1], width))
                setattr(self, f"Att{level}", AttentionBlock(width, width, width // 2))
                setattr(self, f"Up_conv{level}", ConvBlock(2 * width, width))
            self.Conv_1x1 = conv(features, n_label, 1)

        def forward(self, x):
            skips = [self.Conv1(x)]
            for level in range(2, depth + 2):
                skips.append(getattr(self, f"Conv{level}")(self.Maxpool(skips[-1])))
            d = skips.pop()
            for level in range(depth + 1, 1, -1):
                up = getattr(self, f"Up{level}")(d)
                gated = getattr(self, f"Att{level}")(g=up, x=skips[level - 2])
                d = getattr(self, f"Up_conv{level}")(torch.cat((gated, up), dim=1))
            return self.Conv_1x1(d)

    return AttUNet()
