"""A wall-clock sampler for the lab, injected into a running stack without changing its code: put
this directory on PYTHONPATH and set ZIMAGE_SAMPLE_DIR, and every Python process of the app (rank 0's
engine thread, a follower rank's main thread) records where its generating thread is, every
ZIMAGE_SAMPLE_MS milliseconds, and rewrites <dir>/<pid>.json every two seconds (so a process that is
killed still leaves its samples). ops/lab/parallel_check.py --sample uses it and summarises.

Why a sampler and not torch.profiler: the question it answers is where a rank's CPU time goes in
the real stack (the engine's thread among the web server's, the per-step vote, the hooks), which
only the real processes show. Python sees its own frames: time inside a C call (a kernel launch, a
collective) is charged to the Python line that made it. It holds the GIL for a moment per sample:
at 2 ms that slows what it measures by about a percent."""

import os

if os.environ.get("ZIMAGE_SAMPLE_DIR"):
    import atexit
    import collections
    import json
    import sys
    import threading
    import time

    _DIR = os.environ["ZIMAGE_SAMPLE_DIR"]
    _EVERY_S = float(os.environ.get("ZIMAGE_SAMPLE_MS", "2")) / 1000
    _OURS = ("/diffusers/", "/app/", "/torch/_dynamo/", "/torch/distributed/", "/torch/_inductor/")

    def _where(frame) -> tuple[str, str]:
        """(the innermost frame, the innermost frame in code we can act on)."""
        leaf = f"{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno} {frame.f_code.co_name}"
        ours = leaf
        while frame is not None:
            name = frame.f_code.co_filename
            if any(part in name for part in _OURS):
                ours = f"{name.rsplit('/', 2)[-1]}:{frame.f_lineno} {frame.f_code.co_name}"
                break
            frame = frame.f_back
        return leaf, ours

    def _sample() -> None:
        leaves, ours, stages = collections.Counter(), collections.Counter(), collections.Counter()
        taken = 0
        written = time.monotonic()
        me = threading.get_ident()

        def dump() -> None:
            if not taken:  # not a process that generates (the monitor, supervisord's tools)
                return
            path = os.path.join(_DIR, f"{os.getpid()}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(
                    {
                        "argv": sys.argv,
                        "samples": taken,
                        "threads": sorted(t.name for t in threading.enumerate()),
                        "every_ms": _EVERY_S * 1000,
                        "leaf": leaves.most_common(40),
                        "ours": ours.most_common(40),
                        # (the ancestors every sample shares say nothing: left out)
                        "functions": [(k, c) for k, c in stages.most_common(80) if c < taken][:60],
                    },
                    f,
                )
            os.replace(path + ".tmp", path)

        atexit.register(dump)
        while True:
            time.sleep(_EVERY_S)
            target = None
            for thread in threading.enumerate():
                if thread.name == "engine":
                    target = thread.ident
            if target is None:  # a follower rank generates on its main thread (idle time is left out below)
                target = threading.main_thread().ident
            top = sys._current_frames().get(target) if target not in (None, me) else None
            functions, frame = [], top
            while frame is not None:
                functions.append(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}")
                frame = frame.f_back
            # only while a request's generation runs: idle waits, the warm-up and compiling left out
            # (a follower rank runs the warm-up's generations as shared work, without warm_up above)
            if (
                "stages.py:run_batch" in functions
                and "warmup.py:warm_up" not in functions
                and "convert_frame.py:_compile" not in functions
            ):
                taken += 1
                leaf, own = _where(top)
                leaves[leaf] += 1
                ours[own] += 1
                for key in set(functions):  # every function on the stack, once per sample (inclusive)
                    stages[key] += 1
            if time.monotonic() - written > 2:
                written = time.monotonic()
                try:
                    dump()
                except OSError:
                    pass

    threading.Thread(target=_sample, name="zimage-sampler", daemon=True).start()
