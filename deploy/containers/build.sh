#!/usr/bin/env bash
# Build the project's container images on this machine from its own files; no registry is needed or used.
#
#   deploy/containers/build.sh [--force] [IMAGE ...]      IMAGE: redis orthanc node infer (default: all four)
#
# Images (podman, tagged localhost/triage-<name>:<input hash> and :latest, all run as non-root users):
#   triage-redis     Debian redis-server, user redis, append-only file in /data
#   triage-orthanc   Debian Orthanc + DICOMweb plugin, user orthanc; the demo PACS (config: deploy/containers/orthanc/)
#   triage-node      the node without torch: receiver (`triage-node serve`), report worker, dashboard; user triage
#   triage-infer     triage-node + torch/torchvision: the inference worker (`triage-node worker --queue infer`)
# Base file systems come from mmdebstrap (the host's apt sources) + `podman import`. Python packages are installed
# in the chroot by Debian's python3 with the host pip's configuration (index or mirror, find-links, constraints;
# local paths bind-mounted read-only: pip-env.py, venv-hook.sh), so a machine without a registry builds from what
# its own pip reaches. The model package (models/demo) is copied in; mount another read-only and set
# TRIAGE_MODEL_PATH to use it.
#
# Each image carries the hash of its inputs (label org.triage-node.inputs, and the tag): the files it is made of and
# a recipe version (redis-v1, base-v3, ...: bump it when changing that image's recipe here). An image whose inputs are
# unchanged is not rebuilt, so the first `make test` / `make compose-demo` builds and later runs reuse. The node
# and infer images are a small layer of project files over cached base images (triage-base, triage-base-torch:
# rebuilt only when pyproject.toml or their recipe changes), so a code change rebuilds in seconds.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export CONTAINERS_CONF=${CONTAINERS_CONF:-$HERE/containers.conf}
WORK=${TRIAGE_IMAGE_WORK:-$ROOT/var/containers}
PIP_HOST=${TRIAGE_HOST_PIP:-$ROOT/.venv/bin/pip}
SUITE=bookworm
TARGET_PY=3.11.2   # python3 of bookworm
FORCE=0
log() { echo "build.sh: $*" >&2; }

images=()
for a in "$@"; do
  case "$a" in
    --force) FORCE=1 ;;
    redis|orthanc|node|infer) images+=("$a") ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "unknown image or option: $a" >&2; exit 2 ;;
  esac
done
[ ${#images[@]} -gt 0 ] || images=(redis orthanc node infer)

command -v podman >/dev/null || { echo "podman missing: run deploy/setup.sh (or apt-get install podman runc mmdebstrap)" >&2; exit 3; }
command -v mmdebstrap >/dev/null || { echo "mmdebstrap missing: apt-get install mmdebstrap" >&2; exit 3; }
[ "$(id -u)" = 0 ] || { echo "build.sh runs as root (mmdebstrap root mode, rootful podman)" >&2; exit 3; }
for lim in "n 4096 nofile" "u 8192 nproc"; do
  set -- $lim; hard=$(ulimit -H$1)
  if [ "$hard" != unlimited ] && [ "$hard" -lt "$2" ]; then
    echo "the hard limit $3 here ($hard) is below containers.conf's $3=$2: lower default_ulimits there" >&2; exit 3
  fi
done
mkdir -p "$WORK"

SOURCES=/etc/apt/sources.list.d/debian.sources
[ -e "$SOURCES" ] || SOURCES=/etc/apt/sources.list

hash_files() {  # sha256 over the names and contents of files/dirs (sorted, __pycache__ skipped), plus extra strings
  ( for p in "$@"; do
      if [ -d "$ROOT/$p" ]; then
        (cd "$ROOT" && find "$p" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum)
      elif [ -f "$ROOT/$p" ]; then
        (cd "$ROOT" && sha256sum "$p")
      else
        echo "$p"
      fi
    done ) | sha256sum | cut -c1-16
}

have_image() { [ "$FORCE" = 0 ] && podman image exists "$1"; }

tag_latest() {  # tag $1 as :latest and drop the repository's other (older input hash) tags, so disk use stays flat
  local repo=${1%:*} old
  podman tag "$1" "$repo:latest"
  for old in $(podman images --noheading --format '{{.Repository}}:{{.Tag}}' "$repo"); do
    case "$old" in "$1"|"$repo:latest"|*"<none>"*) ;; *) podman rmi "$old" >/dev/null 2>&1 || true ;; esac
  done
}

