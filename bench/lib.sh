# Shared by the bench/ scripts that run real proxies side by side: the
# working directory and its cleanup, processes started pinned to a CPU in
# their own process groups (and stopped only while they are still the ones
# started), Debian packages installed on demand, free ports, and the start
# of every nginx config. Sourced, not run:
#
#   . "$(dirname "$0")/lib.sh"
#   bench_init NAME        # log "…", $root, $work, the EXIT/INT/TERM traps
#   bench_install PKG…     # what is missing, from Debian; $absent[PKG] says why not
#   bench_cpus             # $proxy_cpu and $client_cpu
#   start CPU DIR CMD…     # $last_pid; stopped at exit
#
# A script may set wrk_pid to the load generator running now (it is
# signalled first at exit) and made_policy is this library's own.

# bench_init NAME: log, root, work (a temporary directory, removed at exit)
# and the traps that stop everything started.
bench_init() {
  bench_name=$1
  root=$(cd "$(dirname "$0")/.." && pwd)
  work=$(mktemp -d "${TMPDIR:-/tmp}/flame-$1.XXXXXX")
  pids=()          # every process started, as PID:STARTTIME, each the leader of its own process group
  made_policy=""   # the policy-rc.d made for an install, if any
  wrk_pid=""       # the wrk running now
  trap bench_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

log() { echo "$bench_name.sh: $*" >&2; }

# starttime PID: when PID started (clock ticks since boot), so a PID that
# ended and was reused by another process is never signalled.
starttime() {
  local f a
  f=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  read -r -a a <<<"${f##*) }"   # the fields after the command name, from the state (field 3) on
  echo "${a[19]}"
}

# stop PID:STARTTIME ends the process group that process leads, if it is
# still the one started (TERM, then KILL after 5 s).
stop() {
  local pid=${1%%:*}
  [ "$(starttime "$pid")" = "${1#*:}" ] || return 0
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  [ "$(starttime "$pid")" = "${1#*:}" ] || return 0
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
}

bench_cleanup() {
  local e
  [ -z "$wrk_pid" ] || kill -TERM "$wrk_pid" 2>/dev/null || true
  for e in "${pids[@]}"; do
    [ "$(starttime "${e%%:*}")" = "${e#*:}" ] && kill -TERM -- "-${e%%:*}" 2>/dev/null || true
  done
  for e in "${pids[@]}"; do stop "$e"; done
  if [ -n "$made_policy" ]; then rm -f "$made_policy"; fi
  rm -rf "$work"
}

# start CPU DIR CMD… runs CMD pinned to CPU in its own process group, its
# output in DIR/out.
start() {
  local cpu=$1 dir=$2; shift 2
  setsid taskset -c "$cpu" "$@" >"$dir/out" 2>&1 </dev/null &
  last_pid=$!
  pids+=("$last_pid:$(starttime "$last_pid")")
}

path_of() { command -v "$1" 2>/dev/null || { [ -x "/usr/sbin/$1" ] && echo "/usr/sbin/$1"; } || true; }

# bench_install [--no-install] PKG…: installs the missing packages (each
# providing the command of its name) from Debian, as root with apt-get;
# absent[PKG] then says why one cannot be used.
declare -A absent=()
bench_install() {
  local install=1 p cand missing=() want=()
  if [ "${1:-}" = --no-install ]; then install=0; shift; fi
  for p in "$@"; do [ -n "$(path_of "$p")" ] || missing+=("$p"); done
  [ ${#missing[@]} -gt 0 ] || return 0
  if [ "$install" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing ${missing[*]} from Debian"
    apt-get -o DPkg::Lock::Timeout=600 update -qq >"$work/apt.log" 2>&1 || log "apt-get update failed; trying the lists there are"
    for p in "${missing[@]}"; do
      cand=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ { print $2 }')
      if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then
        absent[$p]="not in this Debian ($(. /etc/os-release && echo "$PRETTY_NAME"): apt-cache policy $p has no candidate)"
      else
        want+=("$p")
      fi
    done
    if [ ${#want[@]} -gt 0 ]; then
      # Debian starts a packaged service on install unless policy-rc.d
      # refuses; nothing here may take port 80 or outlive the run.
      if [ ! -e /usr/sbin/policy-rc.d ]; then
        made_policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$made_policy"; chmod 755 "$made_policy"
      fi
      DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
        "${want[@]}" >"$work/apt.log" 2>&1 || { log "apt-get install ${want[*]} failed:"; tail -20 "$work/apt.log" >&2; }
      if [ -n "$made_policy" ]; then rm -f "$made_policy"; made_policy=""; fi
    fi
  fi
  for p in "${missing[@]}"; do
    [ -n "$(path_of "$p")" ] || [ -n "${absent[$p]:-}" ] || absent[$p]="not installed (run as root with apt-get, or without --no-install)"
  done
}

# bench_cpus: the proxy under test alone on CPU 1, the client (and the
# backend) on CPU 0.
bench_cpus() {
  ncpu=$(nproc)
  if [ "$ncpu" -ge 2 ]; then proxy_cpu=1 client_cpu=0; else proxy_cpu=0 client_cpu=0; log "one CPU: everything shares it"; fi
}

# free_port picks a port nobody listens on, below the ephemeral range so the
# kernel does not hand it to a client meanwhile; a start that still loses
# the race fails its readiness check and is retried on another port.
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    [ -z "$(ss -Hltn "sport = :$p" 2>/dev/null)" ] && { echo "$p"; return; }
  done
}

# nginx_prelude DIR prints what every nginx config begins with, up to
# inside its http block.
nginx_prelude() {
  local dir=$1
  cat <<EOF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 120s;
  client_body_temp_path $dir/tmp/body; proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi; uwsgi_temp_path $dir/tmp/uwsgi; scgi_temp_path $dir/tmp/scgi;
EOF
}
