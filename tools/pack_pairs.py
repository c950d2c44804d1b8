#!/usr/bin/env python
"""`python tools/pack_pairs.py ...` = `spot-pack ...` (megatron_spot/cli/pack_pairs.py; --help for the options)."""
import sys

from megatron_spot.cli.pack_pairs import main

if __name__ == "__main__":
    sys.exit(main())
