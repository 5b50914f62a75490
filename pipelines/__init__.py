"""End-to-end experiments built from curate and train (see hetero_distill once it lands)."""
