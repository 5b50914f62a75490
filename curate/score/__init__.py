"""The scoring stage: teacher outputs, embeddings and relatedness indicators for every pool sample, in Parquet."""

from curate.score.runner import ScoreConfig, ScoreSummary, score_pool

__all__ = ["ScoreConfig", "ScoreSummary", "score_pool"]
