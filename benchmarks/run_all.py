"""`make bench`: run every benchmarks/bench_*.py in turn; each rewrites its own BENCHMARKS.md section."""
import glob
import os
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
# scripts run again with these arguments, each writing a section of its own
EXTRA_RUNS = {"bench_convert.py": [["--preset", "llama3.1-70b", "--layers", "2"]]}
failed = []
for script in sorted(glob.glob(os.path.join(here, "bench_*.py"))):
    name = os.path.basename(script)
    for args in [[]] + EXTRA_RUNS.get(name, []):
        print(f"== {name} {' '.join(args)}", flush=True)
        if subprocess.call([sys.executable, script, *args]) != 0:
            failed.append(f"{name} {' '.join(args)}".strip())
if failed:
    sys.exit(f"benchmarks failed: {', '.join(failed)}")
print("BENCHMARKS.md updated")
