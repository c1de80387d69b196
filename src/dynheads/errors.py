"""One-line errors raised where input enters; the CLI prints them as `error: <message>` and exits 2."""


class DynheadsError(Exception):
    """Base of every error a user can cause; the message is one line that names the problem."""

    exit_code = 2


class ConfigError(DynheadsError):
    """A flag, config file or run folder that does not fit."""


class DataError(DynheadsError):
    """An input file or sample that cannot be used (names the file or sample)."""


class ModelError(DynheadsError):
    """A model that cannot be found or loaded, or that the requested work does not fit."""


class Interrupted(DynheadsError):
    """Ctrl-C during a run; the message says what finished and how to resume."""

    exit_code = 130
