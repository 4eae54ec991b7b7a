"""The `attunet-keras` command line, for Python: `cli.main(["train", ...])` runs a command
as the console script does and returns its exit status; `cli.build_parser()` is its
argument parser. Both live in the top-level console module `attunet_keras_cli` (it
parses before TensorFlow loads); the commands' bodies are `attunet_keras.commands`.
"""

from attunet_keras_cli import build_parser
from attunet_keras_cli import main

__all__ = ["build_parser", "main"]
