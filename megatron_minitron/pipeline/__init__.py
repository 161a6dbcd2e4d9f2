"""Stages chained: search, and the end-to-end pipeline."""
