"""The bodies of the `attunet-keras` commands: inspect, train, evaluate, predict, export.

The parser lives in the top-level module `attunet_keras_cli` (the console script),
which parses the arguments before TensorFlow loads and then calls `run` here with the
parsed command. This module imports neither the parser nor `attunet_keras.cli`, so the
imports run one way: `attunet_keras.cli` -> `attunet_keras_cli` -> this module.
"""

import dataclasses
import json
import os

from attunet_keras import postprocess
from attunet_keras import runs


def run(parser, args):
    """Runs a parsed command; every expected failure exits 2 with one line.

    The exit happens outside the `except` block, after a garbage collection: an error
    from inside `fit` references its `tf.data` iterators, and one still alive when
    Python exits hangs the process (`training.stop_on_read_failure` says why).
    """
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as error:
        message = f"attunet-keras {args.command}: error: {error}\n"
    except OSError as error:  # read-only folders, full disks, ...
        where = f" {error.filename}" if error.filename else ""
        message = (f"attunet-keras {args.command}: error: cannot write or read{where}: "
                   f"{error.strerror or error}\n")
    import gc

    gc.collect()
    parser.exit(2, message)


def _check_output(args, extensions=None):
    """Refuses to replace an existing output, or to write an unknown file type."""
    output = args.output
    if os.path.lexists(output) and not args.overwrite:
        raise FileExistsError(
            f"{output} already exists; choose another path or pass --overwrite."
        )
    if os.path.isdir(output):
        raise FileExistsError(
            f"{output} is a folder; --overwrite only replaces a file. Choose a file path."
        )
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"--output {output}: the folder {os.path.dirname(output) or folder} does not "
            "exist; create it first.")
    if extensions:
        extension = os.path.splitext(output)[1].lower()
        if extension not in extensions:
            raise ValueError(
                f"--output {output!r} has extension {extension!r}; expected one of "
                f"{', '.join(extensions)}."
            )


def _load_or_build(args):
    if args.run:
        from attunet_keras import training

        return training.load_run_model(args.run)
    if args.model:
        from attunet_keras import inference

        return inference.load_model(args.model)

    from attunet_keras import models

    return models.att_unet(
        args.img_w, args.img_h, args.n_label, depth=args.depth,
        features=args.features, data_format=args.data_format,
        in_channels=args.in_channels,
    )


def _summary(args):
    model = _load_or_build(args)
    model.summary(line_length=args.line_length)
    print(f"Parameters: {model.count_params():,}")
    return 0


def _plot(args):
    import keras

    _check_output(args, (".png", ".svg", ".pdf", ".dot", ".jpg", ".jpeg"))
    model = _load_or_build(args)

    def draw(splines):
        # What plot_model does, without its IPython display step, which fails for
        # .svg and .dot files whenever IPython is installed.
        graph = keras.utils.model_to_dot(
            model, show_shapes=True, show_layer_names=True, rankdir=args.rankdir,
            dpi=args.dpi, splines=splines,
        )
        graph.write(args.output, format=os.path.splitext(args.output)[1][1:].lower())

    try:
        draw(args.splines)
    except AssertionError:
        # pydot raises AssertionError when `dot` fails. Graphviz's orthogonal router
        # aborts on some graphs ("maze.c: chkSgraph"); polyline edges always route.
        if args.splines != "ortho":
            raise
        print("Graphviz's orthogonal edge router failed on this graph; "
              "drawing it with --splines polyline instead.")
        draw("polyline")
    if not os.path.isfile(args.output):
        raise FileNotFoundError(
            f"plot_model wrote no {args.output}; is Graphviz's 'dot' installed "
            "(Debian: apt-get install graphviz)?"
        )
    print(f"Wrote {args.output}")
    return 0


