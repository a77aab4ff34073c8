"""The exception tree of the agent package: one root, one subclass per kind of failure."""

from pkictl.errors import PKIError

__all__ = ["AgentError", "ConfigError", "RenewalError", "PeerRejected"]


class AgentError(PKIError):
    """Root of every error pki-agent raises on purpose; the message is meant for the operator."""


class ConfigError(AgentError):
    """The agent configuration file is missing, malformed or contradictory."""


class RenewalError(AgentError):
    """A renewal failed; the current credential stays installed and in service."""


class PeerRejected(AgentError):
    """A TLS peer completed the handshake but fails the gateway's authorization rules.

    Attributes:
        reason: a short, stable reason for logs and metrics (e.g. ``wrong purpose``).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
