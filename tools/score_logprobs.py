#!/usr/bin/env python
"""`python tools/score_logprobs.py ...` = `spot-score ...` (megatron_spot/cli/score_logprobs.py; --help for the options)."""
import sys

from megatron_spot.cli.score_logprobs import main

if __name__ == "__main__":
    sys.exit(main())
