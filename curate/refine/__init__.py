"""`curate refine`: curated images moved toward the teacher's own statistics (run.py), its options (config.py)."""
