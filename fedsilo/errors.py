"""Errors a user can cause and fix. The CLI prints them as one line, never as a traceback.

Each error carries the exit code the CLI ends with, which tells a supervisor (a Kubernetes Job's
``podFailurePolicy``, ``fedsilo run --restarts``) whether starting again can help:

- :data:`EX_CONFIG` (78, ``sysexits.h``'s EX_CONFIG): a bad setting, unreadable data, a model
  that cannot be loaded, a refused join. The same command would fail the same way: fail at once.
- :data:`EX_RETRY` (1): the federation broke (a lost peer, a timeout, a port still in use). A
  restart forms it again and resumes from the last checkpoint.

A class sets the code of its kind; ``retryable=`` overrides it for one instance whose kind says
otherwise (a join refused because the federation had already formed, say).
"""

from __future__ import annotations

EX_RETRY = 1
EX_CONFIG = 78
# Exit codes that no restart can fix: Click's usage errors (2) and fedsilo's own EX_CONFIG.
PERMANENT_EXIT_CODES = frozenset({2, EX_CONFIG})


def first_line(exc: BaseException) -> str:
    """The first line of an underlying error (at most 200 characters), to quote inside ours."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


class FedsiloError(Exception):
    """An error the user can fix; printed as one line. Permanent (EX_CONFIG) unless a subclass or
    ``retryable=True`` says otherwise."""

    exit_code: int = EX_CONFIG

    def __init__(self, *args: object, retryable: bool | None = None) -> None:
        super().__init__(*args)
        if retryable is not None:
            # An instance attribute: pickled with the exception (BaseException keeps __dict__).
            self.exit_code = EX_RETRY if retryable else EX_CONFIG

    @property
    def retryable(self) -> bool:
        return self.exit_code not in PERMANENT_EXIT_CODES


class ConfigError(FedsiloError):
    """A setting is missing, malformed or contradicts another."""


class DataError(FedsiloError):
    """A dataset cannot be read or does not fit the settings."""


class ModelError(FedsiloError):
    """A model or tokenizer cannot be loaded."""


class FederationError(FedsiloError):
    """The federation cannot form or a member failed during a round: a restart may help."""

    exit_code: int = EX_RETRY


class JoinRefused(FederationError):
    """The aggregator refused this process (wrong token, settings that differ, fingerprint
    mismatch): permanent, unless the refusal was about timing (rank still taken, federation
    already formed) and made with ``retryable=True``."""

    exit_code: int = EX_CONFIG


class CertificateRefused(FederationError):
    """A peer's certificate failed fedsilo's own checks (wrong CA, expired, revoked, wrong role or rank)."""

    exit_code: int = EX_CONFIG
