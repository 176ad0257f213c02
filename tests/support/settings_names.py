"""The SANDFLEET_* environment variables the code reads: deployment files may set no other."""

from __future__ import annotations

from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from sandfleet.common.settings import Settings
from sandfleet.gateway.operator_cli import BrokerAdminSettings
from sandfleet.workers import registry


def env_names(settings_type: type[BaseSettings]) -> set[str]:
    """The environment variables a settings class reads (upper case)."""
    prefix = str(settings_type.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for name, field in settings_type.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice).upper() for choice in alias.choices)
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def known_settings() -> set[str]:
    """Every SANDFLEET_* variable of the runtime, of `broker setup` and of each registered
    driver."""
    kinds: list[type[BaseSettings]] = [Settings, BrokerAdminSettings]
    kinds += [registry.load(name).settings for name in registry.installed()]
    return {name for kind in kinds for name in env_names(kind)}
