#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine (run as root): system packages, a venv, the project.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v Orthanc >/dev/null || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v storescu >/dev/null || need+=(dcmtk)
command -v dciodvfy >/dev/null || need+=(dicom3tools)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
command -v openssl >/dev/null || need+=(openssl)
[ -e /usr/share/fonts/truetype/liberation ] || need+=(fonts-liberation)
command -v npm >/dev/null || need+=(nodejs npm)
command -v python3 >/dev/null || need+=(python3 python3-venv)
# containers (deploy/containers/build.sh, deploy/compose.yaml, tests/containers): rootful podman with runc,
# netavark + aardvark-dns (container DNS names), mmdebstrap for base images built here without a registry
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v podman-compose >/dev/null || need+=(podman-compose)
command -v iptables >/dev/null || need+=(iptables)
[ -e /usr/libexec/podman/catatonit ] || need+=(catatonit)
[ -e /usr/lib/podman/netavark ] || need+=(netavark)
[ -e /usr/lib/podman/aardvark-dns ] || need+=(aardvark-dns)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q || true
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi
# The Debian orthanc package starts a system service on 4242/8042 where init allows; we run our own instances.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi
