#!/usr/bin/env bash
# Throughput of Flame's edge against the proxies people run, in one run on
# one machine: the same small HTTP backend (nginx answering a fixed 6-byte
# body) is driven by wrk directly, and through nginx, HAProxy, Caddy and
# Flame's edge (bench/edgebench: internal/proxy and a cluster member, as a
# host runs them) with the machine on the edge's host (one hop) and on a
# second host behind the backhaul (two hops).
#
#   bench/proxies.sh [--rounds 3] [--duration 10s] [--warmup 3s]
#                    [--connections 50] [--only LIST] [--no-install] [--json]
#                    [--save RESULTS.tsv]
#   bench/proxies.sh --render RESULTS.tsv [--json]
#
# Every target runs --rounds times, interleaved (direct, nginx, …, then
# again), each a --warmup run then a --duration run of wrk (keep-alive, one
# thread, --connections connections, --latency); the table gives medians
# over the rounds and the range of req/s. --only takes a comma list of
# direct,nginx,haproxy,caddy,flame-1hop,flame-2hop,flame-goroutines
# (flame-goroutines: one hop, a goroutine per connection rather than the
# edge's event loops; not in the default set). Missing packages are
# installed from Debian (apt-get update once, then install what is missing;
# a package this Debian lacks is reported and its row skipped); wrk is the
# one that must exist (and nginx, the backend). --save keeps the raw
# results, which --render summarizes again.
#
# CPUs: the proxy under test alone on CPU 1; wrk and the backend share CPU
# 0 in every row, direct included, so a row differs from direct only by
# what runs on CPU 1. Each proxy gets one core: nginx one worker, HAProxy
# one thread, Caddy and Flame one Go P (GOMAXPROCS follows the affinity).
# Route selection's allocations are a Go benchmark, not this script:
# BenchmarkSelect and TestSelectAllocatesNothing in internal/proxy/route.
set -euo pipefail

usage() { sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; }

rounds=3 duration=10s warmup=3s conns=50 json=0 install=1 render="" only="" save=""
all_targets="direct nginx haproxy caddy flame-1hop flame-2hop"
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) rounds=${2:?}; shift 2 ;;
    --duration) duration=${2:?}; shift 2 ;;
    --warmup) warmup=${2:?}; shift 2 ;;
    --connections) conns=${2:?}; shift 2 ;;
    --only) only=${2:?}; shift 2 ;;
    --no-install) install=0; shift ;;
    --json) json=1; shift ;;
    --render) render=${2:?}; shift 2 ;;
    --save) save=${2:?}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "proxies.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
for v in "$rounds" "$conns"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "proxies.sh: $v is not a positive count" >&2; exit 2; }
done
for v in "$duration" "$warmup"; do
  [[ $v =~ ^[1-9][0-9]*[smh]?$ ]] || { echo "proxies.sh: $v is not a wrk duration (10s, 1m)" >&2; exit 2; }
