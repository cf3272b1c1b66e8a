"""Benchmarks beside bench.py, run as scripts (python bench/memory.py), and sass.py, the library behind
bench.py --mode=sass. A package so that bench.py can import bench.sass (the folder would otherwise lose to bench.py)."""
