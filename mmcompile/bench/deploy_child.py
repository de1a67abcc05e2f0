"""One deployed process of ``mmcompile bench --deploy``: import the runtime, load the model,
call it once (the cold start ends here), call it again ``runs`` times, report.

Run by path (``python deploy_child.py ENGINE MODEL INPUTS THREADS RUNS``), not as a module of
the ``mmcompile`` package, so that the onnxruntime process imports nothing of mmcompile and the
mmcompile process only what ``mmcompile.load`` imports. Prints one JSON line:
``first_result_at`` (``time.time()`` when the first call returned; the parent subtracts its
own clock reading taken just before starting this process), ``rss_mb`` (resident now, after the
runs: the steady state), ``peak_rss_mb`` (``VmHWM``) and ``modules`` (how many were imported).
"""

import json
import sys
import time

from runner import status_mb  # the bench child beside this file (its folder is on sys.path)


def main() -> None:
    engine, model, inputs, threads, runs = sys.argv[1:6]
    threads, runs = int(threads), int(runs)
    import numpy as np
    with np.load(inputs) as data:
        feeds = {k: data[k] for k in data.files}
    if engine.startswith("mmcompile"):
        import mmcompile
        compiled = mmcompile.load(model, threads=threads)
        run = compiled.run
    else:
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

        def run(f):
            return session.run(None, f)
    run(feeds)
    first = time.time()
    for _ in range(runs):
        run(feeds)
    print(json.dumps({"first_result_at": first, "rss_mb": status_mb("VmRSS"),
                      "peak_rss_mb": status_mb("VmHWM"), "modules": len(sys.modules)}),
          flush=True)


if __name__ == "__main__":
    main()
