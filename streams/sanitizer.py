"""The sanitizer stream processor as a module entry point: `python -m streams.sanitizer`.

It is the same worker as `guard run` (guard.kafka.runner.SanitizerWorker), configured from GUARD_* variables
or GUARD_CONFIG; container images and process supervisors start it this way. Scale out by starting more
of them with the same GUARD_GROUP_ID and distinct GUARD_WORKER_ID values.
"""

from __future__ import annotations

import sys

from guard.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
