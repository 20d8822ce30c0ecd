"""Time as the PKI sees it: UTC, whole seconds, one text format, validity windows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from federation.security.pki.errors import PKIError

__all__ = ["CLOCK_SKEW", "check_period", "parse_ts", "ts", "utcnow"]

# Backdate fresh certificates and CRLs slightly so peers with a skewed clock accept them.
CLOCK_SKEW = timedelta(minutes=5)
_TS_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utcnow() -> datetime:
    """Now, in UTC, without microseconds."""
    # X.509 times have one-second resolution; keep Identity values comparable.
    return datetime.now(UTC).replace(microsecond=0)


def ts(moment: datetime) -> str:
    """``moment`` as the PKI writes it in messages and the CA index (``2025-01-31T12:00:00Z``)."""
    return moment.astimezone(UTC).strftime(_TS_FORMAT)


def parse_ts(text: str) -> datetime:
    """The inverse of :func:`ts`."""
    return datetime.strptime(text, _TS_FORMAT).replace(tzinfo=UTC)


def check_period(what: str, not_before: datetime, not_after: datetime, now: datetime, *, hint: str = "") -> None:
    """Refuse ``now`` outside ``[not_before, not_after]``, saying when ``what`` starts or ended."""
    if now < not_before:
        raise PKIError(f"{what} is not valid until {ts(not_before)}{hint}")
    if now > not_after:
        raise PKIError(f"{what} expired at {ts(not_after)}{hint}")