def _export(args):
    from attunet_keras import export
    from attunet_keras import inference

    export.check_backend(args.format)
    extensions = {"onnx": (".onnx",), "litert": (".tflite",)}.get(args.format)
    if extensions and os.path.splitext(args.output)[1].lower() not in extensions:
        raise ValueError(f"--output {args.output!r}: a {args.format} export is a "
                         f"{extensions[0]} file.")
    export.check_target(args.output, args.format, args.overwrite)
    if args.quantize and args.format != "litert":
        raise ValueError("--quantize int8 applies to --format litert only.")
    if args.quantize and not args.run:
        raise ValueError(
            "--quantize int8 needs --run DIR: the run's training patches calibrate it."
        )
    model = _load_or_build(args)
    sample = _check_batch(model, args.seed)
    representative = None
    if args.quantize:
        from attunet_keras import training

        representative = training.calibration_patches(args.run, seed=args.seed)
    rules, patch = _segment_settings(args, model)
    max_diff = export.export_model(
        model, args.output, format=args.format, quantize=args.quantize,
        representative=representative, sample=sample, threshold=args.threshold,
        overwrite=args.overwrite, normalization=rules, patch=patch,
    )
    what = {"savedmodel": "SavedModel (signatures probabilities, mask"
                          + (", segment" if rules else "") + ")",
            "onnx": "ONNX model", "litert": "LiteRT model"}[args.format]
    if rules and args.format != "savedmodel":
        what = f"{what} of the segment graph (raw images in; outputs probabilities, mask)"
    if args.format == "litert":
        shape = (1,) + tuple(model.inputs[0].shape[1:])
        size = f"static input {shape} float32 (LiteRT has static shapes)"
    elif inference.needs_static_sizes(model):
        size = (f"input {tuple(model.inputs[0].shape)} float32: bilinear up-sampling "
                "needs the model's own size")
    else:
        channels = inference.input_channels(model)
        size = (f"input any batch and size with {channels} channel(s) float32, padded "
                f"to multiples of {inference.size_multiple(model)} and cropped "
                "back in the graph")
    outputs = len(model.outputs)
    main_only = f"; main output of {outputs}" if outputs > 1 else ""
    print(f"Wrote {what} {args.output} ({size}{', int8' if args.quantize else ''}"
          f"{main_only})")
    if rules and args.format != "savedmodel":
        why = {"onnx": "tf2onnx does not convert the window loop with the network in it",
               "litert": "LiteRT's shapes are static"}[args.format]
        print(f"segment: normalisation {', '.join(rule['scheme'] for rule in rules)} in the "
              f"graph; " + export.SEGMENT_OUTSIDE.format(format=args.format, why=why)
              + (f"; checked against predict (max difference {max_diff:.3g})"
                 if max_diff is not None else ""))
        return 0
    if max_diff is not None:
        print(f"Reloaded and checked on a batch of {sample.shape}: "
              f"max |export - keras| = {max_diff:.3g}")
    if rules:
        sizes = ", ".join("x".join(map(str, size)) for size in export.segment_sizes(
            patch, 3 if inference.is_volume_model(model) else 2))
        print(f"segment: raw images (batch, *size, {inference.input_channels(model)}), "
              f"normalisation {', '.join(rule['scheme'] for rule in rules)}, "
              + (f"sliding windows of {'x'.join(map(str, patch))}"
                 + (" (volumes always)" if len(patch) == 3 else " above it")
                 if patch else "every image whole")
              + f"; checked against predict at {sizes} (within 1e-4)")
    elif args.format == "savedmodel" and not args.no_segment:
        print("No segment signature: a model without --run needs --normalization (what "
              "segment applies to raw images).")
    elif args.quantize:
        print("int8 outputs differ from float32 by design; benchmarks/deploy.py "
              "measures the Dice it keeps.")
    return 0


def _segment_settings(args, model):
    """`(normalisation rules, patch)` of export's segment signatures (or, with
    --segment, of the ONNX / LiteRT segment graph), or `(None, None)` (other formats
    without --segment, --no-segment, a model without a run or --normalization)."""
    from attunet_keras import inference
    from attunet_keras import serving

    given = args.normalization is not None or args.patch is not None
    if args.segment and args.no_segment:
        raise ValueError("--segment and --no-segment contradict each other; give one.")
    if args.no_segment or (args.format != "savedmodel" and not args.segment):
        if given:
            raise ValueError("--normalization and --patch set the segment signatures of "
                             "--format savedmodel (or, with --segment, the onnx and litert "
                             "graph); leave them out here.")
        return None, None
    if args.format != "savedmodel":
        if inference.is_volume_model(model):
            raise ValueError(f"--segment with --format {args.format}: a 3D model's segment "
                             "runs sliding windows, which this format cannot hold; export "
                             "--format savedmodel.")
        if args.patch is not None and args.format == "litert":
            raise ValueError("--patch with --format litert: the LiteRT graph takes one image "
                             "of the model's own size; leave out --patch.")
        if not args.run and args.normalization is None:
            raise ValueError(f"--segment with --format {args.format} needs --run DIR or "
                             "--normalization SCHEME: what the graph applies to raw images.")
        if args.format == "onnx" and inference.needs_static_sizes(model):
            raise ValueError("--segment with --format onnx: a model with bilinear "
                             "up-sampling runs at its own size only; use --format litert.")
    elif inference.needs_static_sizes(model):
        return None, None
    if not args.run and args.normalization is None:
        return None, None
    channels = inference.input_channels(model)
    rules = serving.normalization_rules(args.run, args.normalization, channels)
    try:
        serving.check_rules(rules)
    except ValueError as error:  # a step with no TensorFlow op: stays with the client
        if args.segment:
            raise
        print(f"No segment signature: {error}")
        return None, None
    rank = 3 if inference.is_volume_model(model) else 2
    patch = ((args.patch,) * rank if args.patch else inference.own_size(model))
    if patch is None and args.run:  # a run of free sizes (--init-from): its patch
        patch = _run_patch(args.run, rank)
    if patch is not None:
        patch = inference.check_patch_size(inference.fully_convolutional(model), patch, rank)
    elif rank == 3:
        raise ValueError("a 3D model's segment runs sliding windows: give --patch N.")
    return rules, patch


