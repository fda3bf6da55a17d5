"""Light imports: the maths, collation and config modules never pull in the heavy stack."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("transformers", "accelerate", "peft", "datasets")


@pytest.mark.parametrize("module", ["dpokit", "dpokit.objectives.losses", "dpokit.models.logps", "dpokit.data.collate", "dpokit.data.packing", "dpokit.config", "dpokit.errors", "dpokit.resources", "dpokit.training.hooks"])
def test_module_imports_without_heavy_dependencies(module: str) -> None:
    code = f"import sys, {module}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} imported {out.stdout.strip()}"


def test_cli_help_does_not_import_torch() -> None:
    """`dpokit --help` builds every subcommand's parser; none may pull in torch (it costs ~1.5 s)."""
    code = "import sys, dpokit.cli; dpokit.cli.build_parser(); print(','.join(m for m in ('torch',) + HEAVY if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}; {code}"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"building the CLI parser imported {out.stdout.strip()}"
