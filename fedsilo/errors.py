"""Errors a user can cause and fix. The CLI prints them as one line, never as a traceback."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an underlying error (at most 200 characters), to quote inside ours."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


class FedsiloError(Exception):
    """An error the user can fix; printed as one line."""


class ConfigError(FedsiloError):
    """A setting is missing, malformed or contradicts another."""


class DataError(FedsiloError):
    """A dataset cannot be read or does not fit the settings."""


class ModelError(FedsiloError):
    """A model or tokenizer cannot be loaded."""


class FederationError(FedsiloError):
    """The federation cannot form or a member failed during a round."""


class JoinRefused(FederationError):
    """The aggregator refused this process (wrong token, rank taken, fingerprint mismatch)."""


class CertificateRefused(FederationError):
    """A peer's certificate failed fedsilo's own checks (wrong CA, expired, revoked, wrong role or rank)."""
