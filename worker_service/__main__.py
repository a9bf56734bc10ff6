"""`python -m worker_service`."""

import sys

from worker_service.app import main

if __name__ == "__main__":
    sys.exit(main())
