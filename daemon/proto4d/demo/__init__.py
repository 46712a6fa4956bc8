"""What shows proto4d rather than runs it: `proto4d demo` (story.py) and the HTTP load generator
(loadgen.py) that the demo, the end-to-end tests and the benchmarks drive the app with.

Nothing in the daemon imports this package.
"""
