"""Command-line entry points (console_scripts in setup.py; tools/ holds one-line shims of the same).

One exit-code convention for every tool here (README, "Exit codes")."""
OK = 0            # done
FAILURE = 1       # the work failed (e.g. every request of a stage failed; outputs say why)
BAD_INPUT = 2     # bad arguments or input, including an endpoint that refuses the key, URL or model
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, what shells report); rerunning resumes
