"""The reliability harness (issue 23): broken and hostile inputs, killed runs, full disks, concurrent runs.

mutations (how a file is broken) -> cases (per file kind: what is broken and the CLI argv reading it) -> runner
(a forked child under memory, time and file-size bounds; how it ended) ; kill (SIGKILL at random points, rerun,
sha256 equality) ; scenarios (full disk, two runs on one output) ; doc (docs/RELIABILITY.md) ; main (the CLI of
tools/fuzz_inputs.py).
"""
