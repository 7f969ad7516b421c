"""`trady --version` and `trady.__version__` both come from the installed package metadata."""

from __future__ import annotations

from importlib.metadata import version

import pytest

import trady
from trady import cli


def test_version_from_package_metadata(capsys) -> None:
    expected = version("trady")
    assert trady.__version__ == expected
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"trady {expected}"