done
targets=$all_targets
if [ -n "$only" ]; then
  targets=""
  for t in ${only//,/ }; do
    [[ " $all_targets flame-goroutines " == *" $t "* ]] || { echo "proxies.sh: --only: unknown target $t" >&2; exit 2; }
    targets+="$t "
  done
fi

# summarize prints the table (or JSON) of a results file: "#key<TAB>value"
# lines of facts about the run, then one line per measurement:
# name, round, status (ok, or why there is no figure), req/s, p50 µs,
# p99 µs, answers other than 2xx/3xx, CPU µs per request of the process on
# the proxy CPU ("-" for none), socket errors (connect, read, write,
# timeouts: wrk gives up on a request after 2 s).
summarize() {
  awk -F'\t' -v json="$1" '
    function median(name, col,   n, i, j, t, a) {
      n = cnt[name]
      for (i = 1; i <= n; i++) a[i] = val[name, col, i]
      for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    function jstr(s) { gsub(/\\/, "\\\\", s); gsub(/"/, "\\\"", s); gsub(/\t/, " ", s); return "\"" s "\"" }
    function jnum(ok, fmt, v) { return ok ? sprintf(fmt, v) : "null" }
    function group(n,   s, out) { s = sprintf("%.0f", n); out = ""; while (length(s) > 3) { out = "," substr(s, length(s) - 2) out; s = substr(s, 1, length(s) - 3) } return s out }
    /^#/ { k = substr($1, 2); if (!(k in meta)) mkeys[++nm] = k; meta[k] = $2; next }
    NF < 3 { next }
    {
      name = $1
      if (!(name in seen)) { seen[name] = 1; order[++n] = name }
      if ($3 != "ok") { if (!(name in why)) why[name] = $3; next }
      c = ++cnt[name]
      val[name, "rps", c] = $4; val[name, "p50", c] = $5; val[name, "p99", c] = $6
      errs[name] += $7; sock[name] += $9
      if ($8 != "-") { val[name, "cpu", c] = $8; val[name, "busy", c] = $8 * $4 / 1e4; ncpu[name]++ }
      if (!(name in lo) || $4 + 0 < lo[name]) lo[name] = $4 + 0
      if (!(name in hi) || $4 + 0 > hi[name]) hi[name] = $4 + 0
    }
    END {
      for (k = 1; k <= n; k++) {
        name = order[k]
        if (!cnt[name]) continue
        rps[name] = median(name, "rps"); p50[name] = median(name, "p50"); p99[name] = median(name, "p99")
        cpu[name] = ncpu[name] == cnt[name] ? median(name, "cpu") : ""
        busy[name] = ncpu[name] == cnt[name] ? median(name, "busy") : ""
      }
      if (json) {
        printf "{\"meta\":{"
        for (i = 1; i <= nm; i++) printf "%s%s:%s", (i > 1 ? "," : ""), jstr(mkeys[i]), jstr(meta[mkeys[i]])
        printf "},\"rows\":["
        for (k = 1; k <= n; k++) {
          name = order[k]; ok = cnt[name] > 0
          printf "%s{\"name\":%s,\"status\":%s,\"rounds\":%d", (k > 1 ? "," : ""), jstr(name), jstr(ok ? "ok" : why[name]), cnt[name]
          printf ",\"rps\":%s,\"rps_min\":%s,\"rps_max\":%s", jnum(ok, "%.1f", rps[name]), jnum(ok, "%.1f", lo[name]), jnum(ok, "%.1f", hi[name])
          printf ",\"p50_us\":%s,\"p99_us\":%s", jnum(ok, "%.1f", p50[name]), jnum(ok, "%.1f", p99[name])
          printf ",\"vs_nginx\":%s", jnum(ok && rps["nginx"] > 0, "%.4f", rps[name] / (rps["nginx"] > 0 ? rps["nginx"] : 1))
          printf ",\"vs_caddy\":%s", jnum(ok && rps["caddy"] > 0, "%.4f", rps[name] / (rps["caddy"] > 0 ? rps["caddy"] : 1))
          printf ",\"added_p50_us\":%s", jnum(ok && name != "direct" && ("direct" in rps), "%.1f", p50[name] - p50["direct"])
          printf ",\"cpu_us_per_req\":%s,\"proxy_cpu_busy_pct\":%s,\"non_2xx\":%s,\"socket_errors\":%s}", jnum(ok && cpu[name] != "", "%.2f", cpu[name]), jnum(ok && busy[name] != "", "%.1f", busy[name]), jnum(ok, "%d", errs[name]), jnum(ok, "%d", sock[name])
        }
        print "]}"
        exit
      }
      for (i = 1; i <= nm; i++) printf "%-12s %s\n", mkeys[i] ":", meta[mkeys[i]]
      print ""
      printf "%-11s %9s  %-19s %8s %8s %8s %8s %8s %10s %5s %7s %7s\n", "target", "req/s", "range (rounds)", "p50 us", "p99 us", "vs nginx", "vs caddy", "+p50 us", "cpu us/req", "busy", "non-2xx", "sockerr"
      for (k = 1; k <= n; k++) {
        name = order[k]
        if (!cnt[name]) { printf "%-11s %s\n", name, why[name]; continue }
        printf "%-11s %9s  %-19s %8.0f %8.0f", name, group(rps[name]), group(lo[name]) "-" group(hi[name]) " (" cnt[name] ")", p50[name], p99[name]
        printf " %8s", (rps["nginx"] > 0 ? sprintf("%.2f", rps[name] / rps["nginx"]) : "-")
        printf " %8s", (rps["caddy"] > 0 ? sprintf("%.2f", rps[name] / rps["caddy"]) : "-")
        printf " %8s", (name != "direct" && ("direct" in rps) ? sprintf("%+.0f", p50[name] - p50["direct"]) : "-")
        printf " %10s %5s %7d %7d\n", (cpu[name] != "" ? sprintf("%.1f", cpu[name]) : "-"), (busy[name] != "" ? sprintf("%.0f%%", busy[name]) : "-"), errs[name], sock[name]
      }
      print ""
      print "req/s, p50, p99: medians over the rounds; vs nginx, vs caddy: req/s against theirs; +p50: p50 over"
      print "direct; cpu us/req: CPU time of the proxy (all its processes) per request, which other work on the"
      print "machine disturbs less than req/s; busy: the share of its core the proxy used (well under 100%: its"
      print "req/s was bounded elsewhere, by the client core or by waiting for a CPU); non-2xx: answers other"
      print "than 2xx/3xx; sockerr: connect, read and write errors, and requests wrk gave up on after 2 s."
      print "Allocations of route selection: BenchmarkSelect in internal/proxy/route (0 per request)."
    }' "$2"
}

if [ -n "$render" ]; then
  summarize "$json" "$render"
  exit 0
fi

. "$(dirname "$0")/lib.sh"
bench_init proxies

# ---- packages ---------------------------------------------------------------
if [ "$install" = 1 ]; then bench_install nginx haproxy caddy wrk; else bench_install --no-install nginx haproxy caddy wrk; fi
for p in "${!absent[@]}"; do log "$p: ${absent[$p]}"; done
[ -z "${absent[wrk]:-}" ] || { log "wrk is required"; exit 1; }
[ -z "${absent[nginx]:-}" ] || { log "nginx is required: it is the backend"; exit 1; }
nginx_bin=$(path_of nginx); wrk_bin=$(path_of wrk)

# ---- CPUs -------------------------------------------------------------------
bench_cpus

# ---- helpers ----------------------------------------------------------------
# http_ok PORT: one GET (Host demo.localhost) answered 200.
http_ok() (
  exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
  printf 'GET / HTTP/1.1\r\nHost: demo.localhost\r\nConnection: close\r\n\r\n' >&3
  IFS= read -r -t 2 line <&3 || exit 1
  [[ $line == "HTTP/1."[01]" 200"* ]]
) 2>/dev/null

# ready PID PORT: PID is up and answers on PORT within 15 s.
ready() {
  for _ in $(seq 150); do
    kill -0 "$1" 2>/dev/null || return 1
    http_ok "$2" && kill -0 "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# serve NAME CPU CONFIGURE: CONFIGURE DIR PORT writes the config and starts
# the server (via start); retried on a new port when it does not come up.
declare -A port=() pid_of=()
serve() {
  local name=$1 cpu=$2 configure=$3 dir="$work/$1" p
  mkdir -p "$dir"
  for _ in 1 2 3 4 5; do
    p=$(free_port)
    "$configure" "$dir" "$p" "$cpu"
    if ready "$last_pid" "$p"; then port[$name]=$p pid_of[$name]=$last_pid; return 0; fi
    stop "${pids[-1]}"
    unset 'pids[-1]'
  done
  log "$name did not start; its output:"; sed 's/^/  /' "$dir/out" >&2
  return 1
}

backend_conf() {
  local dir=$1 p=$2 cpu=$3
  mkdir -p "$dir/tmp"
  { nginx_prelude "$dir"; cat <<EOF
  server {
    listen 127.0.0.1:$p;
    location / { default_type text/plain; return 200 "hello\n"; }
  }
}
EOF
  } >"$dir/nginx.conf"
  start "$cpu" "$dir" "$nginx_bin" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
}

nginx_conf() {
  local dir=$1 p=$2 cpu=$3
  mkdir -p "$dir/tmp"
  { nginx_prelude "$dir"; cat <<EOF
  upstream backend {
    server 127.0.0.1:${port[backend]};
    keepalive 256;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
  }
  server {
    listen 127.0.0.1:$p;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
  } >"$dir/nginx.conf"
  start "$cpu" "$dir" "$nginx_bin" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
}

haproxy_conf() {
  local dir=$1 p=$2 cpu=$3
  cat >"$dir/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 120s
  timeout server 120s
  timeout http-keep-alive 120s
  option http-keep-alive
  http-reuse always
frontend edge
  bind 127.0.0.1:$p
  default_backend machines
backend machines
  server backend 127.0.0.1:${port[backend]} pool-max-conn 256
EOF
  start "$cpu" "$dir" "$(path_of haproxy)" -db -f "$dir/haproxy.cfg"
}

caddy_conf() {
  local dir=$1 p=$2 cpu=$3
  mkdir -p "$dir/home"
  cat >"$dir/Caddyfile" <<EOF
{
  admin off
  auto_https off
  storage file_system $dir/home/data
}
http://:$p {
  bind 127.0.0.1
  reverse_proxy 127.0.0.1:${port[backend]} {
    transport http {
      keepalive 120s
      keepalive_idle_conns 256
      keepalive_idle_conns_per_host 256
    }
  }
}
EOF
  start "$cpu" "$dir" env HOME="$dir/home" XDG_DATA_HOME="$dir/home/data" XDG_CONFIG_HOME="$dir/home/config" \
    "$(path_of caddy)" run --adapter caddyfile --config "$dir/Caddyfile"
}

# Flame's edge binds its own free port and says which once it answers.
flame_serve() {
  local name=$1 hops=$2 dir="$work/$1"
  mkdir -p "$dir"
  start "$proxy_cpu" "$dir" "$work/edgebench" -backend "127.0.0.1:${port[backend]}" -hops "$hops" -addr-file "$dir/addr" "${@:3}"
  local pid=$last_pid
  for _ in $(seq 600); do
    [ -s "$dir/addr" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if [ ! -s "$dir/addr" ] || ! ready "$pid" "$(sed 's/.*://' "$dir/addr")"; then
    log "$name did not start; its output:"; sed 's/^/  /' "$dir/out" >&2
    stop "${pids[-1]}"
    unset 'pids[-1]'
    return 1
  fi
  port[$name]=$(sed 's/.*://' "$dir/addr") pid_of[$name]=$pid
}

# cpu_ticks PID: CPU time (utime + stime, clock ticks) of PID and its
# children (nginx's worker).
cpu_ticks() {
  local total=0 p f a
  for p in "$1" $(ps -o pid= --ppid "$1" 2>/dev/null || true); do
    f=$(cat "/proc/$p/stat" 2>/dev/null) || continue
    read -r -a a <<<"${f##*) }"   # the fields after the command name, from the state (field 3) on
    total=$((total + a[11] + a[12]))
  done
  echo "$total"
}

cat >"$work/report.lua" <<'EOF'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("FLAMEBENCH requests=%d duration_us=%d p50_us=%.1f p99_us=%.1f non2xx=%d socket=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
EOF

# drive PORT DURATION: wrk on the client CPU; prints its FLAMEBENCH line.
drive() {
  taskset -c "$client_cpu" "$wrk_bin" -t1 -c"$conns" -d"$2" --latency -s "$work/report.lua" \
    -H 'Host: demo.localhost' "http://127.0.0.1:$1/" >"$work/wrk.out" 2>&1 &
  wrk_pid=$!
  local rc=0
  wait "$wrk_pid" || rc=$?
  wrk_pid=""
  [ "$rc" = 0 ] || { log "wrk failed:"; sed 's/^/  /' "$work/wrk.out" >&2; return 1; }
  grep '^FLAMEBENCH ' "$work/wrk.out"
}

# ---- run --------------------------------------------------------------------
results="$work/results.tsv"
meta() { printf '#%s\t%s\n' "$1" "$2" >>"$results"; }
version() {
  set +o pipefail   # wrk -v exits 1
  case $1 in
    nginx) "$nginx_bin" -v 2>&1 | sed 's/.*version: //' ;;
    haproxy) "$(path_of haproxy)" -v 2>/dev/null | sed -n '1s/ - .*//p' ;;
    caddy) "$(path_of caddy)" version 2>/dev/null | awk '{ print $1 }' ;;
    wrk) "$wrk_bin" -v 2>&1 | sed -n '1{s/ \[.*//;s/^wrk //;p}' ;;
  esac
  set -o pipefail
}

