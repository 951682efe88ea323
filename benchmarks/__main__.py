"""`python -m benchmarks run [NAME ...]`."""

from benchmarks.cli import bench_app

bench_app(prog_name="python -m benchmarks")
