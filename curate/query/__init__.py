"""The query stage: SQL over scored pools, a vector index, selection strategies, curated shards."""
