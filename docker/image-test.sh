#!/usr/bin/env bash
# Builds the CPU image the way users build it (docker/Dockerfile, through the air-gapped path
# docker/build-offline, so `--network none`) and checks it running:
#   healthy by its own HEALTHCHECK on a non-default port; /detect equal to the native binary's
#   answer (same weights, same precision); gRPC health SERVING; the server's uid is not 0;
#   `--read-only` root filesystem with the cache volume (the server writes its precision trial
#   there); `docker stop` during a request answers it (200) and exits 0; image size at most
#   1.2 GB.
#
# Where no Docker engine is reachable, starts one from Debian's docker.io package
# (`dockerd --iptables=false --bridge=none`: no change to the host's network; containers and
# builds use the host's network or none), its data root under target/docker-test/engine,
# stopped and removed at the end, as is what build-offline prepared in docker/offline/
# (DOCKER_TEST_KEEP=1 keeps both, and the engine's build cache, for a faster rerun). Base
# images that the engine has not and cannot pull are made locally (docker/base-images.sh:
# debootstrap, and this machine's Rust toolchain).
#
# Needs scripts/setup (.venv: seeded weights, images, grpcio is added on first use) and a built
# binary: target/release/detectd, or DETECTD_BIN. Runs as root (dockerd), or with sudo.
# Last line: `image-test: passed (...)`; exit status non-zero when a check fails.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${DETECTD_BIN:-$ROOT/target/release/detectd}
PY=$ROOT/.venv/bin/python
WORK=$ROOT/target/docker-test
TAG=detectd:image-test
NAME=detectd-image-test
VOLUME=detectd-image-test-cache
MAX_IMAGE_BYTES=1200000000

log() { echo "image-test: $*"; }
die() { echo "image-test: ERROR $*" >&2; exit 1; }

