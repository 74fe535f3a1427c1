"""`python -m stratlm ...`: the same as the `stratlm` command."""

import sys

from stratlm.cli.main import main

sys.exit(main())
