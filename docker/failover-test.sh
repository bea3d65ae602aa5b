#!/usr/bin/env bash
# Proves the compose topology without containers: 3 detectd replicas on 127.0.0.1 behind nginx
# configured from docker/nginx/detectd.conf (only the addresses changed), scraped by Prometheus
# configured from docker/prometheus/prometheus.yml (only addresses and intervals changed).
# A few hundred image requests go through nginx, several at a time; mid-load one replica is
# SIGKILLed and another SIGTERMed (it drains). Every request must still succeed.
#
# Also checked: nginx did retry (else the kills proved nothing), the drained replica exited 0,
# Prometheus scraped every replica while it lived and sees the dead ones as down, every query
# of the Grafana dashboard returns data, `promtool check metrics` accepts /metrics and
# `promtool check config` the compose Prometheus config.
#
# Needs scripts/setup (the venv makes the seeded random weights and images) and a built
# binary: target/release/detectd, or DETECTD_BIN. Installs nginx, prometheus (with promtool)
# and curl from Debian's packages when missing (as root; sudo otherwise). Seeded weights and
# images are cached in target/failover/; each run's logs and configs are in
# target/failover/run/ (kept for a look after a failure).
#
# Last line: `failover: N requests, F failed`; exit status non-zero when F > 0 or a check fails.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${DETECTD_BIN:-$ROOT/target/release/detectd}
PY=$ROOT/.venv/bin/python
CACHE=$ROOT/target/failover
RUN=$CACHE/run
REQUESTS=${FAILOVER_REQUESTS:-300}
CONCURRENCY=${FAILOVER_CONCURRENCY:-8}

log() { echo "failover: $*"; }
die() { echo "failover: ERROR $*" >&2; exit 1; }

pids=()
sudo=()
[ "$(id -u)" = 0 ] || sudo=(sudo)
policy_rc_created=0
summary_printed=0
cleanup() {
  local status=$?
  # Only what this script started, by pid.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.5
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  if [ "$policy_rc_created" = 1 ]; then "${sudo[@]}" rm -f /usr/sbin/policy-rc.d; fi
  # After the summary line nothing more is printed: it must stay the last line.
  if [ "$status" != 0 ] && [ "$summary_printed" = 0 ] && [ -d "$RUN" ]; then
    echo "failover: logs in $RUN" >&2
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ -x "$BIN" ] || die "no detectd binary at $BIN (cargo build --release, or set DETECTD_BIN)"
[ -x "$PY" ] || die "no $PY (run scripts/setup)"

# --- tools -------------------------------------------------------------------------------
export PATH=$PATH:/usr/sbin:/sbin
need=()
command -v nginx >/dev/null || need+=(nginx)
command -v prometheus >/dev/null || need+=(prometheus)
command -v promtool >/dev/null || need+=(prometheus)
command -v curl >/dev/null || need+=(curl)
if [ "${#need[@]}" -gt 0 ]; then
  log "installing ${need[*]} from Debian's packages"
  # Keep the packages' services from starting: their default ports (80, 9090) may be taken,
  # which would fail the install, and this test starts its own instances anyway.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${sudo[@]}" chmod +x /usr/sbin/policy-rc.d
    policy_rc_created=1
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
  # shellcheck disable=SC2046
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
  if [ "$policy_rc_created" = 1 ]; then "${sudo[@]}" rm -f /usr/sbin/policy-rc.d; policy_rc_created=0; fi
fi
log "$(nginx -v 2>&1), $(prometheus --version 2>&1 | head -1)"

# --- seeded random weights and test images (cached) --------------------------------------
mkdir -p "$CACHE"
cd "$ROOT"
if [ ! -s "$CACHE/detector.pth" ]; then
  "$PY" tests/support/tvref.py make-detector --arch v1 --seed 0 --weights "$CACHE/detector.pth.tmp"
  mv "$CACHE/detector.pth.tmp" "$CACHE/detector.pth"
fi
if [ ! -s "$CACHE/classifier.pth" ]; then
  "$PY" tests/support/tvref.py make-classifier --seed 0 --weights "$CACHE/classifier.pth.tmp"
  mv "$CACHE/classifier.pth.tmp" "$CACHE/classifier.pth"
fi
# Bodies of realistic sizes: ~120 KB (224x224) and ~1.8 MB (1024x768, over nginx's 1 MB
# in-memory body buffer, so replays come from its temp file). /detect gets skinny 40x1000
# images, which the detector resizes to ~53x1333: ~1 s each, not the ~3 s of a photo.
if [ ! -s "$CACHE/img/small.png" ] || [ ! -s "$CACHE/img/large.png" ] || [ ! -s "$CACHE/img/skinny.png" ]; then
  mkdir -p "$CACHE/img"
  "$PY" tests/support/tvref.py images --out-dir "$CACHE/img" \
    small.png:224x224:RGB large.png:768x1024:RGB skinny.png:40x1000:RGB
