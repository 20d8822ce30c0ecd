"""Direct identifiers (names, record numbers, phone numbers) redacted; clinical text untouched (privacy.redact)."""

from __future__ import annotations

import logging

import pytest

from privacy.redact import RedactingFilter, redact, redact_text


@pytest.mark.parametrize(
    "number",
    [
        "020 7946 0958",  # UK national
        "+44 20 7946 0958",  # international
        "(202) 555-0143",  # US, brackets
        "202-555-0143",
        "555.123.4567",  # a fictional range: only "possible", caught by its 10 digits
        "+1-202-555-0143",
        "07911 123456",  # UK mobile
        "+61 412 345 678",  # Australian mobile
    ],
)
def test_phone_numbers_in_several_formats_are_redacted(number: str) -> None:
    result = redact(f"Daughter can be reached on {number} after 5pm.")
    assert result.text == "Daughter can be reached on [PHONE] after 5pm."
    assert result.counts == {"phone": 1}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("MRN 12345678, seen today", "MRN [RECORD-NUMBER], seen today"),
        ("MRN: A1234567", "MRN: [RECORD-NUMBER]"),
        ("mrn#00123-45 admitted", "mrn#[RECORD-NUMBER] admitted"),
        ("Hospital no. 00123456.", "Hospital no. [RECORD-NUMBER]."),
        ("patient ID is RX7781234", "patient ID is [RECORD-NUMBER]"),
        ("NHS number 943 476 5919", "NHS number [RECORD-NUMBER]"),
        ("Seen, 9434765919 on file", "Seen, [RECORD-NUMBER] on file"),  # an NHS number by its checksum alone
    ],
)
def test_record_numbers_are_redacted(text: str, expected: str) -> None:
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Mr John Smith reports chest pain", "Mr [NAME] reports chest pain"),
        ("Referred by Dr. Patel", "Referred by Dr. [NAME]"),
        ("Name: Ada Lovelace. Wheeze.", "Name: [NAME]. Wheeze."),
        ("patient Jane Doe presents", "patient [NAME] presents"),
        ("Her name is Maria O'Neil.", "Her name is [NAME]."),
    ],
)
def test_names_are_redacted_by_title_or_label(text: str, expected: str) -> None:
    assert redact_text(text) == expected


def test_a_known_name_is_redacted_wherever_it_appears() -> None:
    text = "Anna Kowalski, 54. Kowalski reports palpitations; anna has no allergies."
    result = redact(text, names=["Anna Kowalski"])
    assert "Kowalski" not in result.text and "anna" not in result.text.lower()
    assert result.text.endswith("reports palpitations; [NAME] has no allergies.")


def test_everything_at_once_leaves_nothing_behind() -> None:
    text = "Mrs Grace Hopper (MRN 00991234), tel 020 7946 0958, email grace@example.org; BP 150/95."
    result = redact(text)
    assert result.text == "Mrs [NAME] (MRN [RECORD-NUMBER]), tel [PHONE], email [EMAIL]; BP 150/95."
    assert result.counts == {"name": 1, "record_number": 1, "phone": 1, "email": 1}


@pytest.mark.parametrize(
    "text",
    [
        "Patient Reports chest pain radiating to the left arm.",
        "HbA1c 10.2%, blood glucose 25 mmol/L, oxygen saturation 89% on room air.",
        "BP 120/80, pulse 110, platelets 150000, WCC 11.2, troponin 0.45 ng/mL.",
        "ST elevation on ECG; TSH suppressed with tremor; GCS 15/15.",
        "Metformin 500 mg twice daily since 2019; follow-up in 6 weeks.",
        "54-year-old female, postcode 1234.",
    ],
)
def test_clinical_text_is_untouched(text: str) -> None:
    assert redact(text).counts == {} and redact_text(text) == text


def test_the_log_filter_redacts_messages_and_their_arguments(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("fedseek.test.redact")
    caplog.handler.addFilter(RedactingFilter())
    with caplog.at_level(logging.INFO, logger="fedseek.test.redact"):
        log.info("explanation failed for %s: prompt %r", "Mr John Smith", "call 020 7946 0958, MRN 12345678")
    message = caplog.records[-1].getMessage()
    assert "Smith" not in message and "7946" not in message and "12345678" not in message
    assert message.startswith("explanation failed for Mr [NAME]: prompt")
