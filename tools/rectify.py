#!/usr/bin/env python
"""`python tools/rectify.py ...` = `spot-rectify ...` (megatron_spot/cli/rectify.py; --help for the stages)."""
import sys

from megatron_spot.cli.rectify import main

if __name__ == "__main__":
    sys.exit(main())
