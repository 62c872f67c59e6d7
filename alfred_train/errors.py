"""User-facing errors. The CLI prints their message on one line and exits with their code."""


class AlfredError(Exception):
    """An error a user can fix; `str(err)` is the whole message."""

    exit_code = 1


class ConfigError(AlfredError, ValueError):
    """Bad configuration or bad input data: names the key (or file:line) and what to change."""

    exit_code = 2
