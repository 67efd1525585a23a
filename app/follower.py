"""python -m app.follower: a rank other than 0 of a context-parallel app (app/ranks.py starts it).

It serves no HTTP: it loads the same pipeline and runs the generations rank 0 shares
(app/runtime/parallel.py). It ignores SIGTERM: supervisord's stop signal goes to the whole process
group, and this rank must keep serving rank 0's drain until rank 0 tells it to stop."""

from __future__ import annotations

import os
import signal
import sys


def main() -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from app.config import load_settings
    from app.runtime.parallel import RankEnv

    env = RankEnv.from_env()
    if env is None or os.getppid() != int(os.environ.get("ZIMAGE_PARALLEL_PARENT", "0")):
        print("zimage-serve rank: start the app (python -m app), not this module", file=sys.stderr)
        return 2
    settings = load_settings()
    from common.jsonlog import setup_logging

    setup_logging(f"app-rank{env.rank}", settings.log_level, secrets=[settings.api_token or ""])
    from app.runtime import serve_follower

    return serve_follower(settings)


if __name__ == "__main__":
    sys.exit(main())
