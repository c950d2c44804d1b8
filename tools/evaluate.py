#!/usr/bin/env python
"""`python tools/evaluate.py ...` = `spot-evaluate ...` (megatron_spot/cli/evaluate.py; --help for the protocol)."""
import sys

from megatron_spot.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
