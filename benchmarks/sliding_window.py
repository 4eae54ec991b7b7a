"""Peak memory and speed of sliding-window inference against whole-image prediction.

The model is the command line's default (`att_unet`, depth 4, features 16, one input
channel, one sigmoid label, channels_last, random weights: speed and memory do not
depend on them). Each case runs in its own process, so its peak resident memory
(`ru_maxrss`) is its own: whole-image `predict_probabilities` and
`predict_sliding_window` (256² patches in 2D, 64³ in 3D, batch 4, Gaussian blending)
at overlap 0.5 and 0.25, and with TTA (the four flips, at 1024²), on random images of
1024², 2048², 3072² and a 128³ volume. Writes JSON and prints a Markdown table.

    .venv/bin/python benchmarks/sliding_window.py --output build/sliding_window.json
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

WHOLE, HALF, QUARTER, TTA = ("whole", None, False), ("sliding", 0.5, False), \
    ("sliding", 0.25, False), ("sliding", 0.5, True)
CASES = [  # (name, spatial size, method, overlap, tta)
    *[("1024²", (1024, 1024)) + case for case in (WHOLE, HALF, QUARTER, TTA)],
    *[("2048²", (2048, 2048)) + case for case in (WHOLE, HALF)],
    *[("3072²", (3072, 3072)) + case for case in (WHOLE, HALF, QUARTER)],
    *[("128³", (128, 128, 128)) + case for case in (WHOLE, HALF, QUARTER)],
]


def run_case(size, method, overlap, tta):
    """In a child process: one prediction, timed; prints JSON."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np

    from attunet_keras import inference
    from attunet_keras import models

    volume = len(size) == 3
    build = models.att_unet_3d if volume else models.att_unet
    model = build(*([None] * len(size)), 1, depth=4, features=16,
                  data_format="channels_last", in_channels=1)
    image = np.random.default_rng(0).random(size, dtype="float32")
    patch = 64 if volume else 256
    start = time.perf_counter()
    if method == "whole":
        if volume:  # predict_probabilities is 2D: one window of the whole volume
            result = inference.predict_sliding_window(model, image, size, batch_size=1)
        else:
            result = inference.predict_probabilities(model, image)
    else:
        result = inference.predict_sliding_window(model, image, patch, overlap=overlap,
                                                  tta=tta, batch_size=4)
    seconds = time.perf_counter() - start
    assert result.shape[:len(size)] == size
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT" + json.dumps({"seconds": seconds, "peak_mb": peak_mb}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="build/sliding_window.json")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        size, method, overlap, tta = json.loads(args.case)
        run_case(tuple(size), method, overlap, tta)
        return 0

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import machine

    rows = []
    for name, size, method, overlap, tta in CASES:
        child = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--case",
             json.dumps([size, method, overlap, tta])],
            capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT")]
        row = dict(image=name, method=method, overlap=overlap, tta=tta)
        if child.returncode or not lines:
            row["error"] = (child.stderr.strip().splitlines() or ["killed"])[-1][:200]
        else:
            measured = json.loads(lines[0][len("RESULT"):])
            pixels = 1
            for side in size:
                pixels *= side
            row.update(seconds=round(measured["seconds"], 2),
                       peak_gb=round(measured["peak_mb"] / 1024, 2),
                       megavoxels_per_s=round(pixels / measured["seconds"] / 1e6, 3))
        rows.append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump({"machine": machine(), "rows": rows}, file, indent=2)
    print("\n| image | method | overlap | TTA | seconds | Mpixel/s | peak memory (GB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        if "error" in row:
            print(f"| {row['image']} | {row['method']} | {row['overlap'] or ''} | "
                  f"{'yes' if row['tta'] else ''} | fails: {row['error']} | | |")
            continue
        print(f"| {row['image']} | {row['method']} | {row['overlap'] or ''} | "
              f"{'yes' if row['tta'] else ''} | {row['seconds']} | "
              f"{row['megavoxels_per_s']} | {row['peak_gb']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
