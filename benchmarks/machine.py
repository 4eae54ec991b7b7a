"""What the benchmarks ran on, recorded next to their figures."""

import os
import platform


def machine():
    """CPU model, core count, GPUs and library versions."""
    import keras
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpus = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
            for gpu in tf.config.list_physical_devices("GPU")]
    found = {"cpu": cpu, "cpu_cores": os.cpu_count(), "gpus": gpus,
             "device": "GPU" if gpus else "CPU", "python": platform.python_version(),
             "tensorflow": tf.__version__, "keras": keras.__version__,
             "keras_backend": keras.backend.backend()}
    for name in ("jax", "torch"):
        if keras.backend.backend() == name:
            found[name] = __import__(name).__version__
    return found
