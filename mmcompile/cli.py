"""The ``mmcompile`` command line.

Exit codes (documented in ``mmcompile --help``):
    0  success
    1  the input was at fault: bad model file, unknown pass, bad shape or modality, ...
       (one line on stderr, starting with "mmcompile: error:")
    2  bad command-line usage (argparse)
    3  internal error: a bug in mmcompile (traceback with --debug)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from mmcompile.errors import InputError, MMCompileError, ModelLoadError

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

_EPILOG = """exit codes:
  0  success
  1  the input was at fault (bad model, unknown pass, wrong shape/modality); one-line message
  2  bad command-line usage
  3  internal error in mmcompile (rerun with --debug for the traceback)
"""


def _parse_shapes(items: Sequence[str]) -> dict[str, list[int]]:
    shapes = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            sep = ""
        if not sep or not name:
            raise ModelLoadError(f"expected NAME=D0,D1,... for --input-shape, got '{item}'")
    return shapes


def _pairs(items: Sequence[str], flag: str) -> dict[str, str]:
    """``KEY=VALUE`` items of a repeatable flag -> dict."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise InputError(f"expected KEY=VALUE for {flag}, got '{item}'")
        out[key.strip()] = value.strip()
    return out


def _target_config(args: argparse.Namespace) -> dict[str, str]:
    """--target-option pairs, and --accel-spec as the target's ``spec`` option."""
    config = _pairs(args.target_option, "--target-option")
    if getattr(args, "accel_spec", None):
        config["spec"] = args.accel_spec
    return config


def _fallback(text: str) -> str | None:
    return None if text.strip().lower() == "none" else text


def _load(args: argparse.Namespace):
    from mmcompile.frontend import load_graph
    from mmcompile.modality import parse_modality_args
    modalities = parse_modality_args(args.modality) if args.modality else None
    return load_graph(args.model, modalities, input_shapes=_parse_shapes(args.input_shape))


def _progress(enabled: bool):
    from mmcompile.transform import CallbackInstrument
    count = [0]

    def show(event: str, name: str, result) -> None:
        if event == "before":
            count[0] += 1
            print(f"\r[{count[0]:3d}] {name:<40}", end="", file=sys.stderr, flush=True)

    return [CallbackInstrument(show)] if enabled else []


def cmd_optimize(args: argparse.Namespace) -> int:
    from mmcompile.optimize import optimize
    from mmcompile.transform import IRDumpInstrument, PassContext
    graph = _load(args)
    instruments = _progress(sys.stderr.isatty() and not args.json)
    if args.dump_ir:
        instruments.append(IRDumpInstrument(args.dump_ir))
    ctx = PassContext(opt_level=args.opt_level, disabled_passes=frozenset(args.disable),
                      instruments=instruments, verify_each=args.verify_each)
    result = optimize(graph, args.passes, ctx=ctx, inplace=True)
    if instruments and not args.json:
        print("\r" + " " * 48 + "\r", end="", file=sys.stderr)
    result.graph.save(args.output)
    if args.json:
        print(json.dumps({"output": str(args.output), **result.to_dict()}, indent=2))
        return EXIT_OK
    if args.report:
        print(result.report())
        print()
    print(f"wrote {args.output}: {result.nodes_before} -> {result.nodes_after} nodes")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from mmcompile.analysis import describe
    from mmcompile.report import format_table
    if Path(args.model).is_dir():
        return _inspect_artifact(args)
    from mmcompile.optimize import optimize
    graph = _load(args)
    optimize(graph, "annotate-branches", inplace=True)
    info = describe(graph)
    if args.draw:
        from mmcompile.analysis import draw_branches
        draw_branches(graph, args.draw)
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    print(f"{info['name']}: opset {info['opset']}, {info['nodes']} nodes, "
          f"{info['parameters']:,} parameters")
    print("\ninputs:")
    print(format_table(["name", "shape", "dtype", "modality", "decided by"],
                       [(i["name"], i["shape"], i["dtype"], i["modality"], i["reason"])
                        for i in info["inputs"]]))
    print("\noutputs:")
    print(format_table(["name", "shape", "dtype"],
                       [(o["name"], o["shape"], o["dtype"]) for o in info["outputs"]]))
    print("\nbranches (nodes grouped by the modalities they depend on):")
    print(format_table(["branch", "nodes", "parameters", "MFLOPs", "top ops"],
                       [(name, b["nodes"], f"{b['parameters']:,}", f"{b['flops'] / 1e6:.1f}",
                         ", ".join(f"{op}x{n}" for op, n in list(b["ops"].items())[:5]))
                        for name, b in info["branches"].items()]))
    if info["stage_dag"]:
        print("\nstages (each runs as one compiled unit; arrows are data dependencies):")
        for stage, deps in info["stage_dag"].items():
            print(f"  {' + '.join(deps) + ' -> ' if deps else ''}{stage}")
    if args.draw:
        print(f"\ndrew the graph coloured by branch to {args.draw}")
    print("\nops: " + ", ".join(f"{op}x{n}" for op, n in info["ops"].items()))
    return EXIT_OK


