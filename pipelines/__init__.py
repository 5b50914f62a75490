"""End-to-end experiments built from curate and train: pipelines.hetero_distill, its design, steps and report."""