# mmdebstrap a trimmed Debian file system and import it as an image. $1 image ref, $2 package list, $3.. hooks
debootstrap_import() {
  local ref=$1 pkgs=$2; shift 2
  local tar="$WORK/${ref##*/}.tar"; tar=${tar/:/-}
  local t0=$SECONDS
  log "mmdebstrap $ref (${pkgs})"
  rm -f "$tar"
  nice -n 10 mmdebstrap --quiet --variant=apt --include="$pkgs" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    "$@" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*.log "$1"/root/.cache' \
    "$SUITE" "$tar" "$SOURCES" 2> >(grep -v -e "is ignored: it is neither a file nor a directory" \
                                           -e "greater than SYS_UID_MAX" >&2) \
    || { log "mmdebstrap failed for $ref"; rm -f "$tar"; exit 1; }
  [ -s "$tar" ] || { log "mmdebstrap produced no $tar"; exit 1; }
  podman import --quiet "${CHANGES[@]}" "$tar" "$ref" >/dev/null
  rm -f "$tar"
  log "$ref imported in $((SECONDS - t0)) s"
}

build_redis() {
  local h ref; h=$(hash_files redis-v1 "$SUITE")
  ref=localhost/triage-redis:$h
  if ! have_image "$ref"; then
    CHANGES=(--change 'USER redis' --change 'WORKDIR /data' --change 'EXPOSE 6379'
             --change "LABEL org.triage-node.inputs=$h"
             --change 'ENTRYPOINT ["/usr/bin/redis-server"]'
             --change 'CMD ["--bind", "0.0.0.0", "--protected-mode", "no", "--dir", "/data", "--appendonly", "yes", "--save", ""]')
    debootstrap_import "$ref" redis-server \
      --customize-hook='mkdir -p "$1/data" && chroot "$1" chown redis:redis /data'
  fi
  tag_latest "$ref"; REF=$ref
}

build_orthanc() {
  local h ref; h=$(hash_files orthanc-v1 "$SUITE" deploy/containers/orthanc)
  ref=localhost/triage-orthanc:$h
  if ! have_image "$ref"; then
    CHANGES=(--change 'USER orthanc' --change 'WORKDIR /var/lib/orthanc' --change 'EXPOSE 4242' --change 'EXPOSE 8042'
             --change "LABEL org.triage-node.inputs=$h"
             --change 'ENTRYPOINT ["/usr/local/bin/orthanc-entrypoint"]')
    debootstrap_import "$ref" orthanc,orthanc-dicomweb,curl \
      --customize-hook='mkdir -p "$1/etc/orthanc/triage"' \
      --customize-hook="copy-in $HERE/orthanc/orthanc.json $HERE/orthanc/autoroute.lua /etc/orthanc/triage/" \
      --customize-hook="copy-in $HERE/orthanc/orthanc-entrypoint /usr/local/bin/" \
      --customize-hook='chmod 0755 "$1/usr/local/bin/orthanc-entrypoint"; rm -f "$1"/etc/orthanc/*.json.dpkg-*' \
      --customize-hook='mkdir -p "$1/var/lib/orthanc/db" && chroot "$1" chown -R orthanc:orthanc /var/lib/orthanc'
  fi
  tag_latest "$ref"; REF=$ref
}

