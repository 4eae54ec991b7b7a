"""The PyTorch AttU_Net in Keras (`variant="attu_net"`) and its weights from PyTorch.

The PyTorch network is written here from its published description (LeeJunHyun/
Image_Segmentation's `AttU_Net`, as `../shared/reference/README.md` summarises it), not
taken from the package, and tied to the published network by its parameter count:
34,878,573 for 3 input channels and 1 output at widths 64...1024 (the figure the
reference README and the issue give for that network). Every weight and BatchNorm
statistic is randomised, the state_dict converted, and the outputs compared in eval
mode.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import keras  # noqa: E402

from attunet_keras import cli  # noqa: E402
from attunet_keras import convert  # noqa: E402
from attunet_keras import models  # noqa: E402

PUBLISHED_PARAMETERS = 34_878_573


def _torch_attu_net(rank=2, depth=4, features=64, in_channels=3, n_label=1,
                    upsampling="nearest", second_sigmoid=False):
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if rank == 2 else (nn.Conv3d, nn.BatchNorm3d)

    def conv_block(ch_in, ch_out):
        module = nn.Module()
        module.conv = nn.Sequential(conv(ch_in, ch_out, 3, 1, 1, bias=True), norm(ch_out),
                                    nn.ReLU(), conv(ch_out, ch_out, 3, 1, 1, bias=True),
                                    norm(ch_out), nn.ReLU())
        return module

    def up_conv(ch_in, ch_out):
        module = nn.Module()
        if upsampling == "transpose":
            up = (nn.ConvTranspose2d if rank == 2 else nn.ConvTranspose3d)(ch_in, ch_in, 4, 2, 1)
        else:
            up = nn.Upsample(scale_factor=2)
        module.up = nn.Sequential(up, conv(ch_in, ch_out, 3, 1, 1, bias=True), norm(ch_out),
                                  nn.ReLU())
        return module

    def attention_block(f_g, f_l, f_int):
        module = nn.Module()
        module.W_g = nn.Sequential(conv(f_g, f_int, 1, 1, 0, bias=True), norm(f_int))
        module.W_x = nn.Sequential(conv(f_l, f_int, 1, 1, 0, bias=True), norm(f_int))
        module.psi = nn.Sequential(conv(f_int, 1, 1, 1, 0, bias=True), norm(1), nn.Sigmoid())
        return module

    net = nn.Module()
    widths = [features * 2**k for k in range(depth + 1)]
    for k in range(1, depth + 2):
        setattr(net, f"Conv{k}", conv_block(in_channels if k == 1 else widths[k - 2],
                                            widths[k - 1]))
    for k in range(depth + 1, 1, -1):
        setattr(net, f"Up{k}", up_conv(widths[k - 1], widths[k - 2]))
        setattr(net, f"Att{k}", attention_block(widths[k - 2], widths[k - 2],
                                                widths[k - 2] // 2))
        setattr(net, f"Up_conv{k}", conv_block(2 * widths[k - 2], widths[k - 2]))
    net.Conv_1x1 = conv(features, n_label, 1, 1, 0)
    pool = nn.MaxPool2d(2, 2) if rank == 2 else nn.MaxPool3d(2, 2)

    def forward(x):
        xs = [net.Conv1.conv(x)]
        for k in range(2, depth + 2):
            xs.append(getattr(net, f"Conv{k}").conv(pool(xs[-1])))
        d = xs[-1]
        for k in range(depth + 1, 1, -1):
            d = getattr(net, f"Up{k}").up(d)
            att = getattr(net, f"Att{k}")
            psi = att.psi(torch.relu(att.W_g(d) + att.W_x(xs[k - 2])))
            if second_sigmoid:
                psi = torch.sigmoid(psi)
            d = getattr(net, f"Up_conv{k}").conv(torch.cat((xs[k - 2] * psi, d), dim=1))
        return net.Conv_1x1(d)

    net.forward = forward
    return net


def _randomise(net, seed=0):
    """Every weight and BatchNorm statistic random, at scales that keep the activations
    of order one through the network (so the comparison is not of near-zeros)."""
    generator = torch.Generator().manual_seed(seed)

    def normal(shape, scale):
        return torch.randn(shape, generator=generator) * scale

    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                values = normal(tensor.shape, 0.5).abs() + 0.5
            elif name.endswith("running_mean") or name.endswith("bias"):
                values = normal(tensor.shape, 0.2)
            elif tensor.ndim == 1:  # BatchNorm's gamma
                values = 1.0 + normal(tensor.shape, 0.2)
            else:  # a kernel: out (or in, transposed) x in x k...
                fan_in = tensor[0].numel()
                values = normal(tensor.shape, 1.5 / fan_in**0.5)
            tensor.copy_(values)
    return net.eval()


def _keras_model(rank, data_format, **options):
    builder = models.att_unet if rank == 2 else models.att_unet_3d
    sizes = (None,) * rank
    return builder(*sizes, options.pop("n_label", 1), variant="attu_net", dropout=0,
                   batch_norm=True, output_activation=None, data_format=data_format,
                   **options)


def test_the_published_attu_net_has_its_parameter_count_here_too():
    net = _torch_attu_net()
    assert sum(p.numel() for p in net.parameters()) == PUBLISHED_PARAMETERS
    model = models.att_unet(64, 64, 1, depth=4, features=64, in_channels=3,
                            variant="attu_net", dropout=0, batch_norm=True,
                            output_activation=None)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == PUBLISHED_PARAMETERS
    # Keras also counts BatchNorm's moving statistics (PyTorch's buffers): 2 per channel.
    batch_norm_channels = sum(layer.weights[0].shape[0] for layer in model.layers
                              if isinstance(layer, keras.layers.BatchNormalization))
    assert model.count_params() == PUBLISHED_PARAMETERS + 2 * batch_norm_channels
    names = {layer.name for layer in model.layers}
    assert {"Conv1_conv_0", "Conv5_conv_4", "Up5_up_1", "Att5_W_g_0", "Att5_psi_1",
            "Att5_gate_sigmoid", "Up_conv2_conv_3", "Conv_1x1"} <= names


CASES = [  # rank, data_format, upsampling, second_sigmoid, depth, in_channels, n_label
    (2, "channels_last", "nearest", False, 3, 3, 1),
    (2, "channels_first", "nearest", False, 2, 1, 3),
    (2, "channels_last", "transpose", True, 2, 2, 2),
    (2, "channels_first", "transpose", False, 3, 3, 1),
    (3, "channels_last", "nearest", False, 2, 1, 2),
    (3, "channels_first", "transpose", True, 2, 2, 1),
]


@pytest.mark.parametrize("rank, data_format, upsampling, second_sigmoid, depth, "
                         "in_channels, n_label", CASES)
def test_converted_weights_give_pytorch_s_outputs(rank, data_format, upsampling,
                                                  second_sigmoid, depth, in_channels,
                                                  n_label):
    options = dict(rank=rank, depth=depth, features=4, in_channels=in_channels,
                   n_label=n_label, upsampling=upsampling, second_sigmoid=second_sigmoid)
    net = _randomise(_torch_attu_net(**options))
    model = _keras_model(rank, data_format, depth=depth, features=4,
                         in_channels=in_channels, n_label=n_label, upsampling=upsampling,
                         second_sigmoid=second_sigmoid)
    convert.load_torch_state_dict(model, net.state_dict())
    side = 2**depth * (3 if rank == 2 else 2)
    images = np.random.default_rng(1).normal(size=(2, in_channels) + (side,) * rank)
    images = images.astype("float32")
    with torch.no_grad():
        expected = net.forward(torch.from_numpy(images)).numpy()
    if data_format == "channels_last":
        moved = np.moveaxis(images, 1, -1)
        got = np.moveaxis(model.predict(moved, verbose=0), -1, 1)
    else:
        got = model.predict(images, verbose=0)
    assert np.abs(expected).max() > 0.1  # not a degenerate comparison
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_checkpoints_as_people_save_them_load_and_bad_ones_are_refused(tmp_path):
    net = _randomise(_torch_attu_net(depth=2, features=4))
    state = net.state_dict()
    path = tmp_path / "ckpt.pth"
    # DataParallel's prefixes inside a {"state_dict": ...} wrapper, with an epoch.
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in state.items()}},
               path)
    model = _keras_model(2, "channels_last", depth=2, features=4, in_channels=3)
    convert.load_torch_state_dict(model, path)
    np.testing.assert_array_equal(
        model.get_layer("Conv1_conv_0").get_weights()[0],
        state["Conv1.conv.0.weight"].numpy().transpose(2, 3, 1, 0))
    loaded = model.get_weights()

    arrays = {k: v.numpy() for k, v in state.items()}
    fresh = _keras_model(2, "channels_last", depth=2, features=4, in_channels=3)
    before = fresh.get_weights()
    wrong = dict(arrays, **{"Att3.W_x.0.weight": np.zeros((9, 8, 1, 1), "float32")})
    with pytest.raises(ValueError, match=r"Att3\.W_x\.0: shape \(1, 1, 8, 9\) does not fit"):
        convert.load_torch_state_dict(fresh, wrong)
    extra = dict(arrays, **{"Att3.gamma": np.zeros(1, "float32")})
    with pytest.raises(ValueError, match="tensor 'Att3.gamma' .* has no layer"):
        convert.load_torch_state_dict(fresh, extra)
    missing = {k: v for k, v in arrays.items() if k != "Up3.up.2.running_var"}
    with pytest.raises(ValueError, match=r"Up3\.up\.2\.running_var is missing"):
        convert.load_torch_state_dict(fresh, missing)
    with pytest.raises(ValueError, match="layer 'Conv4_conv_0' has no tensors"):
        convert.load_torch_state_dict(
            _keras_model(2, "channels_last", depth=3, features=4, in_channels=3), arrays)
    for kept, original in zip(fresh.get_weights(), before):  # never a partial load
        np.testing.assert_array_equal(kept, original)
    assert not np.array_equal(loaded[0], before[0])
    (tmp_path / "not.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        convert.load_torch_state_dict(fresh, tmp_path / "not.pth")


def test_convert_on_the_command_line_reads_the_network_from_its_tensors(tmp_path, capsys):
    net = _randomise(_torch_attu_net(depth=2, features=4, in_channels=2, n_label=1,
                                     upsampling="transpose"), seed=3)
    torch.save({"model": net.state_dict()}, tmp_path / "ckpt.pt")
    output = tmp_path / "model.keras"
    assert cli.main(["convert", "--from-torch", str(tmp_path / "ckpt.pt"), "--output",
                     str(output)]) == 0
    out = capsys.readouterr().out
    assert "depth 2, features 4, 2 input channel(s), 1 output channel(s), upsampling " \
           "transpose" in out
    assert "Outputs checked against PyTorch" in out
    model = keras.saving.load_model(output, safe_mode=True)
    images = np.random.default_rng(0).normal(size=(1, 2, 20, 28)).astype("float32")
    with torch.no_grad():
        expected = torch.sigmoid(net.forward(torch.from_numpy(images))).numpy()
    got = np.moveaxis(model.predict(np.moveaxis(images, 1, -1), verbose=0), -1, 1)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # The same output again is refused; a flag that disagrees with the tensors too.
    for argv, message in (([str(output)], "already exists"),
                          ([str(tmp_path / "other.keras"), "--upsampling", "nearest"],
                           "tensor 'Up2.up.0.bias' (4 in all) has no layer")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["convert", "--from-torch", str(tmp_path / "ckpt.pt"), "--output",
                      *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "model.keras"]


def test_a_converted_model_trains_shows_its_gates_and_exports(tmp_path, capsys):
    """--init-from: the converted network is the run's model (architecture and
    weights), and the run goes through attention and export like any other."""
    net = _randomise(_torch_attu_net(depth=2, features=4, in_channels=1, n_label=1), seed=4)
    converted = tmp_path / "attu_net.keras"  # as convert writes it (its CLI: above)
    model = models.att_unet(None, None, 1, depth=2, features=4, in_channels=1,
                            variant="attu_net", dropout=0, batch_norm=True,
                            data_format="channels_last", name="attu_net")
    convert.load_torch_state_dict(model, net.state_dict()).save(converted)
    run = tmp_path / "run"
    train = ["train", "--dataset", "nuclei", "--output", str(run), "--init-from",
             str(converted), "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2",
             "--tile", "64", "--val-batches", "1", "--verbose", "0"]
    assert cli.main(train) == 0
    best = keras.saving.load_model(run / "best.keras")
    initial = keras.saving.load_model(converted)
    assert best.get_layer("Att3_gate_sigmoid") is not None
    assert not np.array_equal(best.get_layer("Conv1_conv_0").get_weights()[0],
                              initial.get_layer("Conv1_conv_0").get_weights()[0])
    assert cli.main(["attention", "--run", str(run), "--output",
                     str(tmp_path / "gates.png")]) == 0
    assert "Att3" in capsys.readouterr().out or (tmp_path / "gates.png").is_file()
    assert cli.main(["export", "--run", str(run), "--output", str(tmp_path / "saved")]) == 0
    assert (tmp_path / "saved" / "1" / "saved_model.pb").is_file()

    _keras_model(2, "channels_last", depth=2, features=4, in_channels=3).save(
        tmp_path / "rgb.keras")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["train", "--dataset", "nuclei", "--output", str(tmp_path / "other"),
                  "--init-from", str(tmp_path / "rgb.keras"), "--tile", "64"])
    assert "takes 3 input channel(s) but the run's images have 1" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
