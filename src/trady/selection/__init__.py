"""Choosing what to train: layer ranking (`ranking`, the rank run `rank_run`), the strategy registry
(`strategies`) and the `Tuner` that applies a strategy's draws to a prepared model (`tuner`)."""