def _inspect_artifact(args: argparse.Namespace) -> int:
    from mmcompile.artifact import read_manifest
    from mmcompile.report import format_table
    manifest = read_manifest(args.model)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return EXIT_OK
    meta = manifest.get("metadata", {})
    versions = ", ".join(f"{k} {v}" for k, v in manifest["versions"].items())
    print(f"{args.model}: compiled model for target '{manifest['target']}' ({versions}), "
          f"created {manifest.get('created', '?')}")
    if meta.get("source"):
        print(f"source: {meta['source']}, {meta.get('nodes_before')} -> {meta.get('nodes_after')} "
              f"nodes after passes")
    print("\ninputs:")
    print(format_table(["name", "shape", "dtype", "modality", "index bound"],
                       [(i["name"], i["shape"], i["dtype"], i.get("modality"),
                         i.get("index_bound") or "-") for i in manifest["signature"]["inputs"]]))
    print("\noutputs:")
    print(format_table(["name", "shape", "dtype"], [(o["name"], o["shape"], o["dtype"])
                                                    for o in manifest["signature"]["outputs"]]))
    stages = manifest["stages"]
    costs = [st.get("info", {}).get("cost_ms") for st in stages]
    total = sum(costs) if None not in costs else 0.0
    if manifest.get("profiles"):  # several builds: name each stage's build, shares per build
        from mmcompile.profiles import build_label
        labels = [build_label(p["sizes"]) for p in manifest["profiles"]]
        stages = [{**st, "name": f"{st['name']} [{labels[st['profile']]}]"} for st in stages]
        total = 0.0
    print("\nstages (placement: where each runs and why):")
    print(format_table(
        ["stage", "target", "nodes", "time", "files", "compile s", "why", "detail"],
        [(st["name"], st.get("info", {}).get("spec", st["target"]),
          len(st.get("info", {}).get("nodes", [])) or "-",
          "100%" if len(stages) == 1 else f"{100 * c / total:.0f}%" if total else "-",
          ", ".join(st["files"].values()), f"{st.get('compile_seconds', 0):.2f}",
          st.get("info", {}).get("placement", {}).get("reason", ""),
          st.get("info", {}).get("detail", "")) for st, c in zip(stages, costs)]))
    if manifest.get("profiles"):
        _dynamic_builds(manifest)
    schedule = manifest.get("schedule", {})
    if schedule.get("kind") == "parallel":
        lanes = ", ".join(f"{d} lane: {' + '.join(w)} ({t} thread{'s' if t > 1 else ''})"
                          for w, t, d in zip(schedule["workers"], schedule["threads"],
                                             schedule.get("devices") or
                                             ["cpu"] * len(schedule["workers"])))
        print(f"\nschedule: parallel ({lanes}; the rest on the caller)")
    else:
        print("\nschedule: sequential")
    _modelled_layers(stages)
    fell_back = {n: r for st in stages
                 for n, r in st.get("info", {}).get("placement", {}).get("fell_back", {}).items()}
    if fell_back:
        print(f"\nnodes not on the requested target ({len(fell_back)}: on its host or the "
              f"fallback), with the reason it gave:")
        print(format_table(["node", "reason"], list(fell_back.items())))
    if meta.get("quantization"):
        from mmcompile.report import quantization_lines
        print("\n" + "\n".join(quantization_lines(meta["quantization"])))
    if meta.get("verification"):
        print(f"\nverification at compile time: {meta['verification']}")
    return EXIT_OK


def _dynamic_builds(manifest: dict) -> None:
    """The declared dim ranges of an artifact with several builds, and its builds."""
    from mmcompile.profiles import DynamicDim, build_label
    from mmcompile.report import format_table
    print("\ndynamic dims (one artifact, a build per size listed; calls dispatched by shape):")
    for dim in manifest.get("dynamic", []):
        print(f"  {DynamicDim.from_dict(dim).describe()}")
    print(format_table(["build", "stages", "ms/call", "schedule"], [
        (build_label(p["sizes"]),
         sum(1 for st in manifest["stages"] if st.get("profile") == i),
         f"{p['cost_ms']:.3f}" if p.get("cost_ms") is not None else "-",
         p.get("schedule", {}).get("kind", "sequential"))
        for i, p in enumerate(manifest["profiles"])]))


