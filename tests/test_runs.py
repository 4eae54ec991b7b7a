"""attunet_keras.runs: files whole or absent, and one holder per lock."""

import os
import threading
import time

from attunet_keras import runs


def test_a_waiter_never_shares_a_lock_whose_file_was_removed(tmp_path):
    """A holder that removes its lock file on release (`remove=True`), a waiter already
    blocked on that file, and a third process that creates a new one: the waiter must
    not believe it holds the lock while the third does."""
    import fcntl

    lock = str(tmp_path / "entry.lock")
    first = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(first, fcntl.LOCK_EX)
    inside, overlaps = [], []

    def hold(name):
        with runs.file_lock(lock, remove=True):
            if inside:
                overlaps.append((inside[0], name))
            inside.append(name)
            time.sleep(0.3)
            inside.remove(name)

    waiter = threading.Thread(target=hold, args=("waiter",))
    waiter.start()
    time.sleep(0.2)  # the waiter is blocked on the first file
    os.remove(lock)  # the first holder removes its file, then releases it
    fcntl.flock(first, fcntl.LOCK_UN)
    os.close(first)
    hold("third")
    waiter.join()
    assert overlaps == []
    assert not os.path.exists(lock)


def test_atomic_path_gives_each_writer_its_own_temporary_name(tmp_path):
    target = tmp_path / "entry.npz"
    with runs.atomic_path(target, suffix=".npz") as one, \
            runs.atomic_path(target, suffix=".npz") as two:
        assert one != two and os.path.basename(one).startswith(".entry.npz.")
        assert one.endswith(".tmp.npz")
        for path, text in ((one, "first"), (two, "second")):
            with open(path, "w") as file:
                file.write(text)
    assert target.read_text() == "first"  # the outer block renamed last
    assert sorted(os.listdir(tmp_path)) == ["entry.npz"]


def test_a_folder_lock_refuses_a_second_holder_and_leaves_nothing_when_unused(tmp_path):
    folder = tmp_path / "run"
    with runs.folder_lock(str(folder)):
        assert runs.holder(str(folder / runs.LOCK_FILE)).startswith(f"{os.getpid()}@")
        try:
            with runs.folder_lock(str(folder)):
                raise AssertionError("a second holder got in")
        except runs.Busy as error:
            assert f"run folder {folder} is in use by process {os.getpid()}@" in str(error)
    assert not folder.exists()  # made for the lock, left empty: removed