rev=$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)
log "building bench/edgebench at $rev"
(cd "$root" && go build -o "$work/edgebench" ./bench/edgebench)

: >"$results"
meta revision "$rev"
meta machine "$ncpu CPU ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), $(uname -sr)"
meta pinning "proxy on CPU $proxy_cpu; wrk (1 thread, c=$conns) and the backend (nginx, 1 worker) on CPU $client_cpu"
meta run "$rounds round(s) of ${warmup} warm-up + ${duration} per target, keep-alive"
meta load_start "$(cut -d' ' -f1-3 /proc/loadavg)"
vs=""; for p in wrk nginx haproxy caddy; do [ -z "${absent[$p]:-}" ] && vs+="$p $(version "$p"), "; done
meta versions "${vs%, }"

serve backend "$client_cpu" backend_conf || exit 1
port[direct]=${port[backend]}
declare -A failed=()
for t in $targets; do
  case $t in
    direct) ;;
    nginx|haproxy|caddy)
      if [ -n "${absent[$t]:-}" ]; then failed[$t]=${absent[$t]}
      else serve "$t" "$proxy_cpu" "${t}_conf" || failed[$t]="did not start"; fi ;;
    flame-1hop) flame_serve "$t" 1 || failed[$t]="did not start" ;;
    flame-2hop) flame_serve "$t" 2 || failed[$t]="did not start" ;;
    flame-goroutines) flame_serve "$t" 1 -no-event-loop || failed[$t]="did not start" ;;
  esac