def _modelled_layers(stages: list[dict]) -> None:
    """The layers of stages whose target models its own time (the accelerator): cycles,
    utilization, DRAM bytes and energy per layer, and each stage's total."""
    from mmcompile.report import format_table
    modelled = [st for st in stages if st.get("info", {}).get("modelled_ms") is not None]
    if not modelled:
        return
    rows = []
    for st in modelled:
        info = st["info"]
        for layer in info.get("layers", []):
            rows.append((st["name"], layer["name"], layer["op"],
                         layer.get("shape") or "GEMM " + "x".join(map(str, layer["gemm"])),
                         "x".join(map(str, layer["tile"])),
                         f"{layer['cycles']:,}", f"{layer['seconds'] * 1e6:.1f}",
                         f"{100 * layer['utilization']:.1f}%", f"{layer['dram_bytes']:,}",
                         f"{layer['energy_uj']:.2f}"))
        rows.append((st["name"], "(stage)", "", "", "", f"{info.get('cycles', 0):,}",
                     f"{info['modelled_ms'] * 1e3:.1f}",
                     f"{100 * info.get('utilization', 0):.1f}%",
                     f"{sum(x['dram_bytes'] for x in info.get('layers', [])):,}",
                     f"{info.get('energy_uj', 0):.2f}"))
    total_ms = sum(st["info"]["modelled_ms"] for st in modelled)
    total_uj = sum(st["info"].get("energy_uj", 0) for st in modelled)
    print(f"\nmodelled layers (the accelerator's cycle model; {total_ms * 1e3:.1f} us and "
          f"{total_uj:.2f} uJ in all):")
    print(format_table(["stage", "layer", "op", "shape", "tile", "cycles", "us",
                        "utilization", "DRAM bytes", "energy uJ"], rows))


def _read_npz(path: str) -> dict:
    import numpy as np
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read inputs from {path}: {exc}") from exc


def _write_npz(path: str, arrays: dict) -> None:
    import numpy as np
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, target)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(OSError):  # nothing to remove in a folder that is not there
            tmp.unlink(missing_ok=True)


def _progress_lines(args: argparse.Namespace, started: float):
    """Timestamped progress on stderr, when it is a terminal (and not --json) or --verbose."""
    show = (sys.stderr.isatty() and not args.json) or args.verbose

    def progress(message: str) -> None:
        if show:
            print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr)
    return progress


def cmd_compile(args: argparse.Namespace) -> int:
    from mmcompile.compiler import compile as compile_model
    from mmcompile.modality import parse_modality_args
    started = time.perf_counter()
    progress = _progress_lines(args, started)

    example = _read_npz(args.inputs) if args.inputs else None
    dynamic = None
    if args.dynamic:
        from mmcompile.dynamic import parse_dynamic_flags
        dynamic = parse_dynamic_flags(args.dynamic)  # bad syntax fails before any work
    # calibration samples are for quantizing: --calibration alone means int8
    quantize = args.quantize or ("int8" if args.calibration else None)
    compiled = compile_model(
        args.model, example, target=args.target,
        modalities=parse_modality_args(args.modality) if args.modality else None,
        passes=args.passes, verify=not args.no_verify, tolerance=args.tolerance,
        input_shapes=_parse_shapes(args.input_shape), opt_level=args.opt_level,
        disabled_passes=args.disable, threads=args.threads,
        target_config=_target_config(args),
        fallback=_fallback(args.fallback), placement=_pairs(args.placement, "--placement"),
        schedule=args.schedule, tuning_db=args.tuning_db, progress=progress,
        quantize=quantize, calibration=args.calibration,
        quantize_options=_quantize_options(args) if quantize else None,
        dynamic=dynamic)
    compiled.save(args.output)
    if args.json:
        print(json.dumps({"output": str(args.output), "target": compiled.target,
                          "seconds": round(time.perf_counter() - started, 3),
                          "stages": [{"name": st.name, "compile_seconds": round(st.compile_seconds, 3)}
                                     for st in compiled.stages],
                          **{k: v for k, v in compiled.metadata.items() if k != "versions"}},
                         indent=2))
        return EXIT_OK
    print(compiled.report())
    print(f"wrote {args.output} in {time.perf_counter() - started:.1f}s")
    return EXIT_OK