def _run_patch(run, rank):
    """The patch a run trained on: its plan's, or its tile (`--tile`, else the
    default of its images or volumes)."""
    from attunet_keras import data
    from attunet_keras import training

    plan = _run_plan(run)
    if plan is not None and not training.read_config(run).tile:
        return tuple(plan["patch"])
    return (training.read_config(run).tile or data.DEFAULT_TILE[rank],) * rank


def _train_config(args):
    """The TrainConfig of parsed train (or cross-validate) flags: every TrainConfig
    field is a flag of the same name (tests/test_cli.py checks both ways); only the
    held-out files are recorded, never given."""
    from attunet_keras import training

    fields = {field.name for field in dataclasses.fields(training.TrainConfig)}
    config = training.TrainConfig(**{name: value for name, value in vars(args).items()
                                     if name in fields})
    config.validate()
    return config


def _train(args):
    from attunet_keras import distribute
    from attunet_keras import training

    config = _train_config(args)
    if args.cpu_devices is not None:
        distribute.split_cpu(args.cpu_devices)
    verbose = args.verbose if args.verbose == "auto" else int(args.verbose)
    if config.strategy == "multiworker":
        from attunet_keras import multiworker

        result = multiworker.train(config, overwrite=args.overwrite, verbose=verbose,
                                   cluster_timeout=args.cluster_timeout)
    else:
        result = training.train(config, overwrite=args.overwrite, verbose=verbose)
    _print_scores(result)
    return 0


def _evaluate(args):
    from attunet_keras import evaluation
    from attunet_keras import model_info

    if not (args.nsd_tolerance >= 0):
        raise ValueError(f"--nsd-tolerance {args.nsd_tolerance} is not allowed; expected a "
                         "number >= 0.")
    output = args.output or args.run
    if not os.path.isdir(output):
        raise FileNotFoundError(f"--output {output}: no such folder; create it first.")
    decisions, source = (postprocess.decisions_for(args.run) if args.postprocess == "auto"
                         else (None, None))
    model = model_info.load_model(args.model) if args.model else None
    if args.with_run:
        if args.model:
            raise ValueError("--with-run joins the run's own best model; leave --model out.")
        model = _ensemble([args.run, *args.with_run])  # each loads as a run, or says why
    result = evaluation.evaluate_run(args.run, model=model,
                                     nsd_tolerance=args.nsd_tolerance,
                                     postprocessing=decisions)
    summary = result.pop("summary")
    paths = evaluation.write_summary(output, summary)
    if args.json:
        print(json.dumps(dict(result, summary=evaluation.json_safe(summary)), indent=2))
        return 0
    _print_scores(result)
    if source:
        print(f"Post-processing from {source}: {postprocess.describe(decisions)}")
    print(f"Per case (NSD at {args.nsd_tolerance:g} {summary['distance_unit']}):")
    print(evaluation.class_table(summary))
    print(f"Wrote {paths[0]} and {paths[1]}")
    return 0


def _report(args):
    from attunet_keras import report

    args.output = args.output or os.path.join(args.folder, report.REPORT_FILE)
    _check_output(args, (".html",))
    report.runs_of(args.folder)  # a clear error for a folder of neither kind
    path = report.write_report(args.folder, args.output)
    print(f"Wrote {path} (self-contained: open it in any browser)")
    return 0


def _cross_validate(args):
    from attunet_keras import cross_validation
    from attunet_keras import distribute

    args.fold = 0  # each fold's own, set by cross_validate; 0 to check the flags
    config = _train_config(args)
    if args.cpu_devices is not None:
        distribute.split_cpu(args.cpu_devices)
    verbose = args.verbose if args.verbose == "auto" else int(args.verbose)
    done = cross_validation.cross_validate(config, verbose=verbose)
    _print_cross_validation(done)
    return 0


def _print_cross_validation(done):
    from attunet_keras import evaluation

    report = done["postprocessing"]["report"]
    print(f"Cross-validation of {done['folds']} folds, {report['cases']} held-out cases:")
    print(evaluation.class_table(done["summary"]))
    print(f"Post-processing decided: {postprocess.describe(done['postprocessing']['decisions'])}"
          f"; mean foreground Dice {report['foreground_dice_before']:.4f} before, "
          f"{report['foreground_dice_after']:.4f} after")
    print(f"Wrote {', '.join(done['written'])}")


