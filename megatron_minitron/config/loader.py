"""Compose Hydra YAML + overrides and convert, once, into the typed MinitronConfig."""

import dataclasses
import os
import re
import typing
from pathlib import Path
from typing import List, Sequence, Type, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.schema import MinitronConfig

T = TypeVar("T")


def conf_dir() -> Path:
    """The YAML tree: $MINITRON_CONF_DIR, else the repository's conf/."""
    env = os.environ.get("MINITRON_CONF_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "conf"


def register_schema() -> None:
    """Store the dataclass schema so Hydra rejects unknown keys and wrong types at compose."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="minitron_schema", node=MinitronConfig)


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Hydra compose of conf/<config_name>.yaml with command-line style overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    check_group_options(overrides)
    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except HydraException as e:
        msg = str(e).splitlines()[0]
        m = (re.search(r"override '?([\w.]+)", msg) or re.search(r"argument '([\w.]+)=", msg)
             or re.search(r"'([\w.]+)'", msg))
        fix = ("quote a value holding commas, e.g. key=\"'a,b'\"" if "Ambiguous value" in msg
               else "check the key's spelling (see megatron_minitron/config/) and the "
               "value's type; new keys are not accepted")
        raise ConfigError(m.group(1) if m else "overrides", msg, fix) from e


def check_group_options(overrides: Sequence[str]) -> None:
    """`experiment=` and `model=` name YAML files; Hydra silently skips a missing option of an
    optional group (so a typo would run the default), so unknown ones are refused here."""
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        folder = conf_dir() / key
        if key not in ("experiment", "model") or value in ("", "null") or not folder.is_dir():
            continue
        shipped = sorted(p.stem for p in folder.glob("*.yaml"))
        if value not in shipped:
            raise ConfigError(key, f"unknown {key} {value!r}",
                              f"use one of {shipped} (YAML files in {folder})")


def to_typed(cfg: DictConfig, schema: Type[T] = MinitronConfig) -> T:
    """Merge onto the dataclass schema (unknown keys are errors) and build the dataclasses."""
    _reject_unknown_keys(cfg, schema, "")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        return OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        key = getattr(e, "full_key", None) or str(e)
        raise ConfigError(str(key), "unknown config key",
                          "remove it or fix its spelling (see the dataclasses in "
                          "megatron_minitron/config/)") from e
    except ValidationError as e:
        raise ConfigError(str(getattr(e, "full_key", "config")), e.msg.splitlines()[0],
                          "give a value of the field's type") from e
    except OmegaConfBaseException as e:
        raise ConfigError(str(getattr(e, "full_key", "config")), str(e).splitlines()[0],
                          "fix the value") from e


def _reject_unknown_keys(node, schema, prefix: str) -> None:
    """Strict mode: `+key=value` or a YAML typo must not slip past the dataclasses."""
    if not (dataclasses.is_dataclass(schema) and isinstance(node, DictConfig)):
        return
    hints = typing.get_type_hints(schema)
    fields = {f.name for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key not in fields:
            raise ConfigError(f"{prefix}{key}", "unknown config key",
                              f"remove it or use one of: {', '.join(sorted(fields))}")
        sub = hints[key]
        if typing.get_origin(sub) is typing.Union:  # Optional[Section]
            sub = next(a for a in typing.get_args(sub) if a is not type(None))
        _reject_unknown_keys(node._get_node(key), sub, f"{prefix}{key}.")


def load_config(overrides: Sequence[str] = (), config_name: str = "config") -> MinitronConfig:
    return to_typed(compose(overrides, config_name))


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml_file(path: str, schema: Type[T] = MinitronConfig) -> T:
    return to_typed(OmegaConf.load(path), schema)


def override_list(argv: List[str]) -> List[str]:
    """Hydra overrides are the only CLI surface; reject flags early with the right advice."""
    for a in argv:
        if a.startswith("-"):
            raise ConfigError(a, "flags are not accepted",
                              "pass Hydra overrides like key=value or group=option")
    return list(argv)
