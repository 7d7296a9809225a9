"""`python -m service ...` is the `shardgrad` command."""

import sys

from service.cli import main

sys.exit(main())