def _print_scores(result):
    count = result["held_out_images"]
    print(f"Held-out scores on {result['dataset']} ({count} whole image"
          f"{'' if count == 1 else 's'}):")
    print(f"  {'metric':<24}{'att_unet':>10}{'Otsu':>10}")
    otsu = result["otsu"] or {}
    for name, value in result["model"].items():
        baseline = f"{otsu[name]:>10.4f}" if name in otsu else f"{'n/a':>10}"
        print(f"  {name:<24}{value:>10.4f}{baseline}")
    if "hd95" in result["model"]:
        volumes = result.get("dims") == 3
        unit = "the voxel spacing's units (mm in most NIfTI files)" if volumes else "pixels"
        print(f"  (hd95: 95th percentile Hausdorff distance in {unit}, mean over the "
              f"held-out {'volumes' if volumes else 'images'}; lower is better)")
    if result.get("otsu_note"):
        print(f"  ({result['otsu_note']})")


def _input_names(args):
    """`(name, path)` of every input image, checked before any work; None for a run's
    held-out images (no IMAGE given)."""
    from attunet_keras import data
    from attunet_keras import inference
    from attunet_keras import training

    if not args.input:
        if not args.run:
            raise ValueError(
                "give an IMAGE (or folder), or --run DIR for its held-out images.")
        training.read_config(args.run)  # a clear error for a folder that is not a run
        return None
    stems = {}
    for path in inference.image_files(args.input):
        stem = data.files.split_name(os.path.basename(path))[0]
        if stem in stems:
            raise ValueError(
                f"{stems[stem]} and {path} would write the same {stem}_* outputs; "
                "predict them from separate folders or rename one."
            )
        stems[stem] = path
    return list(stems.items())


def _inputs(args, names):
    """Yields `(name, image, normalized, source)` for the command's images, one at a time."""
    from attunet_keras import data
    from attunet_keras import training

    if args.input:
        for name, path in names:
            yield name, data.read_image(path), False, path
        return
    dataset = training.load_data(training.read_config(args.run), run_dir=args.run)
    for name, image, _ in dataset.examples:
        yield name, image, True, name


def _checked_model(args):
    """The model of predict (on 2D images) and attention: a 2D segmentation model."""
    from attunet_keras import inference

    model = _load_or_build(args)
    if inference.is_volume_model(model):
        given = f"; {args.input} is a 2D image" if args.input else ""
        raise ValueError(
            f"{args.model or args.run}: a 3D model (input {tuple(model.inputs[0].shape)}), "
            f"which takes NIfTI volumes (.nii, .nii.gz){given}. Give {args.command} a "
            "volume, or a 2D model for images.")
    return model


def _predict(args):
    from attunet_keras import data
    from attunet_keras import inference

    args.ensemble = args.run  # every --run given (predict takes several)
    members = _ensemble_runs(args)
    args.run = args.run[0] if args.run else None
    if members:
        args.run = members[0]
        if not args.input:
            raise ValueError("an ensemble predicts given images (each run held out other "
                             "cases): give IMAGE_OR_FOLDER.")
    plan = _run_plan(args.run or (args.model and os.path.dirname(
        os.path.abspath(args.model))))
    if plan is not None and args.input:
        _check_ensemble_plans(plan, members)
        return _predict_medical(args, plan)
    names = _input_names(args)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise FileExistsError(f"--output {args.output} exists and is not a folder.")
    if names is not None:
        folders = {os.path.dirname(os.path.realpath(path)) for _, path in names}
        if os.path.realpath(args.output) in folders:
            raise ValueError(
                f"--output {args.output} is the input folder (it holds the input images); "
                "write the masks elsewhere so that they are never mistaken for (or written over) "
                "images.")
    if names is not None and any(data.is_volume_file(path) for _, path in names):
        return _predict_volumes(args, names)
    if names is not None:
        _check_planned(args, names, [os.path.join(args.output, f"{name}_{kind}.png")
                                     for name, _ in names for kind in ("mask", "overlay")])
    model = _checked_model(args)
    if args.patch is not None:
        inference.check_patch_size(model, args.patch, rank=2)
    channels = inference.input_channels(model)
    if names is not None:
        _check_images(names, channels, args.channels)
    n_label = inference.output_channels(model)
    members = _ensemble_runs(args)
    model = (_ensemble(members, inference.fully_convolutional) if members
             else inference.fully_convolutional(model))
    # One predict writes into a folder at a time, so no image's mask and overlay come
    # from two runs; a second is refused at once.
    with runs.folder_lock(args.output, what="predict output folder", keep=False):
        if names is not None:  # again, now that no other predict writes here
            _check_planned(args, names, [os.path.join(args.output, f"{name}_{kind}.png")
                                         for name, _ in names for kind in ("mask", "overlay")])
        _predict_images(args, names, model, channels, n_label)
    return 0


