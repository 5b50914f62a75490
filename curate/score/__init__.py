"""The scoring stage: teacher outputs, embeddings and relatedness indicators for every pool sample, in Parquet.

`runner.score_pool(config.ScoreConfig(...))` runs it; readers of scored pools (curate.query) import only
`output`, which loads no torch."""
