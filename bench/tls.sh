#!/usr/bin/env bash
# TLS at the edge against nginx, in one run on one machine, with the same
# certificate (ECDSA P-256, made here with openssl) and the same backend
# (nginx answering a fixed 6-byte body over plain HTTP): full TLS
# handshakes per second (every request on a new connection: wrk with
# Connection: close; no session resumption — nginx has its session cache
# and tickets off, and wrk resumes none) and requests per second over
# keep-alive TLS connections (HTTP/1.1), side by side with their ratios.
# Flame's edge is bench/edgebench with -tls-cert (internal/proxy serving
# HTTPS; the machine on the edge's host, one hop).
#
#   bench/tls.sh [--rounds 3] [--duration 10s] [--warmup 3s]
#                [--connections 50] [--no-install]
#
# Each target and mode runs --rounds times, interleaved; the table gives the
# median over the rounds. CPUs as in bench/proxies.sh: the proxy under test
# alone on CPU 1, wrk (one thread) and the backend on CPU 0; nginx has one
# worker, Flame one Go P. Needs wrk, nginx and openssl (installed from
# Debian when missing, as root).
set -euo pipefail

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }

rounds=3 duration=10s warmup=3s conns=50 install=1
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) rounds=${2:?}; shift 2 ;;
    --duration) duration=${2:?}; shift 2 ;;
    --warmup) warmup=${2:?}; shift 2 ;;
    --connections) conns=${2:?}; shift 2 ;;
    --no-install) install=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "tls.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
for v in "$rounds" "$conns"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "tls.sh: $v is not a positive count" >&2; exit 2; }
done
for v in "$duration" "$warmup"; do
  [[ $v =~ ^[1-9][0-9]*[smh]?$ ]] || { echo "tls.sh: $v is not a wrk duration (10s, 1m)" >&2; exit 2; }
done

. "$(dirname "$0")/lib.sh"
bench_init tls

if [ "$install" = 1 ]; then bench_install nginx wrk openssl; else bench_install --no-install nginx wrk openssl; fi
for p in nginx wrk openssl; do [ -z "${absent[$p]:-}" ] || { log "$p is required: ${absent[$p]}"; exit 1; }; done
nginx_bin=$(path_of nginx) wrk_bin=$(path_of wrk)
bench_cpus

# answers SCHEME PORT: one GET for demo.localhost answered 200 within 15 s.
answers() {
  for _ in $(seq 150); do
    [ "$(curl -sk -o /dev/null -w '%{http_code}' -H 'Host: demo.localhost' "$1://127.0.0.1:$2/" 2>/dev/null)" = 200 ] && return 0
    sleep 0.1
  done
  return 1
}

# ---- the certificate ---------------------------------------------------------
openssl ecparam -name prime256v1 -genkey -noout -out "$work/key.pem" 2>/dev/null
openssl req -new -x509 -key "$work/key.pem" -out "$work/cert.pem" -days 2 -subj /CN=demo.localhost \
  -addext "subjectAltName=DNS:demo.localhost" 2>/dev/null

# ---- the backend, nginx over TLS, Flame's edge -------------------------------
declare -A port=()
mkdir -p "$work/backend/tmp" "$work/nginx/tmp" "$work/flame"
port[backend]=$(free_port)
{ nginx_prelude "$work/backend"; cat <<EOF
  server {
    listen 127.0.0.1:${port[backend]};
    location / { default_type text/plain; return 200 "hello\n"; }
  }
}
EOF
} >"$work/backend/nginx.conf"
start "$client_cpu" "$work/backend" "$nginx_bin" -p "$work/backend" -e "$work/backend/error.log" -c "$work/backend/nginx.conf"
answers http "${port[backend]}" || { log "the backend did not start"; cat "$work/backend/out" >&2; exit 1; }

port[nginx]=$(free_port)
{ nginx_prelude "$work/nginx"; cat <<EOF
  upstream backend {
    server 127.0.0.1:${port[backend]};
    keepalive 256;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
  }
  server {
    listen 127.0.0.1:${port[nginx]} ssl;
    ssl_certificate $work/cert.pem;
    ssl_certificate_key $work/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache off;
    ssl_session_tickets off;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
} >"$work/nginx/nginx.conf"
start "$proxy_cpu" "$work/nginx" "$nginx_bin" -p "$work/nginx" -e "$work/nginx/error.log" -c "$work/nginx/nginx.conf"
answers https "${port[nginx]}" || { log "nginx did not start"; cat "$work/nginx/out" "$work/nginx/error.log" >&2; exit 1; }

rev=$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)
log "building bench/edgebench at $rev"
(cd "$root" && go build -o "$work/edgebench" ./bench/edgebench)
start "$proxy_cpu" "$work/flame" "$work/edgebench" -backend "127.0.0.1:${port[backend]}" \
  -tls-cert "$work/cert.pem" -tls-key "$work/key.pem" -tls-addr-file "$work/flame/tls"