requirements() {  # the project's runtime requirements, torch and torchvision split off (the node image has none)
  "$(dirname "$PIP_HOST")/python" - "$ROOT/pyproject.toml" "$WORK" <<'EOF'
import sys, tomllib, re
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
heavy = [d for d in deps if re.match(r"(torch|torchvision)\b", d)]
light = [d for d in deps if d not in heavy]
open(f"{sys.argv[2]}/requirements-node.txt", "w").write("\n".join(light) + "\n")
open(f"{sys.argv[2]}/requirements-torch.txt", "w").write("\n".join(heavy) + "\n")
EOF
}

pip_env() {  # the host pip's configuration for the build chroot (see pip-env.py)
  "$(dirname "$PIP_HOST")/python" "$HERE/pip-env.py" "$PIP_HOST" > "$WORK/pip-env.txt"
}

base_hash() { hash_files base-v3 "$SUITE" deploy/containers/venv-hook.sh deploy/containers/pip-env.py pyproject.toml; }

# Debian python3 + a venv with requirement files $2.. installed; user triage (uid 10001). $1: image name.
build_python_base() {
  local name=$1 h ref; shift
  h=$(base_hash); ref=localhost/$name:$h
  if ! have_image "$ref"; then
    requirements && pip_env || exit 1
    CHANGES=(--change 'USER triage' --change 'WORKDIR /var/lib/triage-node'
             --change 'ENV PATH=/opt/triage/venv/bin:/usr/local/bin:/usr/bin:/bin'
             --change 'ENV PYTHONUNBUFFERED=1' --change "LABEL org.triage-node.inputs=$h")
    debootstrap_import "$ref" python3,python3-venv,ca-certificates,tzdata \
      --customize-hook="$HERE/venv-hook.sh \"\$1\" $WORK/pip-env.txt $*" \
      --customize-hook='chroot "$1" useradd --system --uid 10001 --user-group --home-dir /var/lib/triage-node --shell /usr/sbin/nologin triage' \
      --customize-hook='mkdir -p "$1/opt/triage/app" "$1"/var/lib/triage-node/spool "$1"/var/lib/triage-node/shared "$1"/var/lib/triage-node/results && chroot "$1" chown -R triage:triage /var/lib/triage-node && chmod 0750 "$1/var/lib/triage-node"'
  fi
  tag_latest "$ref"; REF=$ref
}

build_base() { build_python_base triage-base "$WORK/requirements-node.txt"; }
build_base_torch() { build_python_base triage-base-torch "$WORK/requirements-node.txt" "$WORK/requirements-torch.txt"; }

build_app() {  # $1 image name (node|infer) over the base image in REF: the project's files as one small layer
  local name=$1 base=$REF h ref ctx
  h=$(hash_files app-v1 deploy/containers/Containerfile.app deploy/containers/triage-node \
    deploy/containers/triage-web deploy/containers/triage-health triage_node workers models/demo "$base")
  ref=localhost/triage-$name:$h
  if ! have_image "$ref"; then
    ctx="$WORK/ctx-app"; rm -rf "$ctx"; mkdir -p "$ctx/models" "$ctx/bin"
    cp "$HERE/triage-node" "$HERE/triage-web" "$HERE/triage-health" "$ctx/bin/"
    (cd "$ROOT" && tar --exclude=__pycache__ --exclude='*.pyc' -cf - triage_node workers models/demo) | tar -xf - -C "$ctx"
    podman build --quiet --network none --build-arg "BASE=$base" --label "org.triage-node.inputs=$h" \
      -f "$HERE/Containerfile.app" -t "$ref" "$ctx" >/dev/null || exit 1
    log "$ref built"
  fi
  tag_latest "$ref"; REF=$ref
}

for img in "${images[@]}"; do
  case "$img" in  # each step leaves its image in REF for the next one; any failure exits non-zero
    redis) build_redis ;;
    orthanc) build_orthanc ;;
    node) build_base; build_app node ;;
    infer) build_base_torch; build_app infer ;;
  esac
  echo "$REF"
done
podman image prune -f >/dev/null 2>&1 || true  # images left untagged by a rebuild (--force, a new input hash)
