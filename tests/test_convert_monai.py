"""MONAI's AttentionUnet in Keras (`variant="monai"`) and its weights from PyTorch.

The PyTorch side is `monai.networks.nets.AttentionUnet` itself (the dev extra installs
MONAI): every weight and BatchNorm statistic is randomised, the state_dict converted,
and the outputs compared in eval mode, in both layouts and in 3D.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
monai_nets = pytest.importorskip("monai.networks.nets")

import keras  # noqa: E402

from attunet_keras import cli  # noqa: E402
from attunet_keras import convert  # noqa: E402
from attunet_keras import inference  # noqa: E402
from attunet_keras import models  # noqa: E402


def _monai(rank, depth, features, in_channels, n_label, seed=0):
    torch.manual_seed(seed)
    net = monai_nets.AttentionUnet(
        spatial_dims=rank, in_channels=in_channels, out_channels=n_label,
        channels=[features * 2**level for level in range(depth + 1)], strides=[2] * depth)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
        for name, buffer in net.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn_like(buffer) * 0.2)
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand_like(buffer) + 0.5)
    return net.eval()


def _keras(rank, data_format, depth, features, in_channels, n_label, sizes=None):
    builder = models.att_unet if rank == 2 else models.att_unet_3d
    return builder(*(sizes or (None,) * rank), n_label, depth=depth, features=features,
                   data_format=data_format, in_channels=in_channels, variant="monai",
                   upsampling="transpose", batch_norm=True, dropout=0,
                   output_activation=None)


@pytest.mark.parametrize("rank, data_format, depth, in_channels, n_label, shape", [
    (2, "channels_first", 3, 1, 2, (24, 40)),
    (2, "channels_last", 2, 3, 1, (20, 12)),
    (3, "channels_last", 2, 2, 3, (8, 12, 16)),
    (3, "channels_first", 2, 1, 1, (12, 8, 8)),
])
def test_converted_weights_give_monai_s_outputs(rank, data_format, depth, in_channels,
                                                n_label, shape):
    net = _monai(rank, depth, 4, in_channels, n_label)
    model = _keras(rank, data_format, depth, 4, in_channels, n_label)
    convert.load_torch_state_dict(model, net.state_dict())
    trainable = sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)
    assert trainable == sum(parameter.numel() for parameter in net.parameters())
    images = np.random.default_rng(1).normal(size=(2, in_channels) + shape).astype("float32")
    with torch.no_grad():
        expected = net(torch.from_numpy(images)).numpy()
    inputs = images if data_format == "channels_first" else np.moveaxis(images, 1, -1)
    got = np.asarray(model(inputs, training=False))
    if data_format == "channels_last":
        got = np.moveaxis(got, -1, 1)
    assert np.abs(expected).max() > 0.1  # not a degenerate comparison
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_monai_s_options_are_required_and_other_widths_refused():
    with pytest.raises(ValueError, match=r"upsampling='nearest': variant='monai'"):
        models.att_unet(32, 32, 1, variant="monai", batch_norm=True, dropout=0)
    net = monai_nets.AttentionUnet(spatial_dims=2, in_channels=1, out_channels=1,
                                   channels=(4, 8, 12), strides=(2, 2))
    arrays = {name: value.numpy() for name, value in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.1\.submodule\.1\.upconv\.up\.conv\.weight: "
                                         r"width 12 at level 2, not 16"):
        convert.monai_options(arrays)


def test_convert_a_monai_checkpoint_train_from_it_and_export(tmp_path, capsys):
    net = _monai(2, 2, 4, 1, 1, seed=3)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "monai.pt")
    converted = tmp_path / "monai.keras"
    assert cli.main(["convert", "--from-torch", str(tmp_path / "monai.pt"), "--variant",
                     "monai", "--output", str(converted)]) == 0
    out = capsys.readouterr().out
    assert "MONAI AttentionUnet 2D, depth 2, features 4, 1 input channel(s)" in out
    assert "Outputs checked against PyTorch" in out
    model = keras.saving.load_model(converted, safe_mode=True)
    assert len(inference.gate_layers(model)) == 2
    images = np.random.default_rng(0).normal(size=(1, 1, 16, 24)).astype("float32")
    with torch.no_grad():
        expected = torch.sigmoid(net(torch.from_numpy(images))).numpy()
    got = np.moveaxis(model.predict(np.moveaxis(images, 1, -1), verbose=0), -1, 1)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)

    run = tmp_path / "run"
    assert cli.main(["train", "--dataset", "nuclei", "--output", str(run), "--init-from",
                     str(converted), "--epochs", "1", "--steps-per-epoch", "2",
                     "--batch-size", "2", "--tile", "64", "--val-batches", "1",
                     "--verbose", "0"]) == 0
    assert cli.main(["export", "--run", str(run), "--output", str(tmp_path / "saved")]) == 0
    assert (tmp_path / "saved" / "1" / "saved_model.pb").is_file()


def test_a_monai_model_serves_sizes_that_are_not_multiples_of_its_depth(tmp_path):
    """Its down-sampling is strided convolutions, not pooling: the size multiple the
    exports pad to still comes from its depth."""
    from attunet_keras import export

    model = _keras(2, "channels_last", 2, 4, 1, 1)
    convert.load_torch_state_dict(model, _monai(2, 2, 4, 1, 1, seed=5).state_dict())
    assert inference.size_multiple(model) == 4
    image = np.random.default_rng(2).random((1, 13, 7, 1), dtype="float32")
    export.export_model(model, tmp_path / "saved")
    import tensorflow as tf

    served = tf.saved_model.load(str(tmp_path / "saved" / "1"))
    got = served.signatures["probabilities"](images=tf.constant(image))["probabilities"]
    expected = inference.predict_probabilities(model, image[0], normalized=True)
    np.testing.assert_allclose(got.numpy()[0], expected, atol=1e-5)
