"""The patient's age at the film, and which rule gave it: Patient's Age, else birth date and study date, else unknown.

The model routes a film by age (children under the package's ``max_age_years`` to the pediatric gate, everyone
else and every film of unknown age to the adult gate), and the outputs say which rule judged the film, so a child's
film read by the adult gate for want of an age is marked as such.

Rules, in order (:func:`read_age`):

1. **Patient's Age** (0010,1010), Age String ``nnnD/W/M/Y``; a bare number is years (the RSNA files carry
   ``"48"``). When the dates give an age it disagrees with (outside one unit of it), Patient's Age still wins and
   :attr:`AgeReading.note` says so.
2. **Patient's Birth Date** (0010,0030) and the first readable date of the study: Study Date, else Series Date,
   Acquisition Date, Content Date. Dates must be ``YYYYMMDD`` and exist. Refused (age unknown): a birth date after
   the study date, and an age over ``MAX_YEARS`` (archives carry placeholder birth dates: the NIH-derived files
   carry 19010101). A 29 February birthday falls on 1 March in a common year (a child born on 29 February 2016 is
   6 on 1 March 2022, not on 28 February: the later day keeps such a child on the pediatric gate one day longer).
3. **Unknown**, with the reason.

Reasons and rules name attributes, never their values (no birth dates in logs or outputs beyond the copied patient
module).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pydicom.dataset import Dataset

RULE_PATIENT_AGE = "PatientAge"
RULE_DATES = "PatientBirthDate and {date}"  # {date}: the study date used (StudyDate, SeriesDate, ...)
STUDY_DATES = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")
#: An age from the dates above this is a placeholder birth date, not an age.
MAX_YEARS = 120.0
AGE_UNITS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
_UNIT_NAMES = {"D": "day", "W": "week", "M": "month", "Y": "year"}


@dataclass(frozen=True)
class AgeReading:
    """The patient's age in years (None = unknown) and the rule that gave it.

    ``rule``: ``"PatientAge"``, ``"PatientBirthDate and StudyDate"`` (or ``SeriesDate`` ...), or
    ``"unknown (<reason>)"``. ``note``: what else was seen (Patient's Age unreadable, or disagreeing with the
    dates), ``""`` when nothing."""

    years: float | None
    rule: str
    note: str = ""

    @property
    def known(self) -> bool:
        return self.years is not None

    @property
    def text(self) -> str:
        """The rule with its note, as the SR states it."""
        return f"{self.rule}; {self.note}" if self.note else self.rule


def age_string_years(value: object) -> tuple[float, str] | None:
    """(years, unit) of an Age String (``"077Y"``, ``"005M"``, ``"48"`` = years); None when empty or unreadable."""
    text = str(value if value is not None else "").strip().upper()
    if not text:
        return None
    unit = text[-1] if text[-1] in AGE_UNITS else "Y"
    digits = text[:-1] if text[-1] in AGE_UNITS else text
    if not digits.isdigit() or len(digits) > 3:
        return None
    return int(digits) * AGE_UNITS[unit], unit


def parse_da(value: object) -> dt.date | None:
    """A DA value ``YYYYMMDD`` as a date; None when absent, not 8 digits, or not a day of the calendar."""
    text = str(value if value is not None else "").strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:  # 20230230, month 13, year 0
        return None


def _birthday(birth: dt.date, year: int) -> dt.date:
    """The birthday in ``year``; 29 February is 1 March in a common year."""
    try:
        return birth.replace(year=year)
    except ValueError:
        return dt.date(year, 3, 1)


def years_between(birth: dt.date, on: dt.date) -> float:
    """Age in years on ``on``: completed years by the calendar, plus the elapsed share of the current year of age
    (so the age crosses a whole number exactly on the birthday). ``on`` must not precede ``birth``."""
    if on < birth:
        raise ValueError("the date precedes the birth date")
    years = on.year - birth.year - (on < _birthday(birth, on.year))
    last = _birthday(birth, birth.year + years) if years else birth
    following = _birthday(birth, birth.year + years + 1)
    return years + (on - last).days / (following - last).days


def _value(ds: Dataset, keyword: str) -> str:
    elem = ds.get(keyword)
    return str(elem if elem is not None else "").strip()


def _from_dates(ds: Dataset) -> tuple[float | None, str]:
    """(years, rule) from the birth date and the study's date, or (None, reason)."""
    raw_birth = _value(ds, "PatientBirthDate")
    if not raw_birth:
        return None, "no PatientBirthDate"
    birth = parse_da(raw_birth)
    if birth is None:
        return None, "PatientBirthDate malformed"
    present = [k for k in STUDY_DATES if _value(ds, k)]
    if not present:
        return None, f"no {', '.join(STUDY_DATES)}"
    readable = [(k, d) for k in present for d in [parse_da(_value(ds, k))] if d is not None]
    if not readable:
        return None, f"{' and '.join(present)} malformed"
    keyword, on = readable[0]
    if on < birth:
        return None, f"PatientBirthDate after {keyword}"
    years = years_between(birth, on)
    if years > MAX_YEARS:
        return None, f"PatientBirthDate a placeholder: over {MAX_YEARS:.0f} years before {keyword}"
    return years, RULE_DATES.format(date=keyword)


def read_age(ds: Dataset) -> AgeReading:
    """The patient's age at the film and the rule that gave it (see the module's docstring)."""
    raw_age = _value(ds, "PatientAge")
    stated = age_string_years(raw_age)
    years, rule = _from_dates(ds)
    if stated is not None:
        age, unit = stated
        note = ""
        if years is not None:
            step = AGE_UNITS[unit]  # Patient's Age counts completed units: the dates' age is in [age, age + step)
            if not age - step <= years < age + 2 * step:
                note = f"disagrees with {rule} (more than one {_UNIT_NAMES[unit]} apart)"
        return AgeReading(age, RULE_PATIENT_AGE, note)
    note = "PatientAge unreadable" if raw_age else ""
    if years is not None:
        return AgeReading(years, rule, note)
    reason = f"{'PatientAge unreadable' if raw_age else 'no PatientAge'}; {rule}"
    return AgeReading(None, f"unknown ({reason})")


#: Said on the overlay, in the GSPS and in the SR of a film the adult gate judged for want of an age.
AGE_UNKNOWN_WARNING = "AGE UNKNOWN: ADULT MODEL; NOT VALIDATED FOR CHILDREN"
