#!/bin/sh
# mmdebstrap customize hook: a venv at /opt/triage/venv in the new root ($1) with the requirements ($3) installed
# from the wheelhouse ($2, bind-mounted read-only for the install only); the project itself is added later as a
# layer under /opt/triage/app, found through a .pth file.
set -eu
root=$1 wheels=$2 req=$3
mkdir -p "$root/wheels"
mount --bind -o ro "$wheels" "$root/wheels"
trap 'umount "$root/wheels"; rmdir "$root/wheels"' EXIT
cp "$req" "$root/tmp/requirements.txt"
chroot "$root" python3 -m venv /opt/triage/venv
chroot "$root" /opt/triage/venv/bin/pip install -q --no-cache-dir --no-index --find-links /wheels --upgrade pip setuptools
chroot "$root" /opt/triage/venv/bin/pip install -q --no-cache-dir --no-index --find-links /wheels -r /tmp/requirements.txt
rm -f "$root/tmp/requirements.txt"
echo /opt/triage/app > "$root/opt/triage/venv/lib/python3.11/site-packages/triage-app.pth"
