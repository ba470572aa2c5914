"""Imports run one way: the layer contract in pyproject.toml ([tool.importlinter]), checked by
import-linter over every import in the package, those inside functions included."""

from __future__ import annotations

from pathlib import Path

from importlinter.cli import lint_imports

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_imports_follow_the_layers(capsys):
    code = lint_imports(config_filename=str(PYPROJECT), no_cache=True)
    report = capsys.readouterr().out
    assert code == 0, report
