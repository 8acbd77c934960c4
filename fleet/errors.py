"""The errors users see. Each carries a one-line message and the CLI exit code it maps to."""

from __future__ import annotations

from pydantic import ValidationError


class GPUAgentError(Exception):
    exit_code = 1

    def __str__(self) -> str:
        """One line, whatever the input it quotes (a key or value with a newline in it)."""
        return flat(super().__str__())


def flat(text: str) -> str:
    """Text with control characters escaped, so it prints as one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class InvalidInput(GPUAgentError, ValueError):
    """Bad input of any kind: nothing was changed."""

    exit_code = 2


class MonitoredElsewhere(InvalidInput):
    """Another live process runs this allocation's thread: nothing was done here."""


class ThreadStarting(InvalidInput):
    """Another live request is starting this thread (its name is claimed, nothing of it is
    checkpointed yet): nothing was done here; asking again later sees where it stands."""


class RunStopped(KeyboardInterrupt):
    """A run its caller interrupted (Ctrl-C), naming its thread for the resume that carries
    it on from its last checkpoint; raised in its node, which stops where it slept (nothing
    of its step happened), and again to the caller."""

    def __init__(self, message: str, thread_id: str | None = None) -> None:
        super().__init__(message)
        self.thread_id = thread_id


class ConfigError(InvalidInput):
    """A malformed fleet file."""


class StateDirError(InvalidInput):
    """A missing, unreadable or corrupt state directory."""


class Denied(GPUAgentError):
    """The council, a budget or a quota said no."""

    exit_code = 3


class Forbidden(GPUAgentError):
    """The caller's identity may not do this (another project's, or not their role)."""

    exit_code = 5


class CannotStart(GPUAgentError):
    """A command could not be started on GPUs already placed (exit 127, as a shell says)."""

    exit_code = 127


class Interrupted(GPUAgentError):
    """Interrupted (Ctrl-C) where what it had started was undone, as its message says."""

    exit_code = 130


class NotPlaced(GPUAgentError):
    """The request could not be placed within its maximum wait."""

    exit_code = 4


def one_line(exc: ValidationError, prefix: str = "") -> str:
    """A pydantic error as one readable line: `field: message` of the first problem."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = ".".join(str(part) for part in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    where = f"{loc}: " if loc else ""
    return f"{prefix}{where}{msg}{more}"
