"""Errors that are a user's to fix, not a bug: commands print them as one line (no
traceback), naming the config key, file or record and what to do."""


class ConfigError(ValueError):
  """A config value, a file it names, or the data it points at is wrong."""
