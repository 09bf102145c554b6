"""`python -m effnet_kernels {bench,info}`; `main` is the `effnet-kernels` console script."""

import sys

from .bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