def _run_plan(run):
    """The plan.json a run trained on a Decathlon / nnU-Net folder recorded, else None."""
    from attunet_keras.data import planning

    if run is None:
        return None
    path = os.path.join(run, planning.PLAN_FILE)
    return planning.read_plan(path) if os.path.isfile(path) else None


def _check_ensemble_plans(plan, members):
    """An ensemble's runs must have prepared their cases alike."""
    from attunet_keras.data import planning

    for member in members or ():
        other = _run_plan(member)
        if other is None or planning.plan_key(other) != planning.plan_key(plan):
            raise ValueError(f"{member} was not planned as the first run (spacing, "
                             "interpolation or normalisation differ, or it has no "
                             "plan.json); an ensemble's runs must prepare cases alike.")


def _predict_medical(args, plan):
    """predict for a run planned on a Decathlon / nnU-Net folder: OUTPUT/CASE.nii.gz
    (nnU-Net's names: the case without its channel suffix) on each case's own grid."""
    from attunet_keras import inference

    cases = inference.medical_cases(args.input, plan)
    ending = ".png" if plan["dims"] == 2 else ".nii.gz"
    planned = [os.path.join(args.output, f"{case.name}{ending}") for case in cases]
    names = [(case.name, case.images[0]) for case in cases]
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise FileExistsError(f"--output {args.output} exists and is not a folder.")
    inputs = {os.path.dirname(os.path.realpath(path)) for case in cases
              for path in case.images}
    if os.path.realpath(args.output) in inputs:
        raise ValueError(f"--output {args.output} is the input folder; write the masks "
                         "elsewhere.")
    _check_planned(args, names, planned)
    decisions = _postprocessing(args)
    members = _ensemble_runs(args)
    model = _ensemble(members) if members else _load_or_build(args)
    first = model.model if isinstance(model, inference.Ensemble) else model
    patch = args.patch or inference.own_size(first) or tuple(plan["patch"])
    patch = inference.check_patch_size(first, patch, rank=plan["dims"])
    with runs.folder_lock(args.output, what="predict output folder", keep=False):
        _check_planned(args, names, planned)
        for case, output in zip(cases, planned):
            labels = inference.predict_medical_case(
                model, case, plan, output, patch, overlap=args.overlap, tta=args.tta,
                threshold=args.threshold, postprocessing=decisions)
            print(f"Wrote {output} ({'x'.join(map(str, labels.shape))} labels on the grid "
                  f"of {case.images[0]}; {len(case.images)} file(s) in)")
    return 0


def _predict_images(args, names, model, channels, n_label):
    from attunet_keras import data
    from attunet_keras import inference
    from attunet_keras import visualize

    decisions = _postprocessing(args)

    for name, image, normalized, source in _inputs(args, names):
        image = inference.convert_channels(image, channels, args.channels, source)
        paths = [os.path.join(args.output, f"{name}_{kind}.png")
                 for kind in ("mask", "overlay")]
        if names is None and not args.overwrite:
            existing = [path for path in paths if os.path.lexists(path)]
            if existing:
                raise FileExistsError(f"{existing[0]} already exists; pass --overwrite.")
        def predict(member):
            return inference.predict_image(
                member, image, patch_size=args.patch, overlap=args.overlap, tta=args.tta,
                normalized=normalized)

        probabilities = (model.average(predict) if isinstance(model, inference.Ensemble)
                         else predict(model))
        labels = inference.labels_from_probabilities(probabilities, args.threshold)
        if decisions:
            labels = postprocess.apply(labels, decisions, n_label)
        shown = image if normalized else data.normalize(image)
        visualize.save_png(paths[0], visualize.mask_png(labels, n_label))
        visualize.save_png(paths[1], visualize.overlay(shown, labels))
        print(f"Wrote {paths[0]} and {paths[1]} ({labels.shape[0]}x{labels.shape[1]})")


def _ensemble_runs(args):
    """The run folders of predict's ensemble (several --run, or --cross-validation's
    folds), or None for one model."""
    from attunet_keras import cross_validation
    from attunet_keras import training

    if getattr(args, "cross_validation", None):
        folds = cross_validation.fold_runs(args.cross_validation)
        if len(folds) < 2:
            raise ValueError(f"--cross-validation {args.cross_validation} holds "
                             f"{len(folds)} finished fold run(s) (fold_0, fold_1, ...); an "
                             "ensemble needs two or more.")
        return [run for _, run in folds]
    runs_given = getattr(args, "ensemble", None)
    if runs_given and len(runs_given) > 1:
        for run in runs_given:
            training.read_config(run)  # a clear error for a folder that is not a run
        return list(runs_given)
    return None


