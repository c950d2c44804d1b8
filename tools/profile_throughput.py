#!/usr/bin/env python
"""`python tools/profile_throughput.py ...` = `spot-profile ...` (megatron_spot/cli/profile_throughput.py; --help for the options)."""
import sys

from megatron_spot.cli.profile_throughput import main

if __name__ == "__main__":
    sys.exit(main())