def cmd_quantize(args: argparse.Namespace) -> int:
    from mmcompile.modality import parse_modality_args
    from mmcompile.quantize import quantize
    started = time.perf_counter()
    progress = _progress_lines(args, started)

    model = _load(args)
    quantized = quantize(model, args.calibration, progress=progress,
                         modalities=parse_modality_args(args.modality) if args.modality else None,
                         passes=args.passes, **_quantize_options(args))
    quantized.save(args.output)
    if args.json:
        print(json.dumps({"output": str(args.output), **quantized.info()}, indent=2))
        return EXIT_OK
    if args.report:
        print(quantized.report())
    print(f"wrote {args.output}: {len(quantized.layers)} int8 layer(s), "
          f"{len(quantized.float_layers)} kept in float, drop {quantized.drop:.4f} "
          f"({time.perf_counter() - started:.1f}s)")
    return EXIT_OK


def cmd_tune(args: argparse.Namespace) -> int:
    from mmcompile.modality import parse_modality_args
    from mmcompile.tune import parse_duration, tune
    report = tune(
        args.model, db=args.db, target=args.target, trials=args.trials,
        time_budget=parse_duration(args.time_budget) if args.time_budget else None,
        resume=args.resume, rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key,
        modalities=parse_modality_args(args.modality) if args.modality else None,
        input_shapes=_parse_shapes(args.input_shape), passes=args.passes,
        opt_level=args.opt_level, disabled_passes=args.disable, schedule=args.schedule,
        threads=args.threads, target_config=_pairs(args.target_option, "--target-option"),
        fallback=_fallback(args.fallback),
        trials_per_iter=args.trials_per_iter, min_share=args.min_share,
        cost_model=args.cost_model, measure_model=not args.no_measure, progress=sys.stderr)
    interrupted = report.job.get("status") == "interrupted"
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report)
        if interrupted:
            print(f"interrupted: continue with 'mmcompile tune {args.model} --db {args.db} "
                  f"--resume'")
    return 130 if interrupted else EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    # Running never compiles: TVM's runtime-only library (its own switch) keeps this process
    # as small as a deployed one (no tvm.relax, ~100 MB less).
    if "tvm" not in sys.modules:
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    import numpy as np

    from mmcompile.loading import load
    model = load(args.model, threads=args.threads, schedule=args.schedule)
    if args.inputs and args.random:
        raise InputError("give either --inputs or --random, not both")
    if not args.inputs and not args.random:
        raise InputError("no inputs: give --inputs FILE.npz (one array per input name: "
                         f"{model.input_names}) or --random")
    feeds = _read_npz(args.inputs) if args.inputs else model.signature.random_inputs(args.seed)
    times = []
    for _ in range(max(1, args.repeat)):
        start = time.perf_counter()
        outputs = model.run(feeds)
        times.append(time.perf_counter() - start)
    outputs = {k: np.asarray(v) for k, v in outputs.items()}
    if args.output:
        _write_npz(args.output, outputs)
    # the accelerator's stages in their modelled time, on their own lane
    modelled = None
    if any(s.info.get("modelled_ms") is not None for s in model.stages):
        from mmcompile.planning.timeline import modelled_timeline
        modelled = modelled_timeline(model, feeds)
    if args.timeline:
        from mmcompile.report import draw_timeline
        title = f"{Path(args.model).name}: {model.schedule.kind} schedule"
        if modelled:
            draw_timeline(modelled, args.timeline,
                          f"{title}, modelled clock (accelerator: cycle model; host: measured)")
        else:
            draw_timeline(model.profile(feeds), args.timeline, title)
    summary = {"schedule": model.schedule.kind,
               "outputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype),
                               "min": float(v.min()) if v.size else None,
                               "max": float(v.max()) if v.size else None}
                           for k, v in outputs.items()},
               "runs": len(times), "median_ms": round(float(np.median(times)) * 1e3, 3)}
    if modelled:
        summary["modelled_ms"] = round(max(e["end_ms"] for e in modelled), 4)
        summary["modelled_accel_ms"] = round(sum(e["end_ms"] - e["start_ms"]
                                                 for e in modelled if e["modelled"]), 4)
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    from mmcompile.report import format_table
    print(format_table(["output", "shape", "dtype", "min", "max"],
                       [(k, v["shape"], v["dtype"], f"{v['min']:.4g}", f"{v['max']:.4g}")
                        for k, v in summary["outputs"].items()]))
    print(f"median latency {summary['median_ms']} ms over {len(times)} run(s)"
          + (f"; wrote {args.output}" if args.output else ""))
    if modelled:
        print(f"modelled latency {summary['modelled_ms']} ms: the accelerator's stages at their "
              f"modelled time ({summary['modelled_accel_ms']} ms), the host's as measured "
              f"(the simulation's own time is not counted)")
    return EXIT_OK


