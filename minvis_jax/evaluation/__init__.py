"""Video instance segmentation metrics (YouTube-VIS / OVIS)."""

from minvis_jax.evaluation.ytvis import evaluate, evaluate_dicts, format_table

__all__ = ['evaluate', 'evaluate_dicts', 'format_table']
