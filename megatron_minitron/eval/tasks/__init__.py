"""lm-eval task YAMLs shipped with the package, and the demo tasks' data (demo.py)."""