fi

rm -rf "$RUN"
mkdir -p "$RUN"
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- 3 replicas --------------------------------------------------------------------------
# One libtorch thread each (3 replicas share this machine's cores); a warm-up of one image;
# port 0 (the kernel picks a free port, detectd prints it).
start_s=$(date +%s)
t0=$SECONDS
# Each replica runs under a small subshell that records its exit status in replica-N.status:
# the test reads how each one ended, and bash prints no "Killed" job notice into the output.
for i in 1 2 3; do
  (
    "$BIN" serve --listen 127.0.0.1:0 \
      --detector-weights "$CACHE/detector.pth" --classifier-weights "$CACHE/classifier.pth" \
      --threads 1 --warmup-images 1 --shutdown-timeout-s 30 \
      >"$RUN/replica-$i.out" 2>"$RUN/replica-$i.log" &
    echo $! >"$RUN/replica-$i.pid"
    status=0
    wait $! || status=$?
    echo "$status" >"$RUN/replica-$i.status"
  ) 2>/dev/null &
  pids+=($!)
done
for i in 1 2 3; do
  for _ in $(seq 100); do [ -s "$RUN/replica-$i.pid" ] && break; sleep 0.05; done
  pid=$(cat "$RUN/replica-$i.pid")
  pids+=("$pid")
  eval "pid_$i=$pid"
done
for i in 1 2 3; do
  pid_var=pid_$i
  addr=
  for _ in $(seq 600); do
    addr=$(sed -n 's|^detectd listening on http://||p' "$RUN/replica-$i.out")
    [ -n "$addr" ] && break
    kill -0 "${!pid_var}" 2>/dev/null || { tail -5 "$RUN/replica-$i.log" >&2; die "replica $i exited at start"; }
    sleep 0.1
  done
  [ -n "$addr" ] || die "replica $i printed no listening line"
  eval "addr_$i=$addr"
done
for i in 1 2 3; do
  addr_var=addr_$i pid_var=pid_$i
  for _ in $(seq 300); do
    curl -fsS -o /dev/null "http://${!addr_var}/readyz" 2>/dev/null && break
    kill -0 "${!pid_var}" 2>/dev/null || { tail -5 "$RUN/replica-$i.log" >&2; die "replica $i exited while loading"; }
    sleep 1
  done
  curl -fsS -o /dev/null "http://${!addr_var}/readyz" || die "replica $i not ready after 300 s"
done
# shellcheck disable=SC2154
log "replicas ready in $((SECONDS - t0)) s: $addr_1 (pid $pid_1), $addr_2 (pid $pid_2), $addr_3 (pid $pid_3)"

# --- nginx: the compose file's config, addresses substituted -------------------------------
lb_port=$(free_port)
sed -e "s/detectd-1:8080/$addr_1/; s/detectd-2:8080/$addr_2/; s/detectd-3:8080/$addr_3/" \
    -e "s/^\(\s*listen\s\+\)8080;/\1127.0.0.1:$lb_port;/" \
    -e 's/ resolve;/;/' \
    "$ROOT/docker/nginx/detectd.conf" >"$RUN/detectd.conf"
# The substitution must have caught every address: no compose host name may be left.
if sed 's/#.*//' "$RUN/detectd.conf" | grep -n 'detectd-[0-9]:\|listen 8080\| resolve;'; then
  die "nginx config not fully rendered"
fi
mkdir -p "$RUN/nginx-tmp"
cat >"$RUN/nginx.conf" <<EOF
# Stands in for the nginx image's /etc/nginx/nginx.conf; the upstream, retry and timeout
# settings all come from docker/nginx/detectd.conf, included as compose mounts it.
daemon off;
worker_processes 1;
pid $RUN/nginx.pid;
error_log $RUN/nginx-error.log notice;
events { worker_connections 512; }
http {
    client_body_temp_path $RUN/nginx-tmp/body;
    proxy_temp_path $RUN/nginx-tmp/proxy;
    fastcgi_temp_path $RUN/nginx-tmp/fastcgi;
    uwsgi_temp_path $RUN/nginx-tmp/uwsgi;
    scgi_temp_path $RUN/nginx-tmp/scgi;
    include $RUN/detectd.conf;
}
EOF
nginx -t -q -e "$RUN/nginx-error.log" -p "$RUN" -c "$RUN/nginx.conf"
nginx -e "$RUN/nginx-error.log" -p "$RUN" -c "$RUN/nginx.conf" >"$RUN/nginx-access.log" 2>>"$RUN/nginx-error.log" &
pids+=($!)
for _ in $(seq 50); do
  curl -fsS -o /dev/null "http://127.0.0.1:$lb_port/healthz" 2>/dev/null && break
  sleep 0.1
done
curl -fsS -o /dev/null "http://127.0.0.1:$lb_port/healthz" || die "nginx does not answer"

