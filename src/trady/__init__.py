"""trady: fine-tune a pretrained network under a hard training-memory budget.

The any-model API, importable from `trady` itself:
- `trady.rank(model, batches, ...) -> RankingProfile`: the layer ranking of any nn.Module (trady.selection.rank_run);
- `trady.Tuner(model, example_input, strategy=..., budget=..., profile=...)`: a strategy's draws from
  the user's own training loop (trady.selection.tuner);
- `trady.RankingProfile`: the profile's JSON form (trady.selection.ranking);
- `trady.TradyCallback`: the PyTorch Lightning callback (trady.train.lightning; extra trady[lightning]).
"""

def _package_version() -> str:
    """The installed distribution's version (pyproject.toml is the one place it is written)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trady")
    except PackageNotFoundError:  # a source tree on sys.path without an install
        return "0+unknown"


__version__ = _package_version()

# Loaded on first use: `import trady` (and the CLI's start) stays free of torch until one is needed.
_EXPORTS = {
    "rank": "trady.selection.rank_run",
    "Tuner": "trady.selection.tuner",
    "RankingProfile": "trady.selection.ranking",
    "TradyCallback": "trady.train.lightning",  # needs the trady[lightning] extra
}
__all__ = ["RankingProfile", "TradyCallback", "Tuner", "__version__", "rank"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trady' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
