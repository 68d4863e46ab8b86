"""What `make demo` and `make compose-demo` tell a user to run or open, in one place.

The demos print :func:`render` of these lists; the tests read the printed block back with :func:`parse` and run
every command and open every URL as printed (tests/test_hints.py for `make demo`, tests/containers/test_compose.py
for `make compose-demo`). A hint is one line: a label, then a URL, a path or a shell command line that works when
pasted in the repository's root (a note after it is a shell comment, so the whole line can be pasted too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HEADER = "Where to look:"
WIDTH = 30
COMPOSE_CONF = "CONTAINERS_CONF=deploy/containers/containers.conf"


@dataclass(frozen=True)
class Hint:
    label: str
    text: str  # exactly what is printed: a URL, a path, or a shell command line
    note: str = ""

    @property
    def kind(self) -> str:
        if self.text.startswith(("http://", "https://")):
            return "url"
        return "path" if self.text.startswith("/") and " " not in self.text else "command"


def store_command(port: int, files: str, calling: str = "TRIAGE-DEMO", called: str = "") -> str:
    """DCMTK storescu for the project's films. They are JPEG Baseline, and storescu proposes only uncompressed transfer
    syntaxes unless told, then fails ("unable to convert dataset from 'JPEG Baseline'"): ``-xy`` proposes JPEG
    Baseline first and the uncompressed syntaxes after it, so uncompressed files go as well."""
    return f"storescu -xy -aet {calling}{f' -aec {called}' if called else ''} 127.0.0.1 {port} {files}"


def demo_hints(pacs_url: str, dicomweb_url: str, node_port: int, node_ae: str, work: Path, node_cfg: Path,
               samples: Path) -> list[Hint]:
    """`make demo` (deploy/demo.py): a local Orthanc, the node on ``node_port``; results land in ``work``."""
    return [
        Hint("Orthanc Explorer", f"{pacs_url}/app/explorer.html", "each study now has an SR and an overlay series"),
        Hint("DICOMweb (QIDO-RS)", f"{dicomweb_url}/studies"),
        Hint("PNG previews", f"{work / 'results'}", "one <SOPInstanceUID>/preview.png per film"),
        Hint("audit log", f"{work / 'audit.jsonl'}"),
        Hint("status", f".venv/bin/triage-node status --config {node_cfg}"),
        Hint("send more", store_command(node_port, f"{samples}/*.dcm", calling="ORTHANC", called=node_ae),
             "straight to the node, as the PACS would; results go to Orthanc"),
    ]


def compose_hints(pacs_url: str, dashboard_url: str, password: str, project: str, pacs_dicom_port: int,
                  samples: Path) -> list[Hint]:
    """`make compose-demo` (deploy/compose_demo.py): the compose project ``project`` with its published ports."""
    compose = f"{COMPOSE_CONF} podman-compose -p {project} -f deploy/compose.yaml"
    down = "make compose-down" + ("" if project == "triage" else f" COMPOSE_PROJECT={project}")
    return [
        Hint("Orthanc Explorer (the PACS)", f"{pacs_url}/app/explorer.html"),
        Hint("DICOMweb (QIDO-RS)", f"{pacs_url}/dicom-web/studies"),
        Hint("Dashboard, /metrics, /readyz", f"{dashboard_url}/", f"login admin / $TRIAGE_WEB_PASSWORD ({password})"),
        Hint("Containers", f"{compose} ps"),
        Hint("Receiver log", f"{compose} logs receiver"),
        Hint("Inference workers' logs", f"{compose} logs infer"),
        Hint("Send more", store_command(pacs_dicom_port, f"{samples}/*.dcm"),
             "to the PACS, whose auto-routing sends CR/DX to the node"),
        Hint("Stop", down, f"volumes kept; `{down} VOLUMES=1` drops them"),
    ]


def render(hints: list[Hint]) -> str:
    lines = [HEADER]
    for h in hints:
        note = f"   # {h.note}" if h.note else ""
        lines.append(f"  {h.label:{WIDTH}} {h.text}{note}")
    return "\n".join(lines) + "\n"


def parse(output: str) -> list[Hint]:
    """The hints as printed in ``output`` (the block :func:`render` wrote), for tests to run them as printed."""
    block = output.split(HEADER + "\n", 1)[1].split("\n\n", 1)[0]
    hints = []
    for line in block.splitlines():
        label, rest = line[2:2 + WIDTH].strip(), line[3 + WIDTH:]
        text, _, note = rest.partition("   # ")
        hints.append(Hint(label, text.strip(), note.strip()))
    return hints
