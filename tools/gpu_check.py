#!/usr/bin/env python3
"""`python3 tools/gpu_check.py ...` = `spot-gpu-check ...` (megatron_spot/cli/gpu_check.py; --help for the options)."""
import os
import sys

# The one shim that edits sys.path: it runs on the GPU machine from a bare checkout with that machine's
# own python3, where the package is NOT installed, and installing it there would write into the image's
# site-packages (the check must leave them untouched) and compile the extension before the check can
# guard and time that build. So the checkout holding this file goes first (the package is stdlib-only
# up to the step children, which get the checkout through PYTHONPATH).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_spot.cli.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
