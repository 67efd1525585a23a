"""Load one section of the TOML config file, overlaid with environment variables, into a pydantic model.

Precedence: defaults < file section < ZIMAGE_<SECTION>_<FIELD> environment variables. The file is
`$ZIMAGE_CONFIG` when set, else `zimage.toml` at the repository root when present. A bad value
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


def config_path(env: Mapping[str, str]) -> Path | None:
    explicit = env.get("ZIMAGE_CONFIG")
    if explicit:
        return Path(explicit)
    default = REPO_ROOT / "zimage.toml"
    return default if default.exists() else None


def load_section(model: type[T], section: str, env: Mapping[str, str] | None = None,
                 overrides: Mapping[str, Any] | None = None) -> T:
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = config_path(env)
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist (ZIMAGE_CONFIG)") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        values.update(data.get(section, {}))
    prefix = f"ZIMAGE_{section.upper()}_"
    for name in model.model_fields:
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
