"""The scoring stage: teacher outputs, embeddings and relatedness indicators for every pool sample, in Parquet."""

__all__ = ["ScoreConfig", "ScoreSummary", "score_pool"]


def __getattr__(name: str):
    # Lazy, so readers of scored pools (curate.query) import curate.score.output without loading torch.
    if name in __all__:
        from curate.score import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'curate.score' has no attribute {name!r}")
