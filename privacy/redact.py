"""Recognisers for direct identifiers (names, record numbers, phone numbers, e-mail addresses) and
their redaction from free text before it is stored in training data, explanations or logs.

Phone numbers are found by `phonenumbers` (Google's libphonenumber): valid numbers in the site's
regions and international format, plus any number it considers possible with at least 9 digits,
so fictional ranges (555-0100, 07700 900xxx) are caught while lab values (120/80, 150000) are not.
NHS numbers are checked with python-stdnum's mod-11 check. Record numbers (MRN, hospital or
patient number) are recognised by their label; names by a title (Mr, Dr, ...), a label ("name:",
"patient John Smith") or as known values (a record's own name field, a site's list).

Presidio would add a statistical name recogniser, but it needs a spaCy model that is not on the
package index here; the recognisers above are deterministic and run offline.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import phonenumbers
from stdnum.gb import nhs

__all__ = [
    "DEFAULT_REGIONS",
    "PLACEHOLDERS",
    "Redacted",
    "RedactingFilter",
    "redact",
    "redact_text",
]

DEFAULT_REGIONS: tuple[str, ...] = ("GB", "US", "AU", "DE")
"""Regions whose national formats count as phone numbers (international `+` format always does)."""

PLACEHOLDERS: dict[str, str] = {
    "record_number": "[RECORD-NUMBER]",
    "phone": "[PHONE]",
    "email": "[EMAIL]",
    "name": "[NAME]",
}
_MIN_VALID_DIGITS = 7  # some plans have short valid numbers (German "1645"): as likely a postcode or a count
_MIN_POSSIBLE_DIGITS = 9  # below this a merely "possible" number is as likely a lab value

_NAME_WORD = r"[A-Z](?:[a-z]+|['’][A-Z][a-z]+)(?:-[A-Z][a-z]+)*"  # Smith, O'Neil, Smith-Jones
_TITLED = re.compile(rf"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sir|Dame)\.?\s+(?P<name>{_NAME_WORD}(?:\s+{_NAME_WORD})*)")
_LABELLED_NAME = re.compile(
    rf"\b(?:(?i:name)\s*(?::|is)|(?i:named|called))\s+(?P<name>{_NAME_WORD}(?:\s+{_NAME_WORD})*)"
)
# "patient John Smith": two capitalised words, so "Patient Reports chest pain" is left alone
_PATIENT_NAME = re.compile(rf"\b(?i:patient|pt)\.?\s+(?P<name>{_NAME_WORD}\s+{_NAME_WORD})\b")
_RECORD = re.compile(
    r"\b(?i:MRN|URN|UR\s+(?:number|no\.?)|(?:medical\s+)?record\s+(?:number|no\.?)|"
    r"hospital\s+(?:number|no\.?)|patient\s+(?:id|number|no\.?)|NHS\s+(?:number|no\.?))"
    r"\s*(?:[:#]|is)?\s*(?P<number>[A-Z0-9](?:[A-Z0-9/-]|\s(?=\d))*[0-9][A-Z0-9]*)"
)
_TEN_DIGITS = re.compile(r"(?<![\w.])\d{3}[ -]?\d{3}[ -]?\d{4}(?![\w.])")
_DIGIT_RUN = re.compile(r"\d[\d\s().\-/]*\d")  # digits and the separators phone numbers are written with
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")


@dataclass(frozen=True)
class Redacted:
    """Text with direct identifiers replaced by placeholders, and how many of each kind."""

    text: str
    counts: dict[str, int]


def _spans_names(text: str, names: Iterable[str]) -> list[tuple[int, int, str]]:
    spans = [
        (m.start("name"), m.end("name"), "name")
        for rx in (_TITLED, _LABELLED_NAME, _PATIENT_NAME)
        for m in rx.finditer(text)
    ]
    for name in names:
        for part in {name.strip(), *name.split()}:  # the full name, and each of its words alone
            if len(part) < 2:
                continue
            pattern = re.compile(rf"(?<!\w){re.escape(part)}(?!\w)", re.IGNORECASE)
            spans.extend((m.start(), m.end(), "name") for m in pattern.finditer(text))
    return spans


def _digits(text: str) -> int:
    return sum(ch.isdigit() for ch in text)


def _spans_phones(text: str, regions: Sequence[str]) -> list[tuple[int, int, str]]:
    if not any(_digits(m.group()) >= _MIN_VALID_DIGITS for m in _DIGIT_RUN.finditer(text)):
        return []  # no run of digits long enough to be a number: skip the (slow) matcher
    spans: list[tuple[int, int, str]] = []
    for region in regions:
        for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
            if _digits(m.raw_string) >= _MIN_VALID_DIGITS:
                spans.append((m.start, m.end, "phone"))
        for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.POSSIBLE):
            if _digits(m.raw_string) >= _MIN_POSSIBLE_DIGITS:
                spans.append((m.start, m.end, "phone"))
    return spans


def _spans(text: str, *, names: Iterable[str], regions: Sequence[str]) -> list[tuple[int, int, str]]:
    # Order is priority: a labelled record number is that, though it may also parse as a phone number.
    spans = [(m.start("number"), m.end("number"), "record_number") for m in _RECORD.finditer(text)]
    spans += [(m.start(), m.end(), "record_number") for m in _TEN_DIGITS.finditer(text) if nhs.is_valid(m.group())]
    spans += [(m.start(), m.end(), "email") for m in _EMAIL.finditer(text)]
    spans += _spans_phones(text, regions)
    spans += _spans_names(text, names)
    return spans


def redact(text: str, *, names: Iterable[str] = (), regions: Sequence[str] = DEFAULT_REGIONS) -> Redacted:
    """`text` with every recognised direct identifier replaced by its placeholder (`PLACEHOLDERS`).

    Overlapping finds merge into one placeholder of the kind found first (record numbers, then
    e-mail, phone, names), so no fragment of either is left.
    """
    found = sorted(
        (start, end, rank, kind)
        for rank, (start, end, kind) in enumerate(_spans(text, names=list(names), regions=regions))
        if start < end
    )
    merged: list[tuple[int, int, int, str]] = []  # start, end, rank of the kind kept, kind
    for start, end, rank, kind in found:
        if merged and start < merged[-1][1]:
            m_start, m_end, m_rank, m_kind = merged[-1]
            keep = (rank, kind) if rank < m_rank else (m_rank, m_kind)
            merged[-1] = (m_start, max(m_end, end), *keep)
            continue
        merged.append((start, end, rank, kind))
    counts: Counter[str] = Counter()
    pieces: list[str] = []
    at = 0
    for start, end, _, kind in merged:
        pieces += [text[at:start], PLACEHOLDERS[kind]]
        counts[kind] += 1
        at = end
    pieces.append(text[at:])
    return Redacted(text="".join(pieces), counts=dict(counts))


def redact_text(text: str, *, names: Iterable[str] = (), regions: Sequence[str] = DEFAULT_REGIONS) -> str:
    """Just the redacted text."""
    return redact(text, names=names, regions=regions).text


class RedactingFilter(logging.Filter):
    """A logging filter that redacts direct identifiers from each record's message (its arguments
    merged in first), so an exception that quotes a prompt cannot leave a name in a log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed record: logging reports it itself
            return True
        cleaned = redact_text(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
