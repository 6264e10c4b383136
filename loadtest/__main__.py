"""`python -m loadtest SCENARIO ...`, the same as `escapement loadtest SCENARIO ...`."""

import sys

from loadtest.cli import main

if __name__ == "__main__":
    sys.exit(main())
