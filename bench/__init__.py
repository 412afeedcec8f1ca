"""The benchmark suite (issue 10): `python -m bench.run` (`make bench`) runs every figure
module and writes bench/results/latest.json, the plots under docs/performance/ and the
figures table of docs/performance.md. Each figure module also runs alone."""
