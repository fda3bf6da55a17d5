"""Files that ship inside the package, resolved by package rather than by the working directory.

Two kinds, so that `dpokit train --preset lora` and the default `data.train_files` work from any
folder once the wheel is installed:

    presets   named training configs, ``dpokit/assets/presets/<name>.yaml`` (`preset_path`)
    data      example data, written ``builtin:<path>`` in configs (`resolve_builtin`), e.g.
              ``builtin:toy/train.jsonl`` = ``dpokit/assets/data/toy/train.jsonl``

Imports the standard library only.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from dpokit.errors import ConfigError

BUILTIN_PREFIX = "builtin:"


def _assets() -> Path:
    # The package is installed as plain files (wheel or editable), never zipped: a real path is fine.
    return Path(str(resources.files("dpokit") / "assets"))


def presets() -> list[str]:
    """Names of the shipped configs (`dpokit train --preset NAME`)."""
    return sorted(p.stem for p in (_assets() / "presets").glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The YAML file of a shipped config; a ConfigError lists the names when there is none."""
    path = _assets() / "presets" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset named {name!r}; the presets are: {', '.join(presets())}")
    return path


def is_builtin(spec: str) -> bool:
    return spec.startswith(BUILTIN_PREFIX)


def resolve_builtin(spec: str) -> Path:
    """``builtin:toy/train.jsonl`` -> the packaged file (or folder / glob) it names."""
    rel = spec[len(BUILTIN_PREFIX) :].lstrip("/")
    root = _assets() / "data"
    path = (root / rel).resolve()
    if root.resolve() not in path.parents and path != root.resolve():
        raise ConfigError(f"{spec}: builtin data paths stay inside the package's data folder")
    return path


def builtin_files() -> list[str]:
    """Every packaged data file, as the ``builtin:`` spec that names it."""
    root = _assets() / "data"
    return sorted(BUILTIN_PREFIX + p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