def cmd_explore(args: argparse.Namespace) -> int:
    from mmcompile.report import format_table
    from mmcompile.target import TargetError, resolve_target
    started = time.perf_counter()
    target, options = resolve_target(args.target, _target_config(args))
    if not hasattr(target, "explore"):
        raise TargetError(f"target '{target.name}' has no description to explore; "
                          f"explore --target accel{{preset=...}}")
    graph = _load(args)
    if not args.calibration and not any(n.op == "QuantizeLinear" for n in graph.gs.nodes):
        raise InputError(f"{args.model} is not quantized: give --calibration FILE.npz "
                         f"(samples to quantize it with) or a QDQ model")
    if args.calibration:
        from mmcompile.quantize import quantize
        graph = quantize(graph, args.calibration, progress=_progress_lines(args, started),
                         **_quantize_options(args)).graph
    rows = target.explore(graph, options, args.sweep, plot=args.plot,
                          progress=_progress_lines(args, started))
    if args.json:
        print(json.dumps({"model": str(args.model), "target": args.target, "sweep": args.sweep,
                          "points": rows}, indent=2))
        return EXIT_OK
    valid = [r for r in rows if not r["error"]]
    print(format_table(
        ["point", "latency us", "energy uJ", "utilization", "area proxy", "layers", "host",
         "pareto"],
        [(",".join(f"{k}={v}" for k, v in r["overrides"].items()),
          *((f"{r['latency_ms'] * 1e3:.1f}", f"{r['energy_uj']:.2f}",
             f"{100 * r['utilization']:.1f}%", f"{r['area_proxy']:g}", r["layers"],
             r["host_layers"], "*" if r["pareto"] else "") if not r["error"] else
            (f"invalid: {r['error']}", "", "", "", "", "", "")))
         for r in rows]))
    print(f"{len(valid)} point(s) modelled, {len(rows) - len(valid)} invalid, "
          f"{sum(r['pareto'] for r in valid)} on the Pareto front (latency, energy, area proxy "
          f"= PEs + SRAM KiB) in {time.perf_counter() - started:.1f}s"
          + (f"; plot: {args.plot}" if args.plot else ""))
    return EXIT_OK


def cmd_runtime_wheels(args: argparse.Namespace) -> int:
    from mmcompile.packaging import build_runtime_wheels
    for wheel in build_runtime_wheels(args.output):
        print(f"wrote {wheel} ({wheel.stat().st_size / 2**20:.1f} MiB)")
    print(f"install on the deployment machine: pip install --find-links {args.output} "
          f"mmcompile-runtime  (add [onnxruntime] for artifacts with onnxruntime stages)")
    return EXIT_OK


def cmd_targets(args: argparse.Namespace) -> int:
    from mmcompile.report import format_table
    from mmcompile.target import registered_targets
    targets = registered_targets()
    if args.json:
        def catalog(cls) -> dict:  # the named configurations a target ships, if any
            if not hasattr(cls, "catalog"):
                return {}
            _, headers, rows = cls.catalog()
            return {"catalog": [dict(zip(headers, map(str, row))) for row in rows]}
        print(json.dumps({name: {"description": cls.description, "device": cls.device,
                                 "pipeline": cls.pipeline,
                                 "options": [{"name": o.name, "type": o.type.__name__,
                                              "default": o.default, "help": o.help}
                                             for o in cls.options], **catalog(cls)}
                          for name, cls in targets.items()}, indent=2))
        return EXIT_OK
    print(format_table(["target", "device", "pipeline", "description"],
                       [(name, cls.device, cls.pipeline or "-", cls.description)
                        for name, cls in targets.items()]))
    print("\noptions (--target 'NAME{KEY=VALUE,...}' or --target-option KEY=VALUE):")
    rows = [(name, o.name, o.type.__name__, "-" if o.default is None else o.default, o.help)
            for name, cls in targets.items() for o in cls.options]
    print(format_table(["target", "option", "type", "default", "help"], rows))
    for cls in targets.values():  # targets that ship named configurations list them
        if hasattr(cls, "catalog"):
            title, headers, rows = cls.catalog()
            print(f"\n{title}:")
            print(format_table(headers, rows))
    return EXIT_OK


