"""`python -m services.cli`: the `escapement` command."""

import sys

from services.cli import main

sys.exit(main())
