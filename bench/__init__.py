"""Benchmarks: quality (bench.quality) and speed (bench.decode, bench.serve). Results go to docs/benchmarks.md."""