def _ensemble(members, prepare=None):
    from attunet_keras import evaluation
    from attunet_keras import inference

    ensemble = inference.Ensemble(members, load=evaluation.load_run_model, prepare=prepare)
    kept = "kept in memory" if ensemble.kept is not None else "loaded one at a time"
    print(f"Ensemble of {len(members)} runs (probabilities averaged; models {kept}): "
          + ", ".join(members))
    return ensemble


def _postprocessing(args):
    """The post-processing of predict: the decisions of the cross-validation --run is a
    fold of (an ensemble's first run), with --postprocess auto (None when none)."""
    if args.postprocess != "auto" or not args.run:
        return None
    decisions, source = postprocess.decisions_for(args.run)
    if decisions:
        print(f"Post-processing from {source}: {postprocess.describe(decisions)}")
    return decisions


def _check_images(names, channels, conversion):
    """Reads every input image once and checks that the model can take it, so that a
    bad one is refused before any output is written (one image in memory at a time)."""
    from attunet_keras import data
    from attunet_keras import inference

    for _, path in names:
        inference.convert_channels(data.read_image(path), channels, conversion, path)


def _check_planned(args, names, planned):
    """Refuses outputs that exist (without --overwrite), are inputs, or are folders."""
    existing = [path for path in planned if os.path.lexists(path)]
    if existing and not args.overwrite:
        raise FileExistsError(
            f"{len(existing)} output(s) exist already, e.g. {existing[0]}; pass "
            "--overwrite to replace them (nothing was written)."
        )
    inputs = {os.path.realpath(path) for _, path in names}
    clashing = [path for path in planned if os.path.realpath(path) in inputs]
    if clashing:
        raise ValueError(f"{clashing[0]} is an input image; predict would write over "
                         "it. Choose another --output.")
    folders = [path for path in existing if os.path.isdir(path)]
    if folders:
        raise FileExistsError(f"{folders[0]} is a folder; predict only replaces files.")


def _predict_volumes(args, names):
    """predict on NIfTI volumes: DIR/NAME_mask.nii.gz with the input's affine and header."""
    from attunet_keras import data
    from attunet_keras import inference

    images = [path for _, path in names if not data.is_volume_file(path)]
    if images:
        raise ValueError(f"{images[0]} is a 2D image among NIfTI volumes; predict images "
                         "and volumes separately.")
    planned = [os.path.join(args.output, f"{name}_mask.nii.gz") for name, _ in names]
    _check_planned(args, names, planned)
    decisions = _postprocessing(args)
    model = _volume_model(args, names[0][1])
    patch = args.patch or inference.own_size(model) or inference.DEFAULT_VOLUME_PATCH
    patch = inference.check_patch_size(model, patch, rank=3)
    members = _ensemble_runs(args)
    if members:
        model = _ensemble(members)
    with runs.folder_lock(args.output, what="predict output folder", keep=False):
        _check_planned(args, names, planned)  # again, now that no other predict writes
        for (name, path), output in zip(names, planned):
            labels = inference.predict_nifti(model, path, output, patch,
                                             overlap=args.overlap, tta=args.tta,
                                             threshold=args.threshold,
                                             postprocessing=decisions)
            print(f"Wrote {output} ({'x'.join(map(str, labels.shape))} {labels.dtype} "
                  f"labels; the affine and header of {path}; patches "
                  f"{'x'.join(map(str, patch))})")
    return 0


def _attention(args):
    from attunet_keras import data
    from attunet_keras import inference
    from attunet_keras import visualize

    _check_output(args, (".png",))
    if args.input and os.path.isdir(args.input):
        raise ValueError(f"{args.input} is a folder; attention draws one IMAGE.")
    if args.input and data.is_volume_file(args.input):
        return _attention_volume(args)
    names = _input_names(args)
    model = _checked_model(args)
    if args.patch is not None:
        inference.check_patch_size(model, args.patch, rank=2)
    name, image, normalized, source = next(iter(_inputs(args, names)))
    image = inference.convert_channels(image, inference.input_channels(model),
                                       args.channels, source)
    if args.patch is not None and max(image.shape[:2]) > args.patch:
        probabilities, gate_maps = inference.attention_maps_sliding_window(
            model, image, args.patch, overlap=args.overlap, normalized=normalized)
    else:
        probabilities, gate_maps = inference.attention_maps(model, image,
                                                            normalized=normalized)
    shown = image if normalized else data.normalize(image)
    visualize.attention_figure(args.output, shown, probabilities, gate_maps,
                               title=f"Attention gates of {model.name} on {name}")
    print(f"Wrote {args.output}: {len(gate_maps)} gates "
          f"({', '.join(f'{g} {m.shape[0]}x{m.shape[1]}' for g, m in gate_maps.items())})")
    return 0


