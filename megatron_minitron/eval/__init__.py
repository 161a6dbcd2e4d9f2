"""Evaluation: held-out perplexity (perplexity.py), per-token scores (token_scores.py), the
lm-eval-harness adapter (lm_eval_adapter.py) with local tasks (tasks/), what `minitron eval`
runs (suite.py) and the run report (report.py)."""
