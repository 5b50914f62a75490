"""curate: score, query and export heterogeneous unlabeled image pools for distillation."""

__version__ = "0.1.0"