dockerd_pid= native_pid= policy_rc_created=0 owns_offline=0
OFFLINE=$ROOT/docker/offline
# The engine's mounts under DIR (field 2 of /proc/mounts), deepest first.
mounts_under() { awk -v p="$1/" 'index($2, p) == 1 { print $2 }' /proc/mounts | sort -r; }
DOCKER=${DOCKER:-docker}
cleanup() {
  local status=$?
  set +e
  [ -n "$native_pid" ] && kill "$native_pid" 2>/dev/null
  if "$DOCKER" info >/dev/null 2>&1; then
    if [ "$status" != 0 ] && "$DOCKER" inspect "$NAME" >/dev/null 2>&1; then
      "$DOCKER" logs "$NAME" >"$WORK/container.log" 2>&1
      echo "image-test: container log in $WORK/container.log" >&2
    fi
    "$DOCKER" rm -f "$NAME" >/dev/null 2>&1
    "$DOCKER" volume rm -f "$VOLUME" >/dev/null 2>&1
  fi
  if [ -n "$dockerd_pid" ]; then
    kill "$dockerd_pid" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$dockerd_pid" 2>/dev/null
    # dockerd started containerd itself; a hard-killed dockerd leaves it behind.
    pkill -f "containerd --config $WORK/engine/" 2>/dev/null
    if [ "${DOCKER_TEST_KEEP:-0}" != 1 ]; then
      # Leftover mounts (a dockerd killed hard) must go before the folder can.
      mounts_under "$WORK/engine" | xargs -r -n1 umount -l
      rm -rf "$WORK/engine"
    fi
  fi
  [ "$policy_rc_created" = 1 ] && rm -f /usr/sbin/policy-rc.d
  # What this test prepared (never a folder someone else filled): a filled docker/offline/
  # makes every later `docker build` of this checkout an offline one, which a changed
  # Cargo.lock would then fail.
  if [ "$owns_offline" = 1 ] && [ "${DOCKER_TEST_KEEP:-0}" != 1 ]; then
    find "$OFFLINE" -mindepth 1 -maxdepth 1 ! -name README.md ! -name .gitignore -exec rm -rf {} +
  fi
  return "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ -x "$BIN" ] || die "no detectd binary at $BIN (cargo build --release, or set DETECTD_BIN)"
[ -x "$PY" ] || die "no $PY (run scripts/setup)"
# sudo's secure_path would drop ~/.cargo/bin (cargo vendor, rustc).
[ "$(id -u)" = 0 ] || exec sudo -E env "PATH=$PATH" "$0" "$@"
# docker/offline/ filled by someone else (build-offline --prepare-only, to carry across an air
# gap) is theirs: this test would overwrite it, then empty it.
if [ ! -e "$OFFLINE/.image-test" ] \
  && [ -n "$(find "$OFFLINE" -mindepth 1 -maxdepth 1 ! -name README.md ! -name .gitignore)" ]; then
  die "docker/offline/ holds a prepared build; move it aside first"
fi
export PATH=$PATH:/usr/sbin:/sbin
mkdir -p "$WORK"
t_start=$SECONDS
# Free space where the engine's data root goes: the test from nothing used ~9 GB at its peak
# (measured with `df`: base images, docker/offline/, the build context, the toolchain layer
# with torch, the cargo target cache, the image). Below NEED_GB it fails now, saying so,
# rather than half an hour in with "No space left on device".
NEED_GB=${IMAGE_TEST_NEED_GB:-10}
free_gb() { df -P -BG "$WORK" | awk 'NR == 2 { sub("G", "", $4); print $4 }'; }
free=$(free_gb)
log "$free GB free under $WORK (needs about $NEED_GB)"
[ "$free" -ge "$NEED_GB" ] \
  || die "$free GB free under $WORK, the image test needs about $NEED_GB (IMAGE_TEST_NEED_GB)"

# --- the engine ---------------------------------------------------------------------------
install_debs() {
  log "installing $* from Debian's packages"
  # Keep the engine's service from starting on its own: this script starts its own instance.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    policy_rc_created=1
  fi
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
if "$DOCKER" info >/dev/null 2>&1; then
  log "using the running engine ($("$DOCKER" version -f '{{.Server.Version}}'))"
else
  need=()
  command -v dockerd >/dev/null || need+=(docker.io)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  [ "${#need[@]}" = 0 ] || install_debs "${need[@]}"
  engine=$WORK/engine
  # A data root kept by DOCKER_TEST_KEEP=1 (its build cache) is reused; mounts an earlier
  # run left behind are released either way.
  mounts_under "$engine" | xargs -r -n1 umount -l
  if [ "${DOCKER_TEST_KEEP:-0}" != 1 ]; then
    rm -rf "$engine"
  fi
  rm -rf "$engine/exec"
  mkdir -p "$engine/root" "$engine/exec"
  dockerd --iptables=false --ip6tables=false --bridge=none \
    --data-root "$engine/root" --exec-root "$engine/exec" --pidfile "$engine/dockerd.pid" \
    --host "unix://$engine/docker.sock" >"$engine/dockerd.log" 2>&1 &
  dockerd_pid=$!
  export DOCKER_HOST=unix://$engine/docker.sock
  # Debian's client, the engine's own version: its built-in BuildKit client needs no buildx
  # plugin, which a newer client without one would ask for.
  DOCKER=/usr/bin/docker
  for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 0.5; done
  "$DOCKER" info >/dev/null 2>&1 || { tail -20 "$engine/dockerd.log" >&2; die "dockerd did not start"; }
  log "started dockerd $("$DOCKER" version -f '{{.Server.Version}}') (data root $engine/root)"
fi
export DOCKER
command -v curl >/dev/null || install_debs curl

# --- base images, then the image through the air-gapped path ---------------------------
t0=$SECONDS
"$ROOT/docker/base-images.sh" "$WORK/base"
# Our own engine: the base images' build context (the Rust toolchain) is not needed again.
[ -z "$dockerd_pid" ] || "$DOCKER" builder prune -af >/dev/null
log "base images ready in $((SECONDS - t0)) s"
t0=$SECONDS
owns_offline=1
touch "$OFFLINE/.image-test"
"$ROOT/docker/build-offline" --prepare-only
prepare_s=$((SECONDS - t0))
t0=$SECONDS
"$ROOT/docker/build-offline" --build-only --tag "$TAG" >"$WORK/build.log" 2>&1 \
  || { tail -30 "$WORK/build.log" >&2; die "docker build failed (whole log: $WORK/build.log)"; }
build_s=$((SECONDS - t0))
log "$(free_gb) GB free under $WORK after the build"
size=$("$DOCKER" image inspect -f '{{.Size}}' "$TAG")
log "image $TAG: $((size / 1000000)) MB; prepared in ${prepare_s} s, built with --network none in ${build_s} s"
[ "$size" -le "$MAX_IMAGE_BYTES" ] || die "image is $size bytes, over $MAX_IMAGE_BYTES"

# --- seeded weights and a test image (cached) ---------------------------------------------
cd "$ROOT"
data=$WORK/data
mkdir -p "$data"
if [ ! -s "$data/detector.pth" ]; then
  "$PY" tests/support/tvref.py make-detector --arch v1 --seed 0 --weights "$data/detector.pth.tmp"
  mv "$data/detector.pth.tmp" "$data/detector.pth"
fi
[ -s "$data/photo.png" ] || "$PY" tests/support/tvref.py images --out-dir "$data" photo.png:480x640:RGB
"$PY" -c 'import grpc_health' 2>/dev/null \
  || "$PY" -m pip install -q --disable-pip-version-check grpcio grpcio-health-checking
# Two distinct free ports, neither the image's default 8080 (both sockets open while asked).
read -r http_port grpc_port < <("$PY" -c '
import socket
socks = []
while len(socks) < 2:
    s = socket.socket(); s.bind(("127.0.0.1", 0))
    if s.getsockname()[1] != 8080: socks.append(s)
print(*(s.getsockname()[1] for s in socks))')
[ -n "$grpc_port" ] || die "no free ports"

# --- the container: read-only root, cache volume, non-default ports ------------------------
# The host's network (the engine has no bridge); `auto` precision, the serving default, runs
# its trial and writes its decision into the cache volume: the one writable place.
"$DOCKER" volume rm -f "$VOLUME" >/dev/null 2>&1 || true
"$DOCKER" rm -f "$NAME" >/dev/null 2>&1 || true
"$DOCKER" run -d --name "$NAME" --network host --read-only \
  -v "$VOLUME:/var/cache/detectd" -v "$data:/weights:ro" \
  -e DETECTD_LISTEN="127.0.0.1:$http_port" -e DETECTD_GRPC_ADDR="127.0.0.1:$grpc_port" \
  -e DETECTD_DETECTOR_WEIGHTS=/weights/detector.pth \
  "$TAG" >/dev/null
t0=$SECONDS
health=
for _ in $(seq 240); do
  health=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$NAME")
  [ "$health" = healthy ] && break
  [ "$("$DOCKER" inspect -f '{{.State.Running}}' "$NAME")" = true ] || die "container exited at start"
  sleep 1
done
[ "$health" = healthy ] || die "container not healthy after 240 s (health: $health)"
log "healthy by its own HEALTHCHECK (detectd healthcheck) on port $http_port after $((SECONDS - t0)) s"
served=http://127.0.0.1:$http_port
for _ in $(seq 300); do curl -fsS -o /dev/null "$served/readyz" 2>/dev/null && break; sleep 1; done
curl -fsS -o /dev/null "$served/readyz" || die "container not ready after 300 s"
# compose's readiness check, run where compose runs it: inside the container.
"$DOCKER" exec "$NAME" detectd healthcheck --ready || die "detectd healthcheck --ready failed in the container"

pid=$("$DOCKER" inspect -f '{{.State.Pid}}' "$NAME")
uid=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status")
user=$("$DOCKER" image inspect -f '{{.Config.User}}' "$TAG")
[ -n "$uid" ] && [ "$uid" != 0 ] && [ "$uid" = "${user%%:*}" ] \
  || die "the server runs as uid '$uid', the image's USER is '$user'"
log "server runs as uid $uid (the image's USER $user), root filesystem read-only"
decision=$("$DOCKER" run --rm -v "$VOLUME:/cache:ro" --entrypoint sh "$TAG" -c 'ls /cache/precision/*.json')
precision=$(curl -fsS "$served/v1/models" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["models"][0]["precision"])')
log "auto chose $precision; its decision written to the cache volume: $decision"

# --- the native binary, same weights and precision: the same answer -------------------------
"$BIN" serve --listen 127.0.0.1:0 --detector-weights "$data/detector.pth" --precision "$precision" \
  --warmup-images 1 >"$WORK/native.out" 2>"$WORK/native.log" &
native_pid=$!
native=
for _ in $(seq 600); do
  native=$(sed -n 's|^detectd listening on ||p' "$WORK/native.out")
  [ -n "$native" ] && break
  kill -0 "$native_pid" 2>/dev/null || { tail -5 "$WORK/native.log" >&2; die "native binary exited"; }
  sleep 0.1
done
[ -n "$native" ] || die "the native binary printed no address in 60 s"
for _ in $(seq 300); do curl -fsS -o /dev/null "$native/readyz" 2>/dev/null && break; sleep 1; done
curl -fsS -o /dev/null "$native/readyz" || die "the native binary not ready after 300 s"
"$PY" docker/image_check.py detect --served "$served" --native "$native" --image "$data/photo.png"
kill "$native_pid" && wait "$native_pid" 2>/dev/null || true
native_pid=

"$PY" docker/image_check.py grpc --addr "127.0.0.1:$grpc_port"
"$PY" docker/image_check.py stop --served "$served" --image "$data/photo.png" \
  --docker "$DOCKER" --container "$NAME"

log "passed (image $((size / 1000000)) MB, build ${build_s} s, whole test $((SECONDS - t_start)) s)"
