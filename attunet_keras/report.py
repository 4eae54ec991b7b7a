"""A report to look at: one self-contained `report.html` for a run or a cross-validation.

`write_report(folder)` (`attunet-keras report RUN_OR_CV_DIR`) writes, with every image
embedded as a PNG data URI and no other file or network resource:

- the learning curves of `log.csv` (every fold's, for a cross-validation);
- the class table of `summary.json` (mean, median, spread of Dice, IoU, HD95 and NSD,
  with the cases left out of each figure counted) and the post-processing decided;
- per-case Dice box plots, one box per class;
- the worst and the best held-out cases as overlays (truth and prediction; the middle
  slice of a volume) with their scores, predicted by the model of the run (the fold)
  that held them out;
- the attention maps of the model's gates on one held-out case.

A small inline script counts the figures the browser has decoded into the page's
`data-figures-loaded` attribute, so a headless browser can tell that every one shows.
"""

import base64
import csv
import html
import io
import json
import os

import numpy as np

from attunet_keras import config as config_lib
from attunet_keras import cross_validation
from attunet_keras import evaluation
from attunet_keras import inference
from attunet_keras import postprocess
from attunet_keras import run_folder
from attunet_keras import runs
from attunet_keras import visualize

REPORT_FILE = "report.html"
SHOWN_CASES = 2


def runs_of(folder):
    """`[(label, run folder)]` of a run folder, or of a cross-validation's folds."""
    folder = os.path.abspath(folder)
    if run_folder.is_run_folder(folder):
        return [(os.path.basename(folder), folder)]
    found = [(f"fold {fold}", path) for fold, path in cross_validation.fold_runs(folder)]
    if not found:
        raise ValueError(f"{folder} is neither a training run (config.json and log.csv) "
                         "nor a cross-validation folder (fold_0, fold_1, ... runs).")
    return found


def write_report(folder, output=None, *, shown_cases=SHOWN_CASES):
    """Writes the report of a run or cross-validation folder; returns its path."""
    folder = os.path.abspath(folder)
    members = runs_of(folder)
    summary = _summary(folder, members)
    output = output or os.path.join(folder, REPORT_FILE)
    if os.path.isdir(output):
        raise ValueError(f"--output {output} is a folder; give the .html file to write.")
    cases = summary["cases"]
    if not cases:
        raise ValueError(f"{folder}: the summary holds no held-out case to show.")
    sections = [_curves(members), _table(summary, folder), _boxes(summary)]
    ranked = sorted(cases, key=lambda case: (_mean_dice(case), case["case"]))
    chosen = ranked[:shown_cases] + [case for case in ranked[::-1][:shown_cases]
                                     if case not in ranked[:shown_cases]]
    sections.append(_cases(chosen, members, shown_cases))
    sections.append(_attention(ranked[len(ranked) // 2], members))
    config = config_lib.read_config(members[0][1])
    title = (f"attunet_keras report: {os.path.basename(folder)} "
             f"({len(members)} run{'s' if len(members) > 1 else ''}, dataset "
             f"{config.dataset})")
    page = _PAGE.format(title=html.escape(title), body="\n".join(sections))
    runs.write_text(output, page)
    return output


def _summary(folder, members):
    """The per-case summary shown: the cross-validation's, or the run's (evaluated
    now when the run has none)."""
    path = os.path.join(folder, evaluation.SUMMARY_JSON)
    if not os.path.isfile(path) and len(members) == 1:
        result = evaluation.evaluate_run(folder)
        evaluation.write_summary(folder, result["summary"])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: run attunet-keras cross-validate "
                                "again to finish the cross-validation.")
    summary = evaluation.read_summary(path)
    fold_of = {}
    for index, (_, run) in enumerate(members):
        for name in config_lib.read_config(run).val_files or []:
            fold_of[name] = index
    for case in summary["cases"]:
        case.setdefault("fold", fold_of.get(case["case"], 0))
    return summary


def _mean_dice(case):
    return float(np.mean([scores["dice"] for scores in case["classes"].values()]))


def _png(figure):
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return _img(buffer.getvalue())


def _img(png_bytes, alt="figure"):
    encoded = base64.b64encode(png_bytes).decode("ascii")
    return f'<img class="figure" alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _curves(members):
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
    for label, run in members:
        with open(os.path.join(run, run_folder.LOG_FILE), newline="") as file:
            rows = list(csv.DictReader(file))
        if not rows:
            continue
        epochs = [int(row["epoch"]) + 1 for row in rows]
        left.plot(epochs, [float(row["loss"]) for row in rows], label=f"{label} training")
        if "val_loss" in rows[0]:
            left.plot(epochs, [float(row["val_loss"]) for row in rows], "--",
                      label=f"{label} held-out")
        monitor = next((name for name in rows[0] if name.startswith("val_")
                        and name.endswith("dice")), None)
        if monitor:
            right.plot(epochs, [float(row[monitor]) for row in rows], label=label)
    left.set_title("loss"), left.set_xlabel("epoch"), left.legend(fontsize=7)
    right.set_title("held-out Dice per epoch (fixed validation batches)")
    right.set_xlabel("epoch"), right.legend(fontsize=7)
    return f"<h2>Learning curves</h2>\n{_png(figure)}"


def _table(summary, folder):
    head = ("<tr><th>class</th><th>metric</th><th>mean</th><th>median</th><th>std</th>"
            "<th>cases</th><th>left out</th></tr>")
    rows = []
    for name, stats in summary["per_class"].items():
        for metric in evaluation.METRICS:
            figures = stats[metric]
            cells = ["-" if figures[key] is None else f"{figures[key]:.4f}"
                     for key in ("mean", "median", "std")]
            left = ", ".join(f"{figures[kind]} {kind}" for kind in ("nan", "inf")
                             if figures[kind]) or "-"
            rows.append(f"<tr><td>{html.escape(name)}</td><td>{metric}</td>"
                        + "".join(f"<td>{cell}</td>" for cell in cells)
                        + f"<td>{figures['cases']}</td><td>{left}</td></tr>")
    notes = [f"NSD at a tolerance of {summary['nsd_tolerance']:g} "
             f"{summary['distance_unit']}; HD95 in {summary['distance_unit']}. Both masks "
             "empty: Dice 1, HD95 and NSD NaN (left out); one empty: Dice 0, NSD 0, "
             "HD95 infinite (left out of its mean and median)."]
    decided = os.path.join(folder, postprocess.POSTPROCESSING_FILE)
    if os.path.isfile(decided):
        with open(decided) as file:
            written = json.load(file)
        report = written["report"]
        notes.append(f"Post-processing decided from the folds: "
                     f"{postprocess.describe(written['decisions'])}; mean foreground Dice "
                     f"{report['foreground_dice_before']:.4f} before, "
                     f"{report['foreground_dice_after']:.4f} after.")
    return ("<h2>Held-out scores per case</h2>\n<table>" + head + "".join(rows)
            + "</table>\n" + "".join(f"<p>{html.escape(note)}</p>" for note in notes))


def _boxes(summary):
    plt = _pyplot()
    names = summary["classes"]
    figure, axis = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.5))
    axis.boxplot([[case["classes"][name]["dice"] for case in summary["cases"]]
                  for name in names])
    axis.set_xticks(range(1, len(names) + 1), names)
    axis.set_ylabel("Dice per case"), axis.set_ylim(-0.02, 1.02)
    return f"<h2>Dice per case</h2>\n{_png(figure)}"


