"""Parameter counts of att_unet on every backbone, next to keras-unet-collection's.

Builds `att_unet(128, 128, n_label=1, in_channels=3, backbone=NAME)` (features 32, the
builder's default) for every entry of `attunet_keras.backbones.BACKBONES`, and, when
`keras_unet_collection` can be imported, its `att_unet_2d` on the same backbone with the
configuration of its own README example (filter_num [64, 128, 256, 512, 1024], two
convolutions per stage, batch norm, additive attention, sigmoid output). Counts only:
nothing is trained, no weights are downloaded. Writes JSON to --output.

    .venv/bin/python -m pip install --no-deps --target build/kuc keras-unet-collection
    PYTHONPATH=build/kuc .venv/bin/python benchmarks/backbones.py
"""

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# keras-unet-collection's names for the backbones it also offers.
KERAS_UNET_COLLECTION = {"vgg16": "VGG16", "resnet50": "ResNet50", "resnet50v2": "ResNet50V2",
                         "efficientnetb0": "EfficientNetB0", "efficientnetb1": "EfficientNetB1",
                         "efficientnetb2": "EfficientNetB2", "efficientnetb3": "EfficientNetB3"}


def _collection_count(name):
    try:
        from keras_unet_collection import models as collection
    except ImportError:
        return None
    model = collection.att_unet_2d(
        (128, 128, 3), filter_num=[64, 128, 256, 512, 1024], n_labels=1, stack_num_down=2,
        stack_num_up=2, activation="ReLU", atten_activation="ReLU", attention="add",
        output_activation="Sigmoid", batch_norm=True, pool=False, unpool=False,
        backbone=KERAS_UNET_COLLECTION[name], weights=None, freeze_backbone=False,
        freeze_batch_norm=False, name="collection")
    return model.count_params()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="build/backbones/backbones.json")
    args = parser.parse_args()

    import keras

    from attunet_keras import backbones
    from attunet_keras import models

    rows = []
    for name in backbones.BACKBONES:
        keras.utils.clear_session()
        model = models.att_unet(128, 128, 1, data_format="channels_last", in_channels=3,
                                backbone=name)
        encoder = model.get_layer(f"{name}_encoder").count_params()
        collection = _collection_count(name) if name in KERAS_UNET_COLLECTION else None
        rows.append({"backbone": name, "att_unet": model.count_params(),
                     "encoder": encoder, "decoder": model.count_params() - encoder,
                     "keras_unet_collection": collection})
        shown = "-" if collection is None else f"{collection:,}"
        print(f"{name:<16}{rows[-1]['att_unet']:>14,}{encoder:>14,}{shown:>16}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(rows, file, indent=2)


if __name__ == "__main__":
    main()
