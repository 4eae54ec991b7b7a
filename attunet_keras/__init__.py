"""attunet_keras: the Attention U-Net for Keras 3.

Importing the package registers every custom object (losses, metrics, layers) with
Keras, so `keras.saving.load_model("RUN/best.keras")` works after `import attunet_keras`.
"""

from attunet_keras import layers  # noqa: F401  (registers the custom layers)
from attunet_keras import losses  # noqa: F401  (registers the custom losses)
from attunet_keras import metrics  # noqa: F401  (registers the custom metrics)

from attunet_keras.blocks import attention_up_and_concat
from attunet_keras.blocks import attention_up_and_concat_3d
from attunet_keras.blocks import attn_block_2d
from attunet_keras.blocks import attn_block_3d
from attunet_keras.blocks import grid_attn_block_2d
from attunet_keras.blocks import grid_attn_block_3d
from attunet_keras.inference import attention_model
from attunet_keras.models import att_unet
from attunet_keras.models import att_unet_3d

__version__ = "0.1.0"

__all__ = [
    "att_unet",
    "att_unet_3d",
    "attention_model",
    "attention_up_and_concat",
    "attention_up_and_concat_3d",
    "attn_block_2d",
    "attn_block_3d",
    "grid_attn_block_2d",
    "grid_attn_block_3d",
    "__version__",
]