done

for r in $(seq "$rounds"); do
  for t in $targets; do
    if [ -n "${failed[$t]:-}" ]; then
      [ "$r" != 1 ] || printf '%s\t0\t%s\n' "$t" "${failed[$t]}" >>"$results"
      continue
    fi
    log "round $r/$rounds: $t"
    drive "${port[$t]}" "$warmup" >/dev/null || { printf '%s\t%d\twrk failed\n' "$t" "$r" >>"$results"; continue; }
    before=""; [ "$t" != direct ] && before=$(cpu_ticks "${pid_of[$t]}")
    line=$(drive "${port[$t]}" "$duration") || { printf '%s\t%d\twrk failed\n' "$t" "$r" >>"$results"; continue; }
    cpu=-
    if [ -n "$before" ]; then
      after=$(cpu_ticks "${pid_of[$t]}")
      cpu=$(echo "$line" | awk -v d=$((after - before)) -v hz="$(getconf CLK_TCK)" \
        '{ for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] } if (f["requests"] > 0) printf "%.2f", d * 1e6 / hz / f["requests"]; else printf "-" }')
    fi
    # A proxy's error answers or dropped requests: show what it logged.
    if ! echo "$line" | grep -q ' non2xx=0 socket=0$'; then
      log "$t, round $r: ${line#FLAMEBENCH }; the end of its log:"
      tail -n 3 "$work/$t/out" "$work/$t/error.log" 2>/dev/null | sed 's/^/  /' >&2 || true
    fi
    echo "$line" | awk -v t="$t" -v r="$r" -v cpu="$cpu" 'BEGIN { OFS = "\t" }
      { for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
        print t, r, "ok", sprintf("%.1f", f["requests"] * 1e6 / (f["duration_us"] > 0 ? f["duration_us"] : 1)), f["p50_us"], f["p99_us"], f["non2xx"], cpu, f["socket"] }' >>"$results"
  done
done
meta load_end "$(cut -d' ' -f1-3 /proc/loadavg)"
[ -z "$save" ] || cp "$results" "$save"

summarize "$json" "$results"
