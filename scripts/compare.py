#!/usr/bin/env python
"""segnet-compare: see `python scripts/compare.py --help` and the README."""

import sys
from pathlib import Path

# Lets a plain clone run the script without `pip install`; an installed segnet works the same.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segnet.cli import compare_main

if __name__ == "__main__":
    sys.exit(compare_main())
