"""Multi-worker training with two real worker processes on localhost."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from attunet_keras import data
from attunet_keras import run_folder
from attunet_keras import training
from helpers import write_pairs

SETTINGS = ["--depth", "2", "--features", "4", "--tile", "64",
            "--dropout", "0", "--loss", "bce", "--learning-rate", "0.01", "--seed", "0"]


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("localhost", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _start_workers(output, extra, ports):
    script = os.path.join(os.path.dirname(sys.executable), "attunet-keras")
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": [f"localhost:{port}" for port in ports]},
                     "task": {"type": "worker", "index": index}}
        environment = dict(os.environ, TF_CONFIG=json.dumps(tf_config),
                           TF_CPP_MIN_LOG_LEVEL="2")
        processes.append(subprocess.Popen(
            [script, "train", "--output", str(output), "--strategy", "multiworker",
             "--batch-size", "2", *SETTINGS, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment))
    return processes


def _finish(processes, timeout=300):
    outputs = []
    for process in processes:
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
        outputs.append(out)
    return outputs


def _weights(config, path):
    dataset = training.load_data(config)
    model = training.build_model(config, dataset)
    model.optimizer.build(model.trainable_variables)
    model.load_weights(path)
    return model.get_weights()


def test_two_workers_end_with_the_weights_of_one_process(tmp_path):
    extra = ["--dataset", "nuclei", "--epochs", "2", "--steps-per-epoch", "3"]
    processes = _start_workers(tmp_path / "multi", extra, _free_ports(2))
    outputs = _finish(processes)
    assert [p.returncode for p in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "2 replica(s)" in outputs[0]

    # The same run in one process, with the same global batch (2 workers x 2).
    single = training.TrainConfig(
        dataset="nuclei", output=str(tmp_path / "single"), epochs=2, steps_per_epoch=3,
        batch_size=4, depth=2, features=4, tile=64, dropout=0.0, loss="bce",
        learning_rate=0.01, seed=0, strategy="default", jit_compile="off")
    training.train(single, verbose=0)
    import keras

    expected = keras.saving.load_model(tmp_path / "single" / "last.keras").get_weights()
    worker0 = _weights(single, tmp_path / "multi" / "workers" / "worker0.weights.h5")
    worker1 = _weights(single, tmp_path / "multi" / "workers" / "worker1.weights.h5")
    # The workers sum their half-batch gradients in another order than one process
    # sums the batch; Adam turns that float32 round-off into weight differences up to
    # 3.3e-5 after these 6 steps at lr 0.01 (measured in a fresh process; median 1e-7).
    # A wrong split (the single run on batches of 2 instead of 4) moves weights by up
    # to 0.07 (median 2.7e-3): 1e-4 tells the two apart.
    for a, b, c in zip(worker0, worker1, expected):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, atol=1e-4)
    assert not np.allclose(worker0[1], 0.0)
    assert (tmp_path / "multi" / "result.json").is_file()
    # Both loops end their epochs in one recorder: the same log columns, one row per
    # epoch, and validation on the same fixed held-out batches.
    logs = {}
    for name in ("multi", "single"):
        with open(tmp_path / name / "log.csv") as file:
            reader = csv.DictReader(file)
            logs[name] = (reader.fieldnames, list(reader))
    assert logs["multi"][0] == logs["single"][0]
    assert "dice" in logs["multi"][0] and "val_dice" in logs["multi"][0]
    assert [row["epoch"] for row in logs["multi"][1]] == ["0", "1"]
    assert [row["epoch"] for row in logs["single"][1]] == ["0", "1"]
    for multi, single in zip(logs["multi"][1], logs["single"][1]):
        assert float(multi["val_dice"]) == pytest.approx(float(single["val_dice"]), abs=1e-3)


def test_each_worker_reads_its_own_share_of_the_training_files(tmp_path):
    """A folder of 10 pairs (2 held out): the two workers' reads of training files,
    logged by the pipeline, are disjoint and together every training file."""
    dataset = write_pairs(tmp_path / "set", 10, stem="img")
    log = tmp_path / "reads.log"
    settings = ["--dataset", str(dataset), "--n-label", "1", "--epochs", "1"]
    os.environ[data.pipeline.READ_LOG_ENV] = str(log)
    try:
        processes = _start_workers(tmp_path / "run", settings, _free_ports(2))
    finally:
        del os.environ[data.pipeline.READ_LOG_ENV]
    outputs = _finish(processes)
    assert [p.returncode for p in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]

    config = training.read_config(str(tmp_path / "run"))
    training_files = set(os.listdir(dataset / "images")) - set(config.val_files)
    assert len(config.val_files) == 2 and len(training_files) == 8
    read = {}
    for line in log.read_text().splitlines():
        pid, name = line.split("\t")
        read.setdefault(pid, set()).add(name)
    assert len(read) == 2  # two worker processes
    # Each worker validates on the same held-out files (the run's fixed validation
    # batches); of the training files, each reads its own share.
    held_out = set(config.val_files)
    assert all(names & held_out == held_out for names in read.values())
    first, second = (names - held_out for names in read.values())
    assert not first & second
    assert first | second == training_files


def test_a_killed_worker_stops_the_other_and_both_resume(tmp_path):
    output = tmp_path / "run"
    extra = ["--dataset", "nuclei", "--epochs", "3", "--steps-per-epoch", "12",
             "--backup-every", "1"]
    chief, worker = _start_workers(output, extra, _free_ports(2))
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            progress = run_folder.backup_progress(str(output / "backup"))
            if progress and progress["epoch"] >= 1 and progress["step"] >= 2:
                break
            if chief.poll() is not None or worker.poll() is not None:
                pytest.fail("a worker ended before the kill:\n" + _finish([chief])[0][-2000:])
            time.sleep(0.05)
        else:
            pytest.fail("no backup in the second epoch appeared in time")
        worker.send_signal(signal.SIGKILL)
        killed_at = time.time()
        chief_output = _finish([chief], timeout=180)[0]
    finally:
        for process in (chief, worker):
            if process.poll() is None:
                process.kill()
            process.wait()

    assert chief.returncode == 2, chief_output[-3000:]
    assert "worker 0 lost contact with the other workers" in chief_output
    assert "Start every worker again with the same command" in chief_output
    assert time.time() - killed_at < 150
    resume_epoch = run_folder.backup_progress(str(output / "backup"))["epoch"]
    assert resume_epoch >= 1

    processes = _start_workers(output, extra, _free_ports(2))
    outputs = _finish(processes)
    assert [p.returncode for p in processes] == [0, 0], outputs[0][-3000:]
    for index, text in enumerate(outputs):
        assert f"Worker {index}: resuming {output} from its backup at epoch " \
               f"{resume_epoch + 1}" in text
    assert "Epoch 1/3" not in outputs[0]
    with open(output / "log.csv") as file:
        assert [row["epoch"] for row in csv.DictReader(file)] == ["0", "1", "2"]
    assert (output / "result.json").is_file() and not (output / "backup").exists()


def test_a_taken_port_is_named_and_the_peer_gives_up_in_time(tmp_path):
    ports = _free_ports(2)
    taken = socket.socket()
    taken.bind(("localhost", ports[1]))
    taken.listen()
    try:
        started = time.time()
        processes = _start_workers(tmp_path / "run", ["--dataset", "nuclei",
                                                      "--cluster-timeout", "8"], ports)
        outputs = _finish(processes, timeout=150)
        elapsed = time.time() - started
    finally:
        taken.close()
    # worker 1 stops with the port named; worker 0 is ended by its watchdog (SIGKILL)
    assert [p.returncode for p in processes] == [-signal.SIGKILL, 2], outputs
    assert f"cannot listen on localhost:{ports[1]} (port {ports[1]})" in outputs[1]
    assert "did not join within 8 s (--cluster-timeout)" in outputs[0]
    assert elapsed < 120
    assert not (tmp_path / "run").exists()
