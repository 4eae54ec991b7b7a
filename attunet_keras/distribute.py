"""Distribution strategies, mixed precision and XLA for training.

`get_strategy(name)` picks a `tf.distribute` strategy under the TensorFlow backend, or
a `KerasDistribution` (one device, or `keras.distribution.DataParallel` under JAX)
under the others; models are built and compiled inside `strategy.scope()` and the
batch size given per replica (global batch = per replica x replicas). `set_precision`
sets Keras's global dtype policy (the models keep a float32 output layer), and
`resolve_jit_compile` keeps XLA off under multi-replica tf.distribute strategies,
where Keras's `fit` with XLA fails (keras-team/keras#19005).
"""

import contextlib
import os

STRATEGIES = ("auto", "default", "one_device", "mirrored", "multiworker", "tpu",
              "data_parallel")
# tf.distribute strategies: TensorFlow backend only.
TF_STRATEGIES = ("one_device", "mirrored", "multiworker", "tpu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
JIT_CHOICES = ("auto", "on", "off")


def backend():
    """The Keras backend in use: `"tensorflow"`, `"jax"` or `"torch"`."""
    import keras

    return keras.backend.backend()


class KerasDistribution:
    """The strategy of the JAX and PyTorch backends: one device, or Keras's own
    `keras.distribution.DataParallel` (JAX) over every local device.

    It offers what training uses of a `tf.distribute.Strategy`: `scope()` (the
    distribution is active inside it, for building *and* fitting) and
    `num_replicas_in_sync`.
    """

    def __init__(self, distribution=None):
        self.distribution = distribution

    @property
    def devices(self):
        if self.distribution is None:
            return []
        return [str(device) for device in self.distribution.device_mesh.devices.flatten()]

    @property
    def num_replicas_in_sync(self):
        return max(len(self.devices), 1)

    def scope(self):
        if self.distribution is None:
            return contextlib.nullcontext()
        return self.distribution.scope()


def check_strategy_backend(name):
    """Refuses a strategy the Keras backend in use cannot run, naming both."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy={name!r} is not supported; expected one of {STRATEGIES}.")
    current = backend()
    if name == "data_parallel" and current != "jax":
        raise ValueError(
            "strategy='data_parallel' is keras.distribution.DataParallel, which runs under "
            f"KERAS_BACKEND=jax (the backend in use is {current}); under tensorflow use "
            "'mirrored'."
        )
    if name in TF_STRATEGIES and current != "tensorflow":
        others = "'default' or 'data_parallel'" if current == "jax" else "'default'"
        raise ValueError(
            f"strategy={name!r} is a tf.distribute strategy and needs "
            f"KERAS_BACKEND=tensorflow (the backend in use is {current}); under {current} "
            f"use {others}."
        )


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
            - `"data_parallel"` (JAX backend only): `keras.distribution.DataParallel`
              over every local device (a `KerasDistribution`).
            Under the JAX and PyTorch backends, `"auto"` and `"default"` give a
            `KerasDistribution` of one device; the tf.distribute names are refused.

    Returns:
        The strategy.
    """
    check_strategy_backend(name)
    if name == "data_parallel":
        import keras

        return KerasDistribution(keras.distribution.DataParallel(
            devices=keras.distribution.list_devices()))
    if backend() != "tensorflow":  # auto and default: one device, plain Keras
        return KerasDistribution()

    import tensorflow as tf

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
    if isinstance(strategy, KerasDistribution):
        if strategy.distribution is None:
            return f"Keras on {backend()}: 1 replica(s) on the default device"
        return (f"keras.distribution.DataParallel on {backend()}: "
                f"{strategy.num_replicas_in_sync} replica(s) on {', '.join(strategy.devices)}")
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
    if backend() != "tensorflow":
        raise ValueError(
            f"splitting the CPU (--cpu-devices) is TensorFlow's; the backend in use is "
            f"{backend()}. Under jax, set XLA_FLAGS=--xla_force_host_platform_device_count=N "
            "before starting for N CPU devices."
        )
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
    if (strategy is not None and not isinstance(strategy, KerasDistribution)
            and strategy.num_replicas_in_sync > 1):
        return False
    return "auto"
