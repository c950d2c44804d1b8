#!/usr/bin/env python
"""`python tools/export_quantized.py ...` = `spot-export-quantized ...` (megatron_spot/cli/export_quantized.py; --help for the options)."""
import sys

from megatron_spot.cli.export_quantized import main

if __name__ == "__main__":
    sys.exit(main())