def _model_and_case(members, case):
    """The model of the run that held `case` out, and the case's image and labels."""
    run = members[case.get("fold", 0)][1]
    config = config_lib.read_config(run)
    dataset = config_lib.load_data(config, run_dir=run)
    index = next(index for index in dataset.val if dataset.items[index].name == case["case"])
    image, mask = dataset.read(index)
    return evaluation.load_run_model(run), dataset, image, mask


def _middle(array, dims):
    return array[array.shape[0] // 2] if dims == 3 else array


def _cases(chosen, members, shown):
    plt = _pyplot()
    blocks = []
    for position, case in enumerate(chosen):
        model, dataset, image, mask = _model_and_case(members, case)
        probabilities = inference.predict_sliding_window(
            model, image, dataset.tile_shape, overlap=evaluation.EVALUATE_OVERLAP,
            normalized=True)
        labels = inference.labels_from_probabilities(probabilities)
        shown_image = _middle(image, dataset.dims)
        figure, axes = plt.subplots(1, 2, figsize=(7, 3.6))
        for axis, (title, overlay) in zip(axes, (
                ("annotation", visualize.overlay(shown_image, _middle(mask, dataset.dims))),
                ("prediction", visualize.overlay(shown_image, _middle(labels, dataset.dims))))):
            axis.imshow(overlay), axis.set_title(title), axis.axis("off")
        scores = "; ".join(f"{name}: Dice {values['dice']:.3f}, NSD "
                           + ("-" if values["nsd"] != values["nsd"] else f"{values['nsd']:.3f}")
                           for name, values in case["classes"].items())
        kind = "worst" if position < shown else "best"
        blocks.append(f"<h3>{kind}: {html.escape(case['case'])} (fold "
                      f"{case.get('fold', 0)})</h3>\n<p>{html.escape(scores)}</p>\n"
                      f"{_png(figure)}")
    return "<h2>The worst and the best held-out cases</h2>\n" + "\n".join(blocks)


def _attention(case, members):
    model, dataset, image, _ = _model_and_case(members, case)
    try:
        probabilities, gate_maps = inference.attention_maps(model, image, normalized=True)
    except ValueError as error:  # a model without gates (a converted backbone, ...)
        return f"<h2>Attention maps</h2>\n<p>{html.escape(str(error))}</p>"
    if dataset.dims == 3:
        middle = image.shape[0] // 2
        gate_maps = {name: gate[min(middle * gate.shape[0] // image.shape[0],
                                    gate.shape[0] - 1)] for name, gate in gate_maps.items()}
        image, probabilities = image[middle], probabilities[middle]
    buffer = io.BytesIO()
    visualize.attention_figure(buffer, image, probabilities, gate_maps,
                               title=f"Attention gates on {case['case']}")
    return (f"<h2>Attention maps</h2>\n<p>Every gate's coefficients on held-out case "
            f"{html.escape(case['case'])}, deepest first.</p>\n"
            + _img(buffer.getvalue(), "attention maps"))


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }}
img.figure {{ max-width: 100%; display: block; margin: 0.5em 0 1.5em; }}
</style>
</head>
<body data-figures-loaded="0">
<h1>{title}</h1>
{body}
<script>
window.addEventListener("load", function () {{
  var shown = Array.prototype.filter.call(document.images, function (image) {{
    return image.complete && image.naturalWidth > 0;
  }});
  document.body.setAttribute("data-figures-loaded", String(shown.length));
}});
</script>
</body>
</html>
"""
