"""Replay a cluster's job history through the real decision core on a simulated clock.

trace.py reads `sacct -P` output, a simple CSV and a `sinfo` dump; place.py puts each job's GPUs on
the lowest free indices as Slurm does; simulate.py feeds one node's jobs to `core.decide` and adds
up what the server would have harvested; report.py prints and plots it; command.py is the CLI.
The core never imports this package.
"""
