"""``python -m kasmina``: the same command line as the ``kasmina`` script."""

import sys

from kasmina.cli.main import main

sys.exit(main())
