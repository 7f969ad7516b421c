"""Training runs: micro-batches, set-up of a run, checkpoints, the loop (`finetune`), the Lightning
callback, and planning a budget (`plan`, `prediction`).

`trady.train.finetune` is loaded on first use so that `trady.train.microbatch` stays light.
"""

__all__ = ["finetune"]


def __getattr__(name: str):
    if name == "finetune":
        from trady.train.loop import finetune

        return finetune
    raise AttributeError(f"module 'trady.train' has no attribute {name!r}")
