"""attunet_keras: the Attention U-Net for Keras 3."""

from attunet_keras.blocks import attention_up_and_concat
from attunet_keras.blocks import attn_block_2d
from attunet_keras.models import att_unet

__version__ = "0.1.0"

__all__ = ["att_unet", "attention_up_and_concat", "attn_block_2d", "__version__"]