def cmd_passes(args: argparse.Namespace) -> int:
    from mmcompile.report import format_table
    from mmcompile.transform import NAMED_PIPELINES, registered_passes
    rows = [(name, cls.opt_level, ",".join(cls.requires) or "-",
             ",".join(f"{k}={v}" for k, v in cls.options.items()) or "-", cls.description)
            for name, cls in registered_passes().items()]
    if args.json:
        print(json.dumps({"passes": [dict(zip(["name", "opt_level", "requires", "options",
                                                "description"], r)) for r in rows],
                          "pipelines": NAMED_PIPELINES}, indent=2))
        return EXIT_OK
    print(format_table(["pass", "opt", "requires", "options", "description"], rows))
    print()
    for name, text in NAMED_PIPELINES.items():
        print(f"pipeline '{name}': {text or '(no passes)'}")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from mmcompile.bench.command import run
    return run(args)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model file: .onnx (external data beside it is loaded) or .pt2 "
                                 "(saved by torch.export.save)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...",
                   help="fix an input's shape (repeatable); needed to fold shape arithmetic of "
                        "models exported with symbolic dims")
    p.add_argument("--modality", action="append", default=[], metavar="NAME=MODALITY",
                   help="tag an input with a modality (image, text, audio, video, tabular, "
                        "other); repeatable; inputs not named are inferred from name and shape")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="cpu", metavar="TARGET",
                   help="target, NAME or NAME{KEY=VALUE,...}, e.g. 'cpu{mcpu=znver4}'; "
                        "'mmcompile targets' lists them and their options "
                        "(default: %(default)s)")
    p.add_argument("--target-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of --target, e.g. winograd=false (repeatable)")
    p.add_argument("--accel-spec", metavar="FILE.toml",
                   help="an accelerator description for --target accel (its 'spec' option); "
                        "'mmcompile targets' lists the presets and their fields")
    p.add_argument("--fallback", default="onnxruntime", metavar="TARGET|none",
                   help="target for the nodes --target cannot run; 'none' refuses such a "
                        "model (default: %(default)s)")


def _add_quantize_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--calibration", metavar="FILE.npz", required=required,
                   help="calibration samples: one array per input name, samples stacked on "
                        "the first axis (a modality may have fewer)")
    p.add_argument("--calibration-method", default="minmax",
                   choices=["minmax", "percentile", "entropy"],
                   help="how activation ranges are set (default: %(default)s)")
    p.add_argument("--activations", default="uint8", choices=["uint8", "int8"],
                   help="activation type: uint8 asymmetric or int8 symmetric "
                        "(default: %(default)s)")
    p.add_argument("--max-drop", type=float, default=0.01, metavar="DROP",
                   help="accuracy budget on held-back samples: 1 - (cosine or top-1 "
                        "agreement) of the worst output; the most sensitive layers stay "
                        "float until it holds (default: %(default)s)")
    p.add_argument("--keep-float", action="append", default=[], metavar="NODE|OP",
                   help="keep this node, or every node of this op type, in float (repeatable)")
    p.add_argument("--metric", action="append", default=[], metavar="OUTPUT=cosine|top1",
                   help="judge this output by top-1 agreement (with cosine) or by cosine "
                        "(default: top-1 for class scores written by a linear layer or "
                        "softmax, cosine for the rest)")


