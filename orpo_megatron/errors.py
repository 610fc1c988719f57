"""The one base class of the mistakes a user can fix: every command line catches `UserError` and prints
`error: ...` (the file, row or flag, and what was expected) with a non-zero exit instead of a traceback."""


class UserError(Exception):
    """Bad input (a flag, a data file, a checkpoint, a path) named with what was expected."""


class DataError(UserError, ValueError):
    """Preference data that cannot be read or used: the file (and line or row) and what was expected."""


class ConfigError(UserError, ValueError):
    """Flags, or flags with the data or model they meet, that cannot work: the flag(s) and what was expected."""
