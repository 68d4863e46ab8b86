"""Ground truth a site provides: a CSV of labels, or HL7 ORU^R01 radiology reports labelled by a keyword rule.

CSV: a header with a key column, ``sop_instance_uid`` or ``accession_number`` (also ``accession``), and ``label``
(0 or 1). Every bad row is named (``truth.csv row 7: label 'maybe' is not 0 or 1``) and left out; the others
are used. A key given twice is an error for every repeat (and the key is dropped when the labels disagree).

ORU^R01: one message per file (``.hl7`` / ``.txt``, MLLP framing or segments separated by CR or LF; a file may
hold several messages, each starting with ``MSH``). Key: the accession number (OBR-3 filler order number, else
OBR-2, else OBR-18) and, when the message carries one, the Study Instance UID (ZDS-1, or an OBX whose identifier
is 113014 or names a Study Instance UID). Text: every OBX-5 of value type TX, FT or ST, and NTE-3. Label: the
keyword rule of :func:`label_report`.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Truth:
    """Labels by key; ``errors`` names every row or message left out and why."""

    by_sop: dict[str, int] = field(default_factory=dict)
    by_accession: dict[str, int] = field(default_factory=dict)
    by_study: dict[str, int] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # key -> "file row N" / "file message N"
    uncertain: set[str] = field(default_factory=set)  # keys labelled positive by an uncertain mention
    errors: list[str] = field(default_factory=list)


def read_csv(path: str | Path, truth: Truth | None = None) -> Truth:
    """Labels from a CSV keyed by SOP Instance UID or Accession Number (see the module docstring)."""
    truth = truth or Truth()
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = {c.strip().lower(): c for c in reader.fieldnames or []}
        key_col = next((cols[c] for c in ("sop_instance_uid", "accession_number", "accession") if c in cols), None)
        if key_col is None or "label" not in cols:
            truth.errors.append(f"{path.name}: header needs a sop_instance_uid or accession_number column and "
                                f"label (found: {', '.join(reader.fieldnames or []) or 'nothing'})")
            return truth
        by_sop = key_col.strip().lower() == "sop_instance_uid"
        target = truth.by_sop if by_sop else truth.by_accession
        first_row: dict[str, int] = {}
        conflicting: set[str] = set()
        for i, row in enumerate(reader, start=2):  # row 1 is the header
            where = f"{path.name} row {i}"
            key = (row.get(key_col) or "").strip()
            raw = (row.get(cols["label"]) or "").strip()
            if not key:
                truth.errors.append(f"{where}: empty {key_col}")
                continue
            if raw not in ("0", "1"):
                truth.errors.append(f"{where}: label {raw!r} is not 0 or 1")
                continue
            if key in first_row:
                same = target[key] == int(raw) if key in target else False
                truth.errors.append(f"{where}: duplicate {key_col} {key} (first at row {first_row[key]}"
                                    f"{'' if same else ', another label: both left out'})")
                if not same:
                    conflicting.add(key)
                continue
            first_row[key] = i
            target[key] = int(raw)
            truth.origin[key] = where
        for key in conflicting:
            target.pop(key, None)
    return truth


# -- HL7 ORU^R01 ---------------------------------------------------------------------------------------------------
TERMS = re.compile(r"\b(broncho)?pneumonias?\b|\bconsolidat(ion|ions|ive|ed)\b|\binfiltrat(e|es|ion)\b|"
                   r"\bair[- ]?space (disease|opacit(y|ies)|opacification)\b", re.I)
#: The finding may be there and must not be missed: counted positive (uncertain), whatever else the clause says.
NOT_EXCLUDED = re.compile(r"\b(can ?not|can't|could not|cannot|not) be (excluded|ruled out)\b|"
                          r"\bnot (excluded|ruled out)\b|\b(can ?not|can't|cannot|could not) (exclude|rule out)\b",
                          re.I)
#: Said of a finding judged improbable: negated.
UNLIKELY = re.compile(r"\b(unlikely|less likely|not likely|improbable)\b", re.I)
#: Hedges: a finding that may be there, counted positive (uncertain) -- a triage tool is judged on sensitivity.
HEDGE = re.compile(r"\b(possible|possibly|probable|probably|likely|suspected|suspicious for|concerning for|"
                   r"may represent|suggestive of|questionable|equivocal|versus|vs|differential)\b", re.I)
PRE_NEGATION = re.compile(r"\b(no|not|without|negative for|free of|absence of|absent|resolution of|resolved|"
                          r"clear of|nor)\b", re.I)
POST_NEGATION = re.compile(r"^\W*(has|have)?\s*(is|are|was|were|been)?\s*(not (seen|identified|present|evident|"
                           r"demonstrated|visible)|absent|resolved|ruled out|excluded)\b", re.I)
#: A clause that states why the film was taken, not what it shows.
INDICATION = re.compile(r"^\W*(indication|history|clinical (history|information|question)|reason( for exam)?|"
                        r"r/o|rule out|evaluate for|assess for|query|\?)", re.I)
CLAUSE_BREAK = re.compile(r"[.;:\n\r]+|\b(but|however|although|though|except)\b", re.I)


def label_report(text: str) -> tuple[int, bool]:
    """(label, uncertain) of a radiology report by the keyword rule.

    A mention is a finding term (pneumonia, bronchopneumonia, consolidation / consolidative, infiltrate /
    infiltration, airspace disease / opacity). The text is cut into clauses at sentence ends and at ``but``,
    ``however``, ``although``, ``except``; a clause stating the indication (``Indication:``, ``rule out``,
    ``evaluate for`` ...) is skipped. Each mention, in this order:

    1. its clause says it cannot be excluded / is not ruled out / "cannot rule out": *uncertain*, counted positive
       ("pneumonia is not excluded" is not a negation);
    2. its clause calls it unlikely / less likely / improbable: *negated*;
    3. a negation cue (no, not, without, negative for, free of, absence of, resolved ...) comes before it in its
       clause, with no hedge between the cue and the mention, or it is followed by "is not seen / absent /
       resolved / excluded": *negated* ("No focal consolidation, effusion or pneumothorax");
    4. a hedge (possible, likely, suspected, suggestive of, versus, differential ...) in its clause: *uncertain*,
       counted positive ("No effusion, possible pneumonia");
    5. else *affirmed*.

    Label 1 when any mention is affirmed or uncertain, 0 otherwise (no mention at all included).
    """
    label, uncertain = 0, False
    for clause in _clauses(text):
        if INDICATION.match(clause):
            continue
        for m in TERMS.finditer(clause):
            before, after = clause[: m.start()], clause[m.end():]
            if NOT_EXCLUDED.search(clause):
                label, uncertain = 1, True
                continue
            if UNLIKELY.search(clause):
                continue
            neg = _last_end(PRE_NEGATION, before)
            hedge = _last_end(HEDGE, before)
            if (neg >= 0 and hedge < neg) or POST_NEGATION.match(after):
                continue
            if hedge >= 0 or HEDGE.search(after):
                label, uncertain = 1, True
                continue
            label = 1
    return label, uncertain and label == 1


def _last_end(rx: re.Pattern, text: str) -> int:
    """End of the last match of ``rx`` in ``text``, -1 without one."""
    ends = [m.end() for m in rx.finditer(text)]
    return ends[-1] if ends else -1


def _clauses(text: str) -> list[str]:
    parts, last = [], 0
    for m in CLAUSE_BREAK.finditer(text):
        parts.append(text[last:m.start()])
        last = m.end()
    parts.append(text[last:])
    return [p.strip() for p in parts if p.strip()]


def split_messages(data: str) -> list[str]:
    """Messages of a file: MLLP frames stripped, segments separated by CR, each message from its MSH."""
    data = data.replace("\x0b", "").replace("\x1c", "\n").replace("\r\n", "\r").replace("\n", "\r")
    chunks = re.split(r"\r(?=MSH\|)", "\r" + data.strip("\r"))
    return [c.strip("\r") for c in chunks if c.strip("\r\n ")]


def parse_oru(message: str) -> dict[str, str | int | bool]:
    """Keys, text and label of one ORU^R01 (raises ValueError naming what is missing or unparseable)."""
    import hl7

    if not message.startswith("MSH|"):
        raise ValueError("does not start with an MSH segment")
    try:
        msg = hl7.parse(message)
        msh = msg.segment("MSH")
    except Exception as exc:
        raise ValueError(f"unparseable HL7 ({type(exc).__name__}: {exc})") from None
    mtype = str(msh[9]) if len(msh) > 9 else ""
    if not mtype.startswith("ORU"):
        raise ValueError(f"message type {mtype or 'missing'!r}, expected ORU^R01")
    accession = study = ""
    texts: list[str] = []
    for seg in msg:
        name = str(seg[0])
        if name == "OBR":
            accession = next((str(seg[i]).split("^")[0] for i in (3, 2, 18) if len(seg) > i and str(seg[i])), "")
        elif name == "ZDS" and len(seg) > 1:
            study = str(seg[1]).split("^")[0]
        elif name == "OBX" and len(seg) > 5:
            ident = str(seg[3])
            if ident.startswith("113014") or "study instance uid" in ident.lower():
                study = str(seg[5]).split("^")[0]
            elif str(seg[2]) in ("TX", "FT", "ST"):
                texts.append(_unescape(str(seg[5])))
        elif name == "NTE" and len(seg) > 3:
            texts.append(_unescape(str(seg[3])))
    if not accession and not study:
        raise ValueError("no accession number (OBR-3/OBR-2/OBR-18) and no Study Instance UID (ZDS-1)")
    if not texts:
        raise ValueError("no report text (OBX of type TX/FT/ST, NTE)")
    text = "\n".join(texts).replace("~", "\n")
    label, uncertain = label_report(text)
    return {"accession": accession, "study_instance_uid": study, "text": text, "label": label,
            "uncertain": uncertain, "control_id": str(msh[10]) if len(msh) > 10 else ""}


def _unescape(v: str) -> str:
    return (v.replace("\\.br\\", "\n").replace("\\F\\", "|").replace("\\S\\", "^").replace("\\T\\", "&")
            .replace("\\R\\", "~").replace("\\E\\", "\\"))


def read_oru_folder(folder: str | Path, truth: Truth | None = None) -> Truth:
    """Labels from every ``*.hl7`` / ``*.txt`` file in ``folder`` (sorted by name); a bad message is named and left
    out, the others used. Later reports of the same accession replace earlier ones (an addendum)."""
    truth = truth or Truth()
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".hl7", ".txt", ".oru"))
    for f in files:
        try:
            messages = split_messages(f.read_text(encoding="utf-8", errors="replace"))
        except OSError as exc:
            truth.errors.append(f"{f.name}: unreadable ({exc.strerror or exc})")
            continue
        if not messages:
            truth.errors.append(f"{f.name}: no HL7 message")
        for i, m in enumerate(messages, start=1):
            where = f"{f.name} message {i}"
            try:
                r = parse_oru(m)
            except ValueError as exc:
                truth.errors.append(f"{where}: {exc}")
                continue
            for key, target in ((r["accession"], truth.by_accession), (r["study_instance_uid"], truth.by_study)):
                if key:
                    target[str(key)] = int(r["label"])
                    truth.origin[str(key)] = where
                    if r["uncertain"]:
                        truth.uncertain.add(str(key))
    return truth
