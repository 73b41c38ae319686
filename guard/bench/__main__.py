"""`python -m guard.bench`: the benchmark's command line (`python -m guard.bench --help`)."""

import sys

from guard.bench.run import main

sys.exit(main())
