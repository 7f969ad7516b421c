"""User models from a Python entry point: `path/to/file.py:build_fn` or `package.module:build_fn`.

This RUNS THE USER'S CODE, as any Python entry point does (the file is imported as a module): point it
only at code you trust. `build_fn` is called as `build_fn(num_classes=N)` when it takes a `num_classes`
parameter (N: the dataset's class count), else as `build_fn()`; it must return an nn.Module whose
input is a float image batch [B, 3, R, R] normalised with MEAN / STD (ImageNet's), R = --resolution.
`--weights FILE` then loads a local state dict into it (strict keys and shapes).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

from trady.core.errors import TradyError

MEAN = (0.485, 0.456, 0.406)  # the normalisation trady's datasets apply for a user model
STD = (0.229, 0.224, 0.225)
_MODULE_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_entry_point(name: str) -> bool:
    """Whether `name` names a builder (`file.py:fn` or `package.module:fn`) rather than a zoo model."""
    if not isinstance(name, str) or name.count(":") != 1:
        return False
    where, fn = name.split(":")
    return fn.isidentifier() and (where.endswith(".py") or bool(_MODULE_PATH.match(where)))


def load_builder(name: str) -> Callable[..., nn.Module]:
    """The callable that `name` points at (imports the file or module: runs its top-level code)."""
    if not is_entry_point(name):
        raise TradyError(f"model {name!r} is not an entry point; accepted: path/to/file.py:build_fn or "
                         "package.module:build_fn")  # fmt: skip
    where, fn = name.split(":")
    if where.endswith(".py"):
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise TradyError(f"model file {where!r} not found; accepted: path/to/file.py:build_fn")
        mod_name = f"trady_user_model_{abs(hash(str(path)))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # dataclasses and pickling look the module up by name
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(mod_name, None)
            raise
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as err:
            raise TradyError(f"cannot import module {where!r} of model {name!r}: {err}") from None
    builder = getattr(module, fn, None)
    if not callable(builder):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise TradyError(f"{where!r} has no function {fn!r}; callables there: {', '.join(found) or 'none'}")
    return builder


def build(name: str, num_classes: int | None = None) -> nn.Module:
    """Call the builder (with num_classes when it takes one) and check that it returns an nn.Module."""
    builder = load_builder(name)
    try:
        takes = "num_classes" in inspect.signature(builder).parameters
    except (TypeError, ValueError):
        takes = False
    model = builder(num_classes=num_classes) if takes and num_classes is not None else builder()
    if not isinstance(model, nn.Module):
        raise TradyError(f"{name!r} returned a {type(model).__name__}; accepted: a torch.nn.Module")
    return model
