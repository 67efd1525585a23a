"""Load one section of the TOML config file, overlaid with environment variables, into a pydantic model.

Precedence: defaults < file section < ZIMAGE_<SECTION>_<FIELD> environment variables. The home
directory (base of relative paths: logs/, run/, outputs/) is `$ZIMAGE_HOME`, else the checkout.
The file is `$ZIMAGE_CONFIG` when set, else `zimage.toml` in the home when present. A bad value
raises ConfigError with one readable line; the caller prints it and exits before loading anything.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping, TypeVar

from pydantic import BaseModel, ValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T", bound=BaseModel)


class ConfigError(Exception):
    """An invalid configuration, described in one line an operator can act on."""


def home_dir(env: Mapping[str, str]) -> Path:
    return Path(env.get("ZIMAGE_HOME") or REPO_ROOT).resolve()


def config_path(env: Mapping[str, str]) -> Path | None:
    explicit = env.get("ZIMAGE_CONFIG")
    if explicit:
        return Path(explicit)
    default = home_dir(env) / "zimage.toml"
    return default if default.exists() else None


def read_file_section(section: str, env: Mapping[str, str]) -> dict[str, Any]:
    path = config_path(env)
    if path is None:
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (ZIMAGE_CONFIG)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    value = data.get(section, {})
    if not isinstance(value, dict):
        raise ConfigError(f"config file {path}: [{section}] must be a table")
    return value


def load_section(
    model: type[T],
    section: str,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Build `model` from [section]; models with a `home` field get the home dir for relative paths."""
    env = os.environ if env is None else env
    values: dict[str, Any] = dict(read_file_section(section, env))
    if "home" in model.model_fields:
        values["home"] = home_dir(env)
    prefix = f"ZIMAGE_{section.upper()}_"
    for name in model.model_fields:
        if name == "home":
            continue
        key = prefix + name.upper()
        if key in env:
            values[name] = env[key]
    values.update(overrides or {})
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or section
        source = f"{prefix}{field.upper()} or [{section}].{field}"
        raise ConfigError(f"invalid config {section}.{field}: {first['msg']} (set via {source})") from None


def resolve_under(home: Path, path: Path) -> Path:
    """Relative paths in the config are relative to the home dir, so the stack works from any cwd."""
    return path if path.is_absolute() else (home / path)


def parse_command_line(prog: str, description: str, section: str, argv: list[str] | None = None) -> None:
    """`--help` for a process whose settings come only from the config: it says where they come from.
    Any argument is an error (exit 2), not silently ignored: a flag that seems to work and does not
    is worse than none."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"Configuration comes from the [{section}] section of zimage.toml (in $ZIMAGE_HOME or the\n"
            f"checkout; another file with ZIMAGE_CONFIG=path) and from ZIMAGE_{section.upper()}_<FIELD>\n"
            f"environment variables, which win over the file. Example: ZIMAGE_{section.upper()}_LOG_LEVEL="
            f"debug.\nAn invalid value stops the process with one line naming the field (exit 2).\n"
            f"Operators usually start it through supervisord: zimagectl up."
        ),
    )
    parser.parse_args(argv)
