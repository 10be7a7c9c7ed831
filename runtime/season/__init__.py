"""Many cards at once: the CARDS list, chunk shards, workers and pools, the season driver and its outputs."""
