"""The project's error types: one root, scoped by what was bad."""

from __future__ import annotations


class RuletagError(Exception):
    """Root of every error ruletag raises on purpose."""


class ProtocolError(RuletagError):
    """Something about the forward protocol went wrong."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol: close that connection only."""


class LocalProtocolError(ProtocolError):
    """We misused the codec API: a bug in ruletag, never the peer's fault."""


class AuthenticationError(RemoteProtocolError):
    """The peer failed the shared-key / username-password handshake."""


class ConfigError(RuletagError):
    """A pipeline config is invalid; the message names the key."""


class RuleError(RuletagError):
    """A rule could not be loaded. Carries the file and line it came from."""

    kind = "invalid"

    def __init__(self, reason: str, path: str | None = None, line: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path
        self.line = line

    def __str__(self) -> str:
        where = f"{self.path}:{self.line or 1}: " if self.path else ""
        return f"{where}{self.reason}"


class InvalidRule(RuleError):
    """The rule file is malformed (bad YAML/TOML, syntax error in the query, ...)."""

    kind = "invalid"


class UnsupportedRule(RuleError):
    """The rule is valid but uses something ruletag cannot evaluate (yet)."""

    kind = "unsupported"


class BufferFullError(RuletagError):
    """The durable buffer has reached its size limit: withhold acks, stop reading."""
