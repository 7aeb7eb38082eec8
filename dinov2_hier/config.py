"""Layered OmegaConf configuration: default yaml < override yaml < ``key=value``.

The default file declares every key; override files and command-line arguments may
only change keys that exist there (a typo is an error naming the closest key, not a
silently ignored key). The resolved config is then checked once, key by key, for type
and range (:mod:`dinov2_hier.config_schema`); every failure is a :class:`ConfigError`.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterable

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config_schema import ConfigError, validate_config
from .io import atomic_write_text
from .paths import PROJECT_ROOT

DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "default.yaml"


def _load_yaml(path: Path) -> DictConfig:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return OmegaConf.create(data)


BASE_KEY = "base"


def _load_override_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """An override file and the files it names with ``base:`` (relative to itself),
    outermost base first. Lets ``vitl14_hierce.yaml`` say ``base: vitl14.yaml``."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    layer = _load_yaml(path)
    chain: list[tuple[str, DictConfig]] = []
    if BASE_KEY in layer:
        base = layer.pop(BASE_KEY)
        if not isinstance(base, str):
            raise ConfigError(f"{path}: '{BASE_KEY}' must be a file name, got {base!r}")
        chain = _load_override_chain(path.parent / base, seen + (path,))
    return chain + [(str(path), layer)]


def _mark_missing(cfg: DictConfig, layer: DictConfig, prefix: str = "") -> None:
    """``key: ???`` in a layer means "must be given later"; OmegaConf.merge would keep the
    older value instead, so set those keys to missing explicitly."""
    for key in layer.keys():
        if OmegaConf.is_missing(layer, key):
            OmegaConf.update(cfg, f"{prefix}{key}", "???", force_add=True)
        elif isinstance(layer[key], DictConfig):
            _mark_missing(cfg, layer[key], prefix=f"{prefix}{key}.")


def _did_you_mean(key: str, prefix: str, base: DictConfig, defaults: DictConfig) -> str:
    """``"; did you mean 'train.iterations'?"`` for the key of ``base`` (a section of the
    default config, at ``prefix``) closest to ``key``; failing that, the closest dotted
    key anywhere in ``defaults`` (a key put in the wrong section)."""
    from .config_schema import leaf_keys

    siblings = [str(k) for k in base.keys()]
    close = [f"{prefix}{k}" for k in difflib.get_close_matches(str(key), siblings, n=1, cutoff=0.6)]
    if not close:
        dotted = [k for k, _ in leaf_keys(defaults)]
        # The right name in the wrong section ('optim.student_temp'), else any close dotted key.
        close = [k for k in dotted if k.rsplit(".", 1)[-1] == str(key)][:2]
        close = close or difflib.get_close_matches(f"{prefix}{key}", dotted, n=1, cutoff=0.6)
    return "; did you mean " + " or ".join(f"'{k}'" for k in close) + "?" if close else ""


def _check_known_keys(
    base: DictConfig, override: DictConfig, source: str, prefix: str = "", defaults: DictConfig | None = None
) -> None:
    """Reject keys of ``override`` absent from ``base`` (mappings are checked recursively),
    naming the closest known key."""
    defaults = base if defaults is None else defaults
    for key in override.keys():
        full = f"{prefix}{key}"
        if key not in base.keys():
            raise ConfigError(f"{source}: unknown config key '{full}'{_did_you_mean(key, prefix, base, defaults)}")
        if OmegaConf.is_missing(base, key) or OmegaConf.is_missing(override, key):
            continue
        sub_base, sub_over = base[key], override[key]
        # Lists and null-valued defaults may be replaced freely; mappings are checked deeply.
        if isinstance(sub_base, DictConfig) and isinstance(sub_over, DictConfig):
            _check_known_keys(sub_base, sub_over, source, prefix=f"{full}.", defaults=defaults)


def parse_overrides(overrides: Iterable[str]) -> DictConfig:
    """Turn ``["a.b=1", "c=[1,2]"]`` into a config; values are parsed as YAML."""
    merged = OmegaConf.create({})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command-line override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"command-line override '{item}' has an empty key")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        try:
            OmegaConf.update(merged, key, parsed, force_add=True)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"command-line override '{item}': {exc}") from None
    return merged


def load_config(
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
    default_file: str | Path = DEFAULT_CONFIG,
) -> DictConfig:
    """Build the run configuration.

    Args:
        config_file: override yaml, merged on top of the default. It may name another
            override file as ``base: FILE`` (relative to itself), merged before it.
        overrides: ``key=value`` strings from the command line.
        default_file: the yaml that declares every key.
    Returns:
        The merged config; interpolations are resolved, and every value was checked
        against its type in ``default_file`` and its range
        (:func:`dinov2_hier.config_schema.validate_config`; numeric strings such as
        YAML's ``1e-3`` become numbers).
    Raises:
        ConfigError: one line naming the file, key or value at fault.
    """
    defaults = _load_yaml(Path(default_file))
    cfg = defaults  # OmegaConf.merge returns a new config: ``defaults`` stays as read
    layers: list[tuple[str, DictConfig]] = []
    if config_file is not None:
        layers.extend(_load_override_chain(Path(config_file)))
    layers.append(("command line", parse_overrides(overrides)))
    for source, layer in layers:
        _check_known_keys(cfg, layer, source)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{source}: {exc}") from None
        _mark_missing(cfg, layer)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot resolve config: {exc}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config values still to be given (marked ???): {', '.join(missing)}; e.g. {missing[0]}=...")
    validate_config(cfg, defaults)
    return cfg


def to_yaml(cfg: DictConfig | ListConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write ``cfg`` as yaml atomically (write a temporary file, then rename)."""
    atomic_write_text(Path(path), to_yaml(cfg))
