#!/bin/bash
# mmdebstrap customize hook: a venv at /opt/triage/venv in the new root ($1) with the requirement files ($3...)
# installed by Debian's own python3 (so environment markers match the image's interpreter), pip configured as the
# host's pip is ($2: the output of pip-env.py). The local paths that configuration names are bind-mounted
# read-only for the install only and always unmounted again (read-only also keeps a failed build's clean-up of the
# chroot away from the host's files). The project itself is added later as a layer under /opt/triage/app, found
# through a .pth file.
set -euo pipefail
root=$1 pipenv=$2; shift 2
mounted=()
envs=(PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 PIP_NO_CACHE_DIR=1)
cleanup() {
  local i
  for ((i=${#mounted[@]}-1; i>=0; i--)); do umount "${mounted[i]}" || umount -l "${mounted[i]}" || true; done
}
trap cleanup EXIT
while read -r kind val; do
  case "$kind" in
    env) envs+=("$val") ;;
    mount)
      target="$root$val"
      if [ -d "$val" ]; then mkdir -p "$target"; else mkdir -p "$(dirname "$target")"; [ -e "$target" ] || touch "$target"; fi
      mount --bind -o ro "$val" "$target"
      mounted+=("$target")
      ;;
  esac
done < "$pipenv"
reqs=()
for r in "$@"; do
  cp "$r" "$root/tmp/$(basename "$r")"
  reqs+=(-r "/tmp/$(basename "$r")")
done
[ -x "$root/opt/triage/venv/bin/python" ] || chroot "$root" /usr/bin/python3 -m venv /opt/triage/venv
chroot "$root" /usr/bin/env -i "${envs[@]}" /opt/triage/venv/bin/pip install -q --upgrade pip setuptools
chroot "$root" /usr/bin/env -i "${envs[@]}" /opt/triage/venv/bin/pip install -q "${reqs[@]}"
for r in "$@"; do rm -f "$root/tmp/$(basename "$r")"; done
echo /opt/triage/app > "$root/opt/triage/venv/lib/python3.11/site-packages/triage-app.pth"
