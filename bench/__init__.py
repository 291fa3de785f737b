"""orderflow's benchmarks: the bus side by side with its baselines, in one run.

Run with ``python -m bench`` (``make bench``); ``--quick`` for a short smoke run.
Importing this package starts nothing: servers start only when a run begins.
"""