# --- Prometheus: the compose file's config, targets and intervals substituted ---------------
promtool check config "$ROOT/docker/prometheus/prometheus.yml" >/dev/null \
  || die "promtool rejects docker/prometheus/prometheus.yml"
prom_port=$(free_port)
sed -e "s/detectd-1:8080/$addr_1/; s/detectd-2:8080/$addr_2/; s/detectd-3:8080/$addr_3/" \
    -e 's/\(scrape_interval\|evaluation_interval\): 15s/\1: 1s/' \
    "$ROOT/docker/prometheus/prometheus.yml" >"$RUN/prometheus.yml"
if sed 's/#.*//' "$RUN/prometheus.yml" | grep -n 'detectd-[0-9]:\|15s'; then die "prometheus config not fully rendered"; fi
promtool check config "$RUN/prometheus.yml" >/dev/null
prometheus --config.file="$RUN/prometheus.yml" --storage.tsdb.path="$RUN/prometheus-data" \
  --web.listen-address="127.0.0.1:$prom_port" >"$RUN/prometheus.log" 2>&1 &
pids+=($!)
prom=http://127.0.0.1:$prom_port
# Wait until all three replicas have been scraped, so that the kills happen after Prometheus
# has seen them alive.
for _ in $(seq 60); do
  n=$(curl -fsS "$prom/api/v1/query" --data-urlencode 'query=sum(up{job="detectd"})' 2>/dev/null \
      | "$PY" -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else 0)' 2>/dev/null || echo 0)
  [ "$n" = 3 ] && break
  sleep 1
done
[ "$n" = 3 ] || die "prometheus does not see 3 replicas up (saw $n)"
log "nginx on 127.0.0.1:$lb_port, prometheus on 127.0.0.1:$prom_port scraping all 3 replicas"

# --- the load, with one replica killed and one drained mid-way ----------------------------
t0=$SECONDS
"$PY" "$ROOT/docker/failover.py" load --url "http://127.0.0.1:$lb_port" \
  --requests "$REQUESTS" --concurrency "$CONCURRENCY" \
  --classify "$CACHE/img/small.png" --classify "$CACHE/img/small.png" --classify "$CACHE/img/large.png" \
  --detect "$CACHE/img/skinny.png" --detect-every 20 \
  --signal "0.25:KILL:$pid_1" --signal "0.5:TERM:$pid_2" \
  --out "$RUN/load.json"
load_s=$((SECONDS - t0))

failed_checks=0
fail() { echo "failover: FAILED $*"; failed_checks=$((failed_checks + 1)); }

# The SIGKILLed replica is gone; the SIGTERMed one finishes what it accepted and exits 0
# (within its 30 s shutdown timeout).
exit_status() {
  for _ in $(seq 40); do [ -s "$RUN/replica-$1.status" ] && break; sleep 1; done
  cat "$RUN/replica-$1.status" 2>/dev/null || echo "still running"
}
status=$(exit_status 1)
[ "$status" = 137 ] || fail "replica 1 (SIGKILL) exit status $status, want 137"
status=$(exit_status 2)
if [ "$status" = 0 ]; then
  log "replica 2 drained and exited 0 ($(grep -c 'draining' "$RUN/replica-2.log" || true) drain log lines)"
else
  fail "replica 2 (SIGTERM) exit status $status, want 0 after draining"
fi
[ ! -e "$RUN/replica-3.status" ] || fail "replica 3 exited (status $(cat "$RUN/replica-3.status"))"

"$PY" "$ROOT/docker/failover.py" nginx-log "$RUN/nginx-access.log" --expect "$REQUESTS" || fail "nginx log check"
"$PY" "$ROOT/docker/failover.py" prometheus --url "$prom" --alive "$addr_3" --dead "$addr_1" --dead "$addr_2" \
  --since "$start_s" --dashboard "$ROOT/docker/grafana/dashboards/detectd.json" || fail "prometheus check"

# promtool's linter on a live replica's /metrics.
curl -fsS "http://$addr_3/metrics" >"$RUN/metrics.txt"
if promtool check metrics <"$RUN/metrics.txt" >"$RUN/promtool.txt" 2>&1; then
  log "promtool check metrics: /metrics of replica 3 passes ($(grep -c '^detectd_' "$RUN/metrics.txt") detectd_* samples)"
else
  cat "$RUN/promtool.txt"
  fail "promtool check metrics rejects /metrics"
fi

read -r n failed < <("$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["requests"], r["failed"])' "$RUN/load.json")
log "load took ${load_s} s; the whole test $SECONDS s"
[ "$failed_checks" = 0 ] || log "$failed_checks check(s) failed"
[ "$failed_checks" = 0 ] && [ "$failed" = 0 ] || log "logs in $RUN"
summary_printed=1
echo "failover: $n requests, $failed failed"
[ "$failed" = 0 ] && [ "$failed_checks" = 0 ]
