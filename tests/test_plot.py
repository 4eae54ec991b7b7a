"""plot_model draws the model with Graphviz, with readable layer names and shapes."""

import keras
import pytest

from attunet_keras import models

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_model_writes_a_png_with_names_and_shapes(tmp_path):
    model = models.att_unet(160, 160, 1)
    path = tmp_path / "att_unet.png"

    keras.utils.plot_model(model, to_file=str(path), show_shapes=True,
                           show_layer_names=True)

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    assert height > width > 300  # a tall graph of 70 layers, top to bottom


def test_model_graph_labels_carry_layer_names_and_shapes():
    model = models.att_unet(160, 160, 1)
    graph = keras.utils.model_to_dot(model, show_shapes=True, show_layer_names=True)
    dot_source = graph.to_string()

    for name in ("enc1_conv1", "bottleneck_conv2", "dec4_gate_sigmoid", "dec1_concat",
                 "head_sigmoid"):
        assert name in dot_source
    assert "(None, 768, 20, 20)" in dot_source  # dec4_concat, as in the reference
    assert len(graph.get_nodes()) >= 70