def _quantize_options(args: argparse.Namespace) -> dict:
    return {"method": args.calibration_method, "activations": args.activations,
            "max_drop": args.max_drop, "keep_float": args.keep_float,
            "metrics": _pairs(args.metric, "--metric")}


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--passes", default="default", metavar="PIPELINE",
                   help="pipeline: a named pipeline ('default', 'none') or comma-separated pass "
                        "names with options, e.g. 'fold-constants{size_threshold=1024},"
                        "fixpoint(eliminate-identity,eliminate-dead-code)'; see 'mmcompile "
                        "passes' (default: %(default)s)")
    p.add_argument("-O", "--opt-level", type=int, default=2, choices=[0, 1, 2],
                   help="skip passes above this level (default: %(default)s)")
    p.add_argument("--disable", action="append", default=[], metavar="PASS",
                   help="skip this pass (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmcompile", description="Compile multimodal neural networks ahead of deployment.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="print full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("optimize", help="run graph-level passes and write optimized ONNX",
                       description="Run a pipeline of graph passes on a model and write the "
                                   "result as ONNX (no backend needed). The output is written "
                                   "atomically and only if it passes onnx.checker.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    p.add_argument("-o", "--output", required=True, help="where to write the optimized .onnx")
    _add_pipeline_args(p)
    p.add_argument("--report", action="store_true",
                   help="print per-pass counters and op counts before/after, as tables")
    p.add_argument("--dump-ir", metavar="DIR", help="save the graph after each pass that "
                                                    "changed it, as DIR/NNN-<pass>.onnx")
    p.add_argument("--verify-each", action="store_true",
                   help="verify the graph after every pass (slower; for debugging passes)")
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("inspect", help="show inputs, modality tags, branches and ops",
                       description="Describe a model: inputs with their modality tag and how it "
                                   "was decided, outputs, nodes per modality branch, op counts. "
                                   "Given a .mmc artifact: its manifest (target, versions, "
                                   "signature, stages).",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    p.add_argument("--draw", metavar="FILE.png|FILE.svg",
                   help="draw the graph coloured by modality branch")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("compile", help="compile a model to a deployable artifact (.mmc)",
                       description="Optimize a model, lower it for a target and write an "
                                   "artifact folder that 'mmcompile run' and mmcompile.load() "
                                   "use without recompiling. By default the compiled model is "
                                   "verified against onnxruntime on random (or --inputs) data.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    p.add_argument("-o", "--output", required=True, help="artifact folder to write (e.g. "
                                                         "model.mmc); replaced atomically")
    _add_target_args(p)
    p.add_argument("--placement", action="append", default=[], metavar="WHERE=TARGET",
                   help="run a modality branch (image, text, image.1, fusion) or a node (by "
                        "name) on another target, e.g. text=cpu or lstm_0=onnxruntime "
                        "(repeatable; a node wins over its branch)")
    _add_pipeline_args(p)
    p.add_argument("--inputs", metavar="FILE.npz", help="example inputs (one array per input "
                                                        "name) used for verification")
    p.add_argument("--dynamic", action="append", default=[], metavar="DIM=LOW:HIGH",
                   help="serve a range of a named symbolic dim with one artifact instead of "
                        "fixing it to the example's size, e.g. batch=1:32; sizes between the "
                        "ends get builds of their own (batch=1:8:32); repeatable or "
                        "comma-separated (batch=1:32,sequence=1:512)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the comparison with onnxruntime")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="verification tolerance relative to max(1, max|ref|) "
                        "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="threads the compiled code uses (default: all available cores)")
    p.add_argument("--schedule", default="auto", choices=["auto", "sequential", "parallel"],
                   help="run modality branches side by side ('parallel'), one after another "
                        "('sequential'), or measure both and keep the faster ('auto', default)")
    p.add_argument("--tuning-db", metavar="DIR",
                   help="apply the schedules 'mmcompile tune' put in DIR (same target; the "
                        "artifact records the database's SHA-256)")
    p.add_argument("--quantize", choices=["int8"],
                   help="quantize after the graph passes (post-training, calibrated on "
                        "--calibration), then compile the QDQ graph (the default when "
                        "--calibration is given)")
    _add_quantize_args(p, required=False)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print progress even when stderr is not a terminal")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("quantize", help="quantize a model to int8 QDQ ONNX (post-training)",
                       description="Calibrate a model on samples (each modality branch on its "
                                   "own inputs), quantize it to QDQ int8 ONNX with "
                                   "onnxruntime's quantizer (per-channel int8 weights, int32 "
                                   "bias), keep the most sensitive layers in float until the "
                                   "accuracy budget holds on held-back samples, and write the "
                                   "result (runs in onnxruntime and TensorRT as well).",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    p.add_argument("-o", "--output", required=True, help="where to write the QDQ .onnx")
    _add_quantize_args(p, required=True)
    _add_pipeline_args(p)
    p.add_argument("--report", action="store_true",
                   help="print accuracy per output, layers kept in float and why, sensitivity")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print progress even when stderr is not a terminal")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("tune", help="search faster kernel schedules into a tuning database",
                       description="Tune the model's kernels with TVM MetaSchedule, stage by "
                                   "stage as 'compile' builds them, committing every measured "
                                   "trial to the database folder as it comes: a killed job "
                                   "loses only the trials in flight and continues with "
                                   "--resume. Then: mmcompile compile MODEL -o OUT --tuning-db "
                                   "DIR (with the same pipeline options).",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    p.add_argument("--db", required=True, metavar="DIR",
                   help="tuning database folder (created if missing; models can share one)")
    _add_target_args(p)
    _add_pipeline_args(p)
    p.add_argument("--trials", type=int, help="trials for this job (default: 2000)")
    p.add_argument("--time-budget", metavar="DURATION",
                   help="stop the search after this long: 30m, 2h, 1h30m, 900 (seconds)")
    p.add_argument("--resume", action="store_true",
                   help="continue this model's last unfinished job in --db with what is left "
                        "of its trials and time")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT",
                   help="measure on the servers of this TVM RPC tracker instead of locally")
    p.add_argument("--rpc-key", metavar="KEY", help="the key the RPC servers registered with")
    p.add_argument("--schedule", default="auto", choices=["auto", "sequential", "parallel"],
                   help="as given to compile; 'sequential' compiles the model as one stage "
                        "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="threads the kernels use, as given to compile (default: all cores)")
    p.add_argument("--trials-per-iter", type=int, default=64,
                   help="candidates measured per batch (default: %(default)s)")
    p.add_argument("--min-share", type=float, default=0.005,
                   help="skip kernels below this share of the model's untuned kernel time "
                        "(default: %(default)s)")
    p.add_argument("--cost-model", default="xgb", choices=["xgb", "random"],
                   help="MetaSchedule's learned cost model, or random picks (smoke tests) "
                        "(default: %(default)s)")
    p.add_argument("--no-measure", action="store_true",
                   help="do not compile and time the model without/with the database at the end")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("run", help="run a compiled artifact on inputs",
                       description="Load an artifact (no compiler needed) and run it on inputs "
                                   "from an .npz file or on random data.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="artifact folder written by 'mmcompile compile'")
    p.add_argument("--inputs", metavar="FILE.npz", help="one array per input name")
    p.add_argument("--random", action="store_true", help="run on random inputs that match the "
                                                         "signature")
    p.add_argument("--seed", type=int, default=0, help="seed for --random (default: 0)")
    p.add_argument("--output", metavar="FILE.npz", help="write the outputs here (atomically)")
    p.add_argument("--repeat", type=int, default=1, help="run N times and report the median")
    p.add_argument("--threads", type=int, default=0, help="threads (default: all cores)")
    p.add_argument("--schedule", choices=["sequential", "parallel"],
                   help="override the schedule chosen at compile time")
    p.add_argument("--timeline", metavar="FILE.png",
                   help="draw the Gantt chart of one run (stages on worker lanes)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("explore", help="model an accelerator's latency and energy over a sweep",
                       description="Quantize a model (or take a QDQ one), then cost its layers "
                                   "with the accelerator's cycle model on every combination of "
                                   "the --sweep values over the base description (--target "
                                   "accel{preset=...} or --accel-spec): latency, energy, "
                                   "utilization and an area proxy (PEs + SRAM KiB) per point, "
                                   "the Pareto front marked. Nothing is simulated.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    p.add_argument("--sweep", required=True, metavar="'FIELD=V1,V2 ...'",
                   help="description fields and their values, e.g. 'rows=8,16,32 cols=8,16,32 "
                        "sram_kib=128,256,512' (sram_kib: the scratchpad; acc_kib: the "
                        "accumulator; any other field of 'mmcompile targets' presets)")
    p.add_argument("--target", default="accel", metavar="TARGET",
                   help="the base description, e.g. 'accel{preset=edge-32x32}' "
                        "(default: %(default)s)")
    p.add_argument("--target-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of --target (repeatable)")
    p.add_argument("--accel-spec", metavar="FILE.toml", help="the base description as a file")
    p.add_argument("--plot", metavar="FILE.png|FILE.svg",
                   help="draw latency against energy and against the area proxy")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print progress even when stderr is not a terminal")
    _add_quantize_args(p, required=False)
    p.set_defaults(func=cmd_explore)

    p = sub.add_parser("runtime-wheels", help="write the deployment install's wheels",
                       description="Write the wheels of the deployment install: "
                                   "mmcompile-runtime (load and run .mmc artifacts) and "
                                   "apache-tvm-runtime (TVM without its compiler library), "
                                   "made from this installation.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="folder for the wheels (created if needed)")
    p.set_defaults(func=cmd_runtime_wheels)

    p = sub.add_parser("targets", help="list registered targets and their options")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("passes", help="list registered passes and named pipelines")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_passes)

    from mmcompile.bench.command import DESCRIPTION, add_arguments
    p = sub.add_parser("bench", help="benchmark against onnxruntime and PyTorch",
                       description=DESCRIPTION, epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mmcompile`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MMCompileError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"mmcompile: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mmcompile: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so plainly
        if args.debug:
            traceback.print_exc()
        print(f"mmcompile: internal error: {type(exc).__name__}: {exc} (rerun with --debug for "
              f"the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
