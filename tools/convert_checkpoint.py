#!/usr/bin/env python
"""`python tools/convert_checkpoint.py ...` = `spot-convert ...` (megatron_spot/cli/convert_checkpoint.py; --help for the options)."""
import sys

from megatron_spot.cli.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
