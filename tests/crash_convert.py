"""``haq convert`` that SIGKILLs itself around its N-th atomic commit (``os.replace``), for
tests/test_crash_safety.py: ``KILL_AT=N KILL_WHEN=before|after python tests/crash_convert.py ARGS``.
``KILL_AT=0`` runs to the end and prints how many commits there were."""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KILL_AT = int(os.environ.get("KILL_AT", "0"))
KILL_WHEN = os.environ.get("KILL_WHEN", "before")
_real_replace = os.replace
_commits = 0


def _replace(src, dst):
    global _commits
    _commits += 1
    if _commits == KILL_AT and KILL_WHEN == "before":
        os.kill(os.getpid(), signal.SIGKILL)  # the file is written, not yet committed
    _real_replace(src, dst)
    if _commits == KILL_AT and KILL_WHEN == "after":
        os.kill(os.getpid(), signal.SIGKILL)


os.replace = _replace

if __name__ == "__main__":
    from offline.cli import main

    rc = main(sys.argv[1:])
    print(f"COMMITS {_commits}")
    sys.exit(rc)
