"""The Minitron study (issue 8): the papers' ablations on a real model, resumable, reported as
docs/RESULTS.md + docs/results.json. Entry point: bench/study.py."""
