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
import json
import sys
import traceback
from collections.abc import Sequence

from mmcompile.errors import MMCompileError, ModelLoadError

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
    info = describe(_load(args))
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
    print(format_table(["branch", "nodes", "parameters", "top ops"],
                       [(name, b["nodes"], f"{b['parameters']:,}",
                         ", ".join(f"{op}x{n}" for op, n in list(b["ops"].items())[:5]))
                        for name, b in info["branches"].items()]))
    print("\nops: " + ", ".join(f"{op}x{n}" for op, n in info["ops"].items()))
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
    p.add_argument("--passes", default="default", metavar="PIPELINE",
                   help="pipeline: a named pipeline ('default', 'none') or comma-separated pass "
                        "names with options, e.g. 'fold-constants{size_threshold=1024},"
                        "fixpoint(eliminate-identity,eliminate-dead-code)'; see 'mmcompile "
                        "passes' (default: %(default)s)")
    p.add_argument("-O", "--opt-level", type=int, default=2, choices=[0, 1, 2],
                   help="skip passes above this level (default: %(default)s)")
    p.add_argument("--disable", action="append", default=[], metavar="PASS",
                   help="skip this pass (repeatable)")
    p.add_argument("--report", action="store_true",
                   help="print per-pass counters and op counts before/after, as tables")
    p.add_argument("--dump-ir", metavar="DIR", help="save the graph after each pass that "
                                                    "changed it, as DIR/NNN-<pass>.onnx")
    p.add_argument("--verify-each", action="store_true",
                   help="verify the graph after every pass (slower; for debugging passes)")
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("inspect", help="show inputs, modality tags, branches and ops",
                       description="Describe a model: inputs with their modality tag and how it "
                                   "was decided, outputs, nodes per modality branch, op counts.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("passes", help="list registered passes and named pipelines")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_passes)
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
