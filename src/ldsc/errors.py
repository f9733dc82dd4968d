"""Errors that the entry points report as one sentence (no traceback)."""


class LdscError(Exception):
    """A user-facing problem with the inputs or the configuration."""


class DataError(LdscError):
    """Images that are missing, empty or unreadable."""


class ConfigError(LdscError):
    """A configuration that cannot work (e.g. K not smaller than the pixels of the base grid)."""


class SettingError(ConfigError, ValueError):
    """A setting given a value it cannot take (a ``ValueError`` too, for code that builds the
    objects directly)."""
