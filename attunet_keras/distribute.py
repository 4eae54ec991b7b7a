"""Distribution strategies, mixed precision and XLA for training with tf.distribute.

`get_strategy(name)` picks a `tf.distribute` strategy; models are built and compiled
inside `strategy.scope()` and the batch size given per replica (global batch = per
replica x replicas). `set_precision` sets Keras's global dtype policy (the models keep
a float32 output layer), and `resolve_jit_compile` keeps XLA off under multi-replica
strategies, where Keras's `fit` with XLA fails (keras-team/keras#19005).
"""

import contextlib
import os

STRATEGIES = ("auto", "default", "one_device", "mirrored", "multiworker", "tpu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
JIT_CHOICES = ("auto", "on", "off")


def get_strategy(name="auto"):
    """A `tf.distribute.Strategy` by name.

    Args:
        name: str. One of:
            - `"auto"`: `TPUStrategy` when a TPU is found, `MirroredStrategy` over all
              GPUs when there is more than one, the default strategy otherwise.
            - `"default"`: the default (no-op) strategy: one device, as plain Keras.
            - `"one_device"`: `OneDeviceStrategy` on the first GPU, or the CPU.
            - `"mirrored"`: `MirroredStrategy` over every GPU (or every logical CPU
              device when there is no GPU).
            - `"multiworker"`: `MultiWorkerMirroredStrategy`, configured by the
              `TF_CONFIG` environment variable (see `attunet_keras.multiworker`).
            - `"tpu"`: `TPUStrategy`; an error when no TPU is found.

    Returns:
        The strategy.
    """
    import tensorflow as tf

    if name not in STRATEGIES:
        raise ValueError(f"strategy={name!r} is not supported; expected one of {STRATEGIES}.")
    if name == "auto":
        resolver = _tpu_resolver()
        if resolver is not None:
            return _tpu_strategy(resolver)
        if len(tf.config.list_logical_devices("GPU")) > 1:
            return tf.distribute.MirroredStrategy()
        return tf.distribute.get_strategy()
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [device.name for device in gpus or tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError(
                "strategy='multiworker' needs the TF_CONFIG environment variable "
                "(cluster addresses and this worker's index); see the README."
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = _tpu_resolver()
    if resolver is None:
        raise ValueError("strategy='tpu' was asked for, but no TPU was found.")
    return _tpu_strategy(resolver)


def _tpu_resolver():
    import tensorflow as tf

    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        resolver.master()
    except (ValueError, RuntimeError, tf.errors.NotFoundError):
        return None
    return resolver


def _tpu_strategy(resolver):
    import tensorflow as tf

    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def describe(strategy):
    """One line: the strategy's class, its replica count and its devices."""
    try:
        devices = list(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy has no device list
        devices = ["the default device"]
    return (f"{type(strategy).__name__}: {strategy.num_replicas_in_sync} replica(s) on "
            f"{', '.join(devices)}")


def split_cpu(count):
    """Splits the CPU into `count` logical devices (for mirrored training on a CPU).

    Must run before TensorFlow initialises its devices (before any op runs).
    """
    import tensorflow as tf

    if count < 1:
        raise ValueError(f"count={count!r} is not allowed; expected an integer >= 1.")
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as error:
        raise RuntimeError(
            "the CPU can only be split before TensorFlow initialises its devices; "
            f"call split_cpu first ({error})."
        ) from error


@contextlib.contextmanager
def precision_policy(precision):
    """A context in which Keras's global dtype policy is `precision`; restored after."""
    import keras

    previous = keras.config.dtype_policy()
    set_precision(precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def set_precision(precision):
    """Sets Keras's global dtype policy: `float32`, `mixed_float16` or `mixed_bfloat16`."""
    import keras

    if precision not in PRECISIONS:
        raise ValueError(
            f"precision={precision!r} is not supported; expected one of {PRECISIONS}."
        )
    keras.config.set_dtype_policy(precision)


def check_precision_on_device(precision, data_format):
    """Refuses `mixed_float16` training in `channels_first` on a machine without GPUs.

    TensorFlow's CPU float16 convolution gradient supports `channels_last` only
    ("Conv2DCustomBackpropInputOp only supports NHWC"), so such a run would fail at its
    first step.
    """
    import tensorflow as tf

    if (precision == "mixed_float16" and data_format == "channels_first"
            and not tf.config.list_physical_devices("GPU")):
        raise ValueError(
            "precision='mixed_float16' with data_format='channels_first' cannot train "
            "on a CPU: TensorFlow's CPU float16 convolution gradient supports "
            "channels_last only. Use data_format='channels_last', or mixed_bfloat16."
        )


def resolve_jit_compile(jit_compile, strategy):
    """`jit_compile` for `model.compile`: `"auto"` is off under several replicas.

    Keras's `fit` with XLA fails under MirroredStrategy (keras-team/keras#19005), and
    XLA slows training on CPUs, where Keras's own `"auto"` already turns it off.
    """
    if jit_compile not in JIT_CHOICES:
        raise ValueError(
            f"jit_compile={jit_compile!r} is not supported; expected one of {JIT_CHOICES}."
        )
    if jit_compile == "on":
        return True
    if jit_compile == "off":
        return False
    if strategy is not None and strategy.num_replicas_in_sync > 1:
        return False
    return "auto"