def _volume_model(args, volume_path):
    """The model of predict and attention on volumes: a 3D segmentation model."""
    from attunet_keras import inference

    model = _load_or_build(args)
    if not inference.is_volume_model(model):
        raise ValueError(
            f"{args.model or args.run}: a 2D model (input {tuple(model.inputs[0].shape)}); "
            f"{volume_path} is a volume, which needs an att_unet_3d model.")
    return model


def _attention_volume(args):
    """attention on a NIfTI volume: a figure of its middle slice and one NIfTI per gate."""
    from attunet_keras import visualize

    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"{args.input}: no such file.")
    model = _volume_model(args, args.input)
    written = visualize.attention_nifti(model, args.input, args.output)
    print(f"Wrote {args.output} (the middle slice) and {len(written)} gate map(s): "
          + ", ".join(written.values()))
    return 0


def _check_batch(model, seed):
    """A random batch of two images for the model's input.

    An unknown spatial size becomes the smallest multiple of 2**pooling levels that
    is at least 64.
    """
    import numpy as np

    from attunet_keras import inference

    multiple = inference.size_multiple(model)
    free_size = multiple * max(1, -(-64 // multiple))
    shape = [2] + [free_size if size is None else size for size in model.input.shape[1:]]
    return np.random.default_rng(seed).random(shape, dtype="float32")


def _check_data(args):
    from attunet_keras import data

    if not os.path.isdir(args.dataset):
        raise FileNotFoundError(f"{args.dataset} is not a folder.")
    if data.medical.layout(args.dataset):
        return _check_medical(args)
    if args.n_label is None:
        raise ValueError(f"{args.dataset} holds images/ and masks/; give --n-label (1 "
                         "for binary masks, else the number of classes).")
    checked, problems, notes = data.check_folder(args.dataset, args.n_label)
    if _print_problems(args.dataset, checked, problems, notes, "pair(s) read"):
        return 1
    print(f"{args.dataset}: {checked} pair(s) read, no problems (n_label={args.n_label}).")
    return 0


def _print_problems(dataset, checked, problems, notes, what):
    """Prints check-data's notes and problems; True when there is a problem."""
    for note in notes:
        print(f"note: {note}")
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in {dataset} ({checked} {what}).")
    return bool(problems)


def _check_medical(args):
    """check-data on a Decathlon / nnU-Net folder: every case read once."""
    from attunet_keras import data

    folder = data.medical.describe(args.dataset) if args.n_label is not None else None
    if folder is not None and folder.n_label != args.n_label:
        raise ValueError(f"--n-label {args.n_label} but {args.dataset}/dataset.json has "
                         f"labels {', '.join(folder.label_names)} (n_label "
                         f"{folder.n_label}); leave --n-label out for these folders.")
    checked, problems, notes = data.medical.problems(args.dataset)
    if _print_problems(args.dataset, checked, problems, notes, "case(s) listed"):
        return 1
    folder = data.medical.describe(args.dataset)
    print(f"{args.dataset}: {checked} case(s) read, no problems ({folder.layout} layout, "
          f"channels {', '.join(folder.channels)}, labels {', '.join(folder.label_names)}).")
    return 0


def _plan(args):
    """plan: reads a Decathlon / nnU-Net folder's headers and voxels once; writes and
    explains plan.json."""
    from attunet_keras.data import medical
    from attunet_keras.data import planning

    if not os.path.isdir(args.dataset) or medical.layout(args.dataset) is None:
        raise ValueError(f"{args.dataset} is not a Decathlon or nnU-Net v2 folder "
                         "(dataset.json beside imagesTr/ and labelsTr/).")
    output = args.output or os.path.join(args.dataset, planning.PLAN_FILE)
    if os.path.exists(output) and not args.overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite to plan again.")
    if args.memory_gb is not None and args.memory_gb <= 0:
        raise ValueError(f"--memory-gb {args.memory_gb} must be positive.")
    folder = medical.describe(args.dataset)
    checked, problems, _ = medical.problems(args.dataset)
    if problems:
        raise ValueError(f"{args.dataset}: {len(problems)} problem(s) (attunet-keras "
                         f"check-data {args.dataset} lists them all):\n" + problems[0])
    plan = planning.make_plan(args.dataset, spacing=args.spacing,
                              normalization=args.normalization, memory_gb=args.memory_gb,
                              batch_size=args.batch_size, depth=args.depth,
                              features=args.features)
    planning.write_plan(plan, output)
    for line in planning.describe_plan(plan):
        print(line)
    print(f"Wrote {output} ({folder.layout} layout, {checked} cases); train with "
          f"--plan {output}")
    return 0


def _convert(args):
    """convert: a PyTorch AttU_Net or MONAI AttentionUnet checkpoint to a .keras model,
    checked against a PyTorch forward pass of the same checkpoint when torch (and, for
    MONAI's, monai) is installed."""
    import numpy as np

    from attunet_keras import convert
    from attunet_keras import models

    _check_output(args, (".keras",))
    arrays = convert.read_state_dict(args.from_torch)
    monai = args.variant == "monai"
    if monai and (args.upsampling not in (None, "transpose") or args.second_sigmoid):
        raise ValueError("--variant monai has transposed up-convolutions and one sigmoid; "
                         "leave --upsampling and --second-sigmoid out.")
    found = (convert.monai_options(arrays) if monai
             else convert.attu_net_options(arrays))
    if monai:
        found["upsampling"] = "transpose"
    options = {name: getattr(args, name) if getattr(args, name) is not None else value
               for name, value in found.items() if name != "rank"}
    rank = found["rank"]
    activation = args.output_activation or ("sigmoid" if options["n_label"] == 1
                                            else "softmax")
    builder = models.att_unet if rank == 2 else models.att_unet_3d
    model = builder(*(None,) * rank, options["n_label"], depth=options["depth"],
                    features=options["features"], data_format=args.data_format,
                    in_channels=options["in_channels"],
                    output_activation=None if activation == "none" else activation,
                    dropout=0, batch_norm=True, upsampling=options["upsampling"],
                    variant=args.variant, second_sigmoid=args.second_sigmoid,
                    name=args.variant if rank == 2 else f"{args.variant}_3d")
    convert.load_torch_state_dict(model, arrays)
    network = "MONAI AttentionUnet" if monai else "AttU_Net"
    print(f"{args.from_torch}: {network} {rank}D, depth {options['depth']}, features "
          f"{options['features']}, {options['in_channels']} input channel(s), "
          f"{options['n_label']} output channel(s), upsampling {options['upsampling']}; "
          f"{model.count_params():,} parameters in Keras ({args.data_format}, output "
          f"{activation})")
    try:
        import torch
    except ImportError:
        torch = None
    net = None
    if torch is not None and monai:
        try:
            from monai.networks.nets import AttentionUnet
        except ImportError:
            torch = None
        else:
            net = AttentionUnet(
                spatial_dims=rank, in_channels=options["in_channels"],
                out_channels=options["n_label"],
                channels=[options["features"] * 2**level
                          for level in range(options["depth"] + 1)],
                strides=[2] * options["depth"])
    elif torch is not None:
        net = convert.torch_attu_net(rank, options["depth"], options["features"],
                                     options["in_channels"], options["n_label"],
                                     options["upsampling"], args.second_sigmoid)
    if torch is not None:
        net.load_state_dict({name: torch.from_numpy(array) for name, array in arrays.items()})
        images = np.random.default_rng(0).normal(
            size=(2, options["in_channels"]) + (2 ** options["depth"] * 2,) * rank)
        images = images.astype("float32")
        with torch.no_grad():
            logits = net.eval()(torch.from_numpy(images))
            expected = {"sigmoid": torch.sigmoid(logits),
                        "softmax": torch.softmax(logits, dim=1)}.get(activation, logits)
        inputs = images if args.data_format == "channels_first" else np.moveaxis(images, 1, -1)
        got = np.asarray(model.predict(inputs, verbose=0))
        if args.data_format == "channels_last":
            got = np.moveaxis(got, -1, 1)
        difference = float(np.abs(got - expected.numpy()).max())
        if not difference <= 1e-4:
            raise RuntimeError(f"the converted model differs from PyTorch's forward pass "
                               f"by up to {difference:.3g} (more than 1e-4); nothing written.")
        print(f"Outputs checked against PyTorch on a random batch: largest difference "
              f"{difference:.2g}")
    else:
        needed = "MONAI" if monai else "PyTorch"
        print(f"{needed} is not installed: outputs not checked against its forward pass")
    with runs.atomic_path(args.output, suffix=".keras") as temporary:
        model.save(temporary)
    print(f"Wrote {args.output}")
    return 0


_COMMANDS = {
    "plan": _plan,
    "summary": _summary, "plot": _plot, "export": _export, "train": _train,
    "evaluate": _evaluate, "predict": _predict, "attention": _attention,
    "check-data": _check_data, "convert": _convert, "cross-validate": _cross_validate,
    "report": _report,
}

