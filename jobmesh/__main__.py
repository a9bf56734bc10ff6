"""`python -m jobmesh` is the `jobmesh` command."""

import sys

from jobmesh.cli import main

sys.exit(main())
