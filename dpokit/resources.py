"""Files that ship inside the package, resolved by package rather than by the working directory.

Three kinds, so that `dpokit train --preset lora` and the default `data.train_files` work from any
folder once the wheel is installed:

    presets     named training configs, ``dpokit/assets/presets/<name>.yaml`` (`preset_path`)
    data        example data, written ``builtin:<path>`` in configs (`resolve_builtin`), e.g.
                ``builtin:toy/train.jsonl`` = ``dpokit/assets/data/toy/train.jsonl``
    accelerate  Accelerate launch configs (ddp, fsdp, zero2, zero3),
                ``dpokit/assets/accelerate/<name>.yaml`` (`accelerate_config_path`)

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


def accelerate_configs() -> list[str]:
    """Names of the shipped Accelerate configs (`dpokit train --num-processes N --accelerate-config NAME`)."""
    return sorted(p.stem for p in (_assets() / "accelerate").glob("*.yaml"))


def accelerate_config_path(name_or_path: str) -> Path:
    """A shipped Accelerate config by name (``fsdp``), or the user's own config file by path; a
    ConfigError lists the names when it is neither."""
    shipped = _assets() / "accelerate" / f"{name_or_path}.yaml"
    if Path(name_or_path).name == name_or_path and shipped.is_file():  # a bare name, not a path
        return shipped
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.resolve()
    raise ConfigError(
        f"no Accelerate config named {name_or_path!r} and no such file; the shipped configs are: "
        f"{', '.join(accelerate_configs())} (or give the path of your own `accelerate config` YAML)"
    )


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