for _ in $(seq 600); do [ -s "$work/flame/tls" ] && break; sleep 0.1; done
[ -s "$work/flame/tls" ] || { log "the edge did not start"; cat "$work/flame/out" >&2; exit 1; }
port[flame]=$(sed 's/.*://' "$work/flame/tls")
answers https "${port[flame]}" || { log "the edge does not answer over TLS"; cat "$work/flame/out" >&2; exit 1; }

cat >"$work/report.lua" <<'EOF'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("TLSBENCH %d %d %.1f %.1f %d %d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
EOF

# drive PORT DURATION [HEADER]: wrk over TLS; prints req/s p50 p99 errors.
drive() {
  local extra=()
  [ -z "${3:-}" ] || extra=(-H "$3")
  taskset -c "$client_cpu" "$wrk_bin" -t1 -c"$conns" -d"$2" --latency -s "$work/report.lua" \
    -H 'Host: demo.localhost' "${extra[@]}" "https://127.0.0.1:$1/" >"$work/wrk.out" 2>&1 ||
    { log "wrk failed:"; cat "$work/wrk.out" >&2; return 1; }
  awk '/^TLSBENCH / { printf "%.0f %s %s %d\n", $2 / ($3 / 1e6), $4, $5, $6 + $7 }' "$work/wrk.out"
}

: >"$work/results"
for r in $(seq "$rounds"); do
  for mode in handshakes keepalive; do
    hdr=""
    [ "$mode" = handshakes ] && hdr="Connection: close"
    for t in nginx flame; do
      drive "${port[$t]}" "$warmup" "$hdr" >/dev/null
      read -r rps p50 p99 errs < <(drive "${port[$t]}" "$duration" "$hdr")
      log "round $r $mode $t: $rps req/s, p50 ${p50} µs, p99 ${p99} µs, errors $errs"
      echo "$mode $t $rps $p50 $p99 $errs" >>"$work/results"
    done
  done
done

echo "# $ncpu CPU ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), $(uname -sr); revision $rev"
echo "# nginx $("$nginx_bin" -v 2>&1 | sed 's/.*version: //'), $(openssl version | awk '{ print $1, $2 }'); Go $(go env GOVERSION)"
echo "# proxy on CPU $proxy_cpu; wrk (1 thread, c=$conns) and the backend on CPU $client_cpu; $rounds round(s) of $warmup + $duration; medians"
awk '
  function median(k,   n, i, j, t, a) {
    n = cnt[k]
    for (i = 1; i <= n; i++) a[i] = v[k, i]
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  { k = $1 SUBSEP $2; c = ++cnt[k]; v[k, c] = $3; p50[k, c] = $4; p99[k, c] = $5; err[k] += $6 }
  END {
    printf "%-11s %-6s %12s %10s %10s %7s %12s\n", "MODE", "PROXY", "REQ/S", "P50 µs", "P99 µs", "ERRORS", "vs NGINX"
    split("handshakes keepalive", modes, " ")
    for (m = 1; m <= 2; m++) for (t = 1; t <= 2; t++) {
      proxy = t == 1 ? "nginx" : "flame"; k = modes[m] SUBSEP proxy
      if (!cnt[k]) continue
      rps = median(k)
      for (i = 1; i <= cnt[k]; i++) { pv[i] = p50[k, i]; qv[i] = p99[k, i] }
      for (i = 1; i <= cnt[k]; i++) v[k "p", i] = pv[i]; cnt[k "p"] = cnt[k]
      for (i = 1; i <= cnt[k]; i++) v[k "q", i] = qv[i]; cnt[k "q"] = cnt[k]
      ratio = proxy == "nginx" ? "1.00x" : sprintf("%.2fx", rps / median(modes[m] SUBSEP "nginx"))
      printf "%-11s %-6s %12.0f %10.0f %10.0f %7d %12s\n", modes[m], proxy, rps, median(k "p"), median(k "q"), err[k], ratio
    }
  }' "$work/results"
