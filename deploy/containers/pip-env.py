"""Print the host pip's configuration for a build chroot: ``env NAME=VALUE`` lines (PIP_* variables equivalent to the
host's pip config files and environment) and ``mount PATH`` lines (local paths those settings name: find-links
folders, file:// indexes with the folder above their ``simple/``, constraint files), so pip inside the chroot reaches
exactly what the host's pip reaches (a PyPI mirror, a local index, a wheel folder) with Debian's own interpreter.

    python pip-env.py PIP          (PIP: the host's pip executable)
"""

import os
import subprocess
import sys

pip = sys.argv[1]
out = subprocess.run([pip, "config", "list"], capture_output=True, text=True, check=True).stdout
settings: dict[str, str] = {}
for line in out.splitlines():
    key, _, value = line.partition("=")
    section, _, name = key.rpartition(".")
    if section in ("global", ":env:", "install", "download") and name:
        settings[name] = value.strip().strip("'\"")
for var, value in os.environ.items():
    if var.startswith("PIP_") and var not in ("PIP_CONFIG_FILE", "PIP_REQUIRE_VIRTUALENV"):
        settings[var[4:].lower().replace("_", "-")] = value
mounts: set[str] = set()
for name, value in settings.items():
    if name in ("cache-dir", "target", "prefix", "root", "src", "log"):
        continue
    print(f"env PIP_{name.upper().replace('-', '_')}={value}")
    for token in value.split():
        path = token[7:] if token.startswith("file://") else token
        if not path.startswith("/") or not os.path.exists(path):
            continue
        path = os.path.realpath(path)
        if os.path.isdir(path) and os.path.basename(path.rstrip("/")) == "simple":
            path = os.path.dirname(path)  # an index's pages link to ../../files/...
        mounts.add(path)
for path in sorted(mounts):
    print(f"mount {path}")
