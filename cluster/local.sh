#!/usr/bin/env bash
# A multi-node Ray cluster on this one Linux machine, for trying `kdsearch run --address`
# against real raylets before paying for a cloud cluster. See cluster/README.md.
#
#   cluster/local.sh up [--workers N] [options]   start a head + N worker raylets, print exports
#   cluster/local.sh status                       our processes, the GCS's node table, `ray status`
#   cluster/local.sh env                          print the export lines a client needs
#   cluster/local.sh kill-worker I                SIGKILL worker I (raylet first, then its whole node)
#   cluster/local.sh start-worker I               start worker I again (same IP, ports, resources)
#   cluster/local.sh down                         stop only what this script started
#
# Every node is its own `ray start --block` in its own session (setsid), on its own loopback
# address (head 127.0.0.2, worker I 127.0.0.(3+I)) and its own block of ports. `down` signals
# those sessions only: it never runs `ray stop`, which kills every Ray process on the machine.
# Run `cluster/local.sh help` for the options.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: cluster/local.sh COMMAND [options]

commands:
  up [options]        start a head and N worker raylets on loopback; prints the address and the
                      export lines (stdout is eval-able: eval "$(cluster/local.sh up)")
  status              the processes this script started, the GCS's node table, `ray status`;
                      exit 0 when every node is alive, 1 otherwise, 3 when no cluster is up
  env                 print the export lines a client (kdsearch, ray.init, ray status) needs
  kill-worker I       SIGKILL worker I's raylet, then every other process of that node (what a
                      preempted spot VM looks like to the cluster); prints the killed PIDs
  start-worker I      start worker I again with the same IP, ports and resources
  down [--keep-temp]  stop the processes this script started (SIGTERM, then SIGKILL after
                      --grace seconds); never touches other Ray processes on the machine
  help                this text

up options:
  --workers N         worker raylets (default 1)
  --head-cpus N       CPUs the head advertises (default 1: head + 1 worker = 2 trial slots;
                      0 keeps trials off the head, like the cloud configs)
  --worker-cpus N     CPUs each worker advertises (default 1)
  --worker-gpus N     GPUs each worker advertises (default 0; logical only, all workers would
                      share this machine's devices)
  --object-store-mb M object store per node in MiB (default 256)
  --base-port P       first port of the block (default: a free block picked in 20000-29999);
                      node K (head 0, worker I = I+1) uses P+100*K .. P+100*K+99
  --dashboard         start the dashboard on 127.0.0.1 (port P+8; needs ray[default]);
                      default: no dashboard
  --timeout S         seconds to wait for the nodes to come up (default 120)

down options:
  --keep-temp         keep Ray's temp dir (session logs) instead of deleting it
  --grace S           seconds between SIGTERM and SIGKILL (default 20)

environment:
  KDSEARCH_CLUSTER_DIR  state dir (default $PWD/.kdsearch-cluster): address, auth token, PIDs, logs
  KDSEARCH_RAY          the `ray` executable (default: <repo>/.venv/bin/ray, else `ray` on PATH)
  RAY_*                 other RAY_ variables pass through to every node, e.g.
                        RAY_health_check_period_ms=1000 for faster dead-node detection

state dir layout:
  address             HOST:PORT of the GCS (what `kdsearch run --address` takes)
  auth_token          the token (mode 0600); RAY_AUTH_TOKEN_PATH points here
  env.sh              the export lines
  cluster.env         everything `status`/`down` need
  nodes/NAME.pid      PID of that node's `ray start --block`; it is also the node's session ID,
                      so every process of the node (gcs, raylet, agents, workers) has SID == PID
  nodes/NAME.raylet.pid   PID of that node's raylet   (NAME: head, worker-0, worker-1, ...)
  logs/NAME.log       output of that node's `ray start`
EOF
}

die() { echo "local.sh: error: $*" >&2; exit 1; }
say() { echo "local.sh: $*" >&2; }

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
STATE="${KDSEARCH_CLUSTER_DIR:-$PWD/.kdsearch-cluster}"

STRIDE=100          # ports per node
WORKER_PORT_OFF=20  # node ports base+0..19 are fixed services, base+20..99 are worker ports
HEAD_IP=127.0.0.2   # 127.0.0.1 is not usable: Ray rewrites it to the machine's external IP

worker_ip() { echo "127.0.0.$((3 + $1))"; }

resolve_ray() {
    if [[ -n "${KDSEARCH_RAY:-}" ]]; then
        RAY_BIN="$KDSEARCH_RAY"
    elif [[ -x "$REPO_ROOT/.venv/bin/ray" ]]; then
        RAY_BIN="$REPO_ROOT/.venv/bin/ray"
    else
        RAY_BIN="$(command -v ray || true)"
    fi
    [[ -n "$RAY_BIN" && -x "$RAY_BIN" ]] || die "no ray executable; set KDSEARCH_RAY or create $REPO_ROOT/.venv"
    RAY_BIN="$(cd "$(dirname "$RAY_BIN")" && pwd)/$(basename "$RAY_BIN")"
    PY="$(dirname "$RAY_BIN")/python"
    [[ -x "$PY" ]] || PY="$(command -v python3)"
}

# Environment every node and every helper runs with. RAY_AUTH_TOKEN would win over the file.
auth_env() {
    export RAY_AUTH_MODE=token
    export RAY_AUTH_TOKEN_PATH="$STATE/auth_token"
    unset RAY_AUTH_TOKEN RAY_ADDRESS
    export RAY_USAGE_STATS_ENABLED=0
}

print_exports() {
    local addr="$1"
    cat <<EOF
# kdsearch local Ray cluster at $addr (state: $STATE)
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$STATE/auth_token
unset RAY_AUTH_TOKEN
# kdsearch run --address $addr ...     ray status --address $addr
EOF
}

# ---------------------------------------------------------------- processes

# Live (not zombie) PIDs whose session ID is $1.
session_pids() {
    ps -e -o pid=,sid=,stat= | awk -v s="$1" '$2 == s && $3 !~ /^Z/ { print $1 }'
}

is_alive() {  # PID: running, not a zombie
    local stat
    stat="$(ps -o stat= -p "$1" 2>/dev/null || true)"
    [[ -n "$stat" && "$stat" != Z* ]]
}

gcs_listening() { (: <"/dev/tcp/$HEAD_IP/$GCS_PORT") 2>/dev/null; }

# Is session $1 one of ours? While any process still has SID S the kernel cannot hand out PID S
# again, so a live session whose leader is gone is still ours. A live leader must carry our
# cluster ID in its environment (it is the `ray start` python, which never rewrites environ);
# if it does not, the PID was reused by a stranger and we leave it alone.
session_is_ours() {
    local sid="$1" stat
    stat="$(ps -o stat= -p "$sid" 2>/dev/null || true)"
    # gone, or a zombie (its PID is not reusable either): the session is ours
    [[ -z "$stat" || "$stat" == Z* ]] && return 0
    local environ
    environ="$(tr '\0' '\n' 2>/dev/null <"/proc/$sid/environ" || true)"
    [[ $'\n'"$environ"$'\n' == *$'\n'"KDSEARCH_CLUSTER_ID=$CLUSTER_ID"$'\n'* ]]
}

# PIDs of node $1's session, or nothing if that session is not ours.
node_pids() {
    local pidfile="$STATE/nodes/$1.pid" sid
    [[ -f "$pidfile" ]] || return 0
    sid="$(cat "$pidfile")"
    session_is_ours "$sid" || return 0
    session_pids "$sid"
}

# Session IDs of the given nodes that are ours (checked now, while their leaders are either
# alive and recognisable or gone). Later loops follow these raw SIDs: a dying leader can no
# longer be recognised, but its SID cannot be reused while any member is left.
owned_sids() {  # NAME...
    local name sid
    for name in "$@"; do
        [[ -f "$STATE/nodes/$name.pid" ]] || continue
        sid="$(cat "$STATE/nodes/$name.pid")"
        if [[ -n "$(session_pids "$sid")" ]] && session_is_ours "$sid"; then echo "$sid"; fi
    done
}

# Until sessions SID... are empty: SIGNAL every member now, SIGKILL stragglers after GRACE s.
# A session seen empty is dropped at once, so a later reuse of its number is never touched.
stop_sessions() {  # SIGNAL GRACE SID...
    local sig="$1" grace="$2" sid p left killed=0
    shift 2
    local sids=("$@")
    for sid in "${sids[@]}"; do
        for p in $(session_pids "$sid"); do kill "-$sig" "$p" 2>/dev/null || true; done
    done
    local deadline=$(($(date +%s) + grace))
    while ((${#sids[@]})); do
        local still=()
        left=""
        for sid in "${sids[@]}"; do
            p="$(session_pids "$sid" | tr '\n' ' ')"
            if [[ -n "${p// /}" ]]; then still+=("$sid"); left+="$p"; fi
        done
        sids=("${still[@]+"${still[@]}"}")
        ((${#sids[@]})) || return 0
        if (($(date +%s) >= deadline)); then
            if ((killed)); then
                say "warning: still alive after SIGKILL: $left"
                return 1
            fi
            [[ "$sig" == KILL ]] || say "SIGKILL after ${grace}s: $left"
            for p in $left; do kill -KILL "$p" 2>/dev/null || true; done
            killed=1
            deadline=$(($(date +%s) + 10))
        fi
        sleep 0.2
    done
}

node_names() {
    echo head
    local i
    for ((i = 0; i < NUM_WORKERS; i++)); do echo "worker-$i"; done
}

load_state() {
    [[ -f "$STATE/cluster.env" ]] || return 1
    # shellcheck disable=SC1091
    source "$STATE/cluster.env"
}

# ---------------------------------------------------------------- python helpers

# Pick a base port such that COUNT consecutive ports are free on every interface (Ray's gRPC
# servers listen on 0.0.0.0). Prints the base.
pick_ports() {  # REQUESTED_BASE(or 0) COUNT
    "$PY" - "$1" "$2" <<'EOF'
import random, socket, sys
want, count = int(sys.argv[1]), int(sys.argv[2])
def free(base):
    if base < 1024 or base + count > 65535:
        return False
    for port in range(base, base + count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("", port))
        except OSError:
            return False
        finally:
            s.close()
    return True
if want:
    if not free(want):
        sys.exit(f"ports {want}..{want + count - 1} are not all free")
    print(want)
    sys.exit(0)
# below Linux's ephemeral range (32768+) and above Ray's default worker ports (10002-19999)
slots = list(range(20000, 30000 - count, 100))
random.shuffle(slots)
for base in slots[:200]:
    if free(base):
        print(base)
        sys.exit(0)
sys.exit("no free block of %d ports in 20000-29999" % count)
EOF
}

# The GCS's view of the cluster. With WAIT>0, wait until WAIT nodes are alive (or time out).
gcs_nodes() {  # ADDRESS WAIT TIMEOUT
    "$PY" - "$1" "$2" "$3" <<'EOF'
import sys, time
addr, want, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
from ray._raylet import GcsClient
from ray.core.generated import gcs_pb2
deadline = time.time() + timeout
nodes, err = [], None
while True:
    try:
        client = GcsClient(address=addr)
        nodes = list(client.get_all_node_info(timeout=5).values())
        err = None
    except Exception as e:  # GCS not reachable (yet), or auth rejected
        err = e
    alive = [n for n in nodes if n.state == gcs_pb2.GcsNodeInfo.ALIVE]
    if len(alive) >= want or time.time() > deadline:
        break
    time.sleep(0.5)
if err is not None:
    print(f"GCS at {addr} unreachable: {err}")
    sys.exit(1)
state = {gcs_pb2.GcsNodeInfo.ALIVE: "ALIVE", gcs_pb2.GcsNodeInfo.DEAD: "DEAD"}
print(f"{'node_id':<14}{'ip':<13}{'state':<7}{'head':<6}resources")
for n in sorted(nodes, key=lambda n: (not n.is_head_node, n.node_manager_address, n.start_time_ms)):
    res = ", ".join(f"{k}={v:g}" for k, v in sorted(n.resources_total.items())
                    if not k.startswith("node:") and k not in ("memory", "object_store_memory"))
    print(f"{n.node_id.hex()[:12]:<14}{n.node_manager_address:<13}"
          f"{state.get(n.state, n.state):<7}{'yes' if n.is_head_node else '':<6}{res}")
sys.exit(0 if len(alive) >= want else 2)
EOF
}

# ---------------------------------------------------------------- nodes

# Start node NAME (head or worker-I) in its own session; records nodes/NAME.pid.
launch_node() {  # NAME INDEX
    local name="$1" k="$2" ip cpus gpus res role_args=()
    local b=$((BASE_PORT + STRIDE * k))
    if [[ "$name" == head ]]; then
        ip="$HEAD_IP"; cpus="$HEAD_CPUS"; gpus=0
        # kdsearch_latency: the node kdsearch's latency measurer is pinned to (search/latency.py)
        res='{"kdsearch_head": 1, "kdsearch_latency": 1}'
        role_args=(--head --port "$GCS_PORT")
        if [[ "$DASHBOARD" == 1 ]]; then
            role_args+=(--include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port $((b + 8)))
        else
            role_args+=(--include-dashboard false)
        fi
        # `ray start --head` opens a Ray Client server on 10001 when grpcio is importable
        if "$PY" -c "import grpc" >/dev/null 2>&1; then
            role_args+=(--ray-client-server-port $((b + 7)))
        fi
    else
        local i="${name#worker-}"
        ip="$(worker_ip "$i")"; cpus="$WORKER_CPUS"; gpus="$WORKER_GPUS"
        res="{\"kdsearch_worker\": 1, \"kdsearch_worker_$i\": 1}"
        role_args=(--address "$ADDRESS")
    fi
    mkdir -p "$STATE/nodes" "$STATE/logs"
    rm -f "$STATE/nodes/$name.pid" "$STATE/nodes/$name.raylet.pid"
    # fd 9 (the state lock) must not leak into the daemons
    KDSEARCH_CLUSTER_ID="$CLUSTER_ID" KDSEARCH_CLUSTER_NODE="$name" \
        setsid "$RAY_BIN" start --block "${role_args[@]}" \
        --node-ip-address "$ip" \
        --node-manager-port $((b + 1)) --object-manager-port $((b + 2)) \
        --dashboard-agent-listen-port $((b + 3)) --dashboard-agent-grpc-port $((b + 4)) \
        --metrics-export-port $((b + 5)) --runtime-env-agent-port $((b + 6)) \
        --min-worker-port $((b + WORKER_PORT_OFF)) --max-worker-port $((b + STRIDE - 1)) \
        --num-cpus "$cpus" --num-gpus "$gpus" --resources "$res" \
        --object-store-memory $((OBJECT_STORE_MB * 1024 * 1024)) \
        --temp-dir "$TEMP_DIR" --disable-usage-stats --log-style record \
        >"$STATE/logs/$name.log" 2>&1 </dev/null 9>&- &
    local pid=$!
    echo "$pid" >"$STATE/nodes/$name.pid"
    # setsid only forks when its caller leads a process group; a script's background job never does
    sleep 0.2
    local sid
    sid="$(ps -o sid= -p "$pid" | tr -d ' ' || true)"
    [[ -z "$sid" || "$sid" == "$pid" ]] || die "$name: expected session $pid, got $sid"
}

# Wait until node NAME's `ray start` reports success; record its raylet PID.
wait_node() {  # NAME DEADLINE(epoch s)
    local name="$1" deadline="$2" pid raylet=""
    pid="$(cat "$STATE/nodes/$name.pid")"
    while ! grep -q "Ray runtime started" "$STATE/logs/$name.log" 2>/dev/null; do
        if ! is_alive "$pid"; then
            tail -n 25 "$STATE/logs/$name.log" >&2 || true
            die "$name exited during startup (log: $STATE/logs/$name.log)"
        fi
        if (($(date +%s) > deadline)); then
            tail -n 25 "$STATE/logs/$name.log" >&2 || true
            die "$name not up after ${UP_TIMEOUT}s (log: $STATE/logs/$name.log)"
        fi
        sleep 0.3
    done
    while [[ -z "$raylet" ]]; do
        raylet="$(ps -o pid=,comm= --ppid "$pid" | awk '$2 == "raylet" && !n++ { print $1 }')"
        [[ -n "$raylet" ]] && break
        (($(date +%s) <= deadline)) || die "$name: no raylet process under PID $pid"
        sleep 0.2
    done
    echo "$raylet" >"$STATE/nodes/$name.raylet.pid"
    say "$name up: ip $(node_ip "$name"), pid $pid, raylet $raylet"
}

# Wait until HOST:PORT accepts TCP connections (bash's /dev/tcp), while node NAME lives.
wait_port() {  # HOST PORT DEADLINE NAME
    local pid
    pid="$(cat "$STATE/nodes/$4.pid")"
    until (: <"/dev/tcp/$1/$2") 2>/dev/null; do
        is_alive "$pid" || return 0  # wait_node reports the failure
        (($(date +%s) <= $3)) || return 0
        sleep 0.2
    done
}

node_ip() { if [[ "$1" == head ]]; then echo "$HEAD_IP"; else worker_ip "${1#worker-}"; fi; }

node_index() { if [[ "$1" == head ]]; then echo 0; else echo $((${1#worker-} + 1)); fi; }

# Stop every node this state dir knows about: SIGTERM the `ray start` leaders only (each
# shuts its node down), then SIGKILL whatever is left of those sessions after GRACE seconds.
stop_all() {  # GRACE
    local grace="$1" sid names sids
    mapfile -t names < <(node_names)
    mapfile -t sids < <(owned_sids "${names[@]}")
    ((${#sids[@]})) || return 0
    local p
    for sid in "${sids[@]}"; do
        if is_alive "$sid"; then
            kill -TERM "$sid" 2>/dev/null || true
        else  # the leader is gone already: nobody will shut the rest down in order
            for p in $(session_pids "$sid"); do kill -TERM "$p" 2>/dev/null || true; done
        fi
    done
    stop_sessions 0 "$grace" "${sids[@]}"
}

# ---------------------------------------------------------------- commands

lock_state() {
    mkdir -p "$STATE"
    STATE="$(cd "$STATE" && pwd)"
    exec 9>"$STATE/.lock"
    flock -w 60 9 || die "another local.sh is working on $STATE"
}

cmd_up() {
    local workers=1 head_cpus=1 worker_cpus=1 worker_gpus=0 osmb=256 base=0 dash=0 timeout=120
    while (($#)); do
        case "$1" in
            --workers) workers="$2"; shift 2 ;;
            --head-cpus) head_cpus="$2"; shift 2 ;;
            --worker-cpus) worker_cpus="$2"; shift 2 ;;
            --worker-gpus) worker_gpus="$2"; shift 2 ;;
            --object-store-mb) osmb="$2"; shift 2 ;;
            --base-port) base="$2"; shift 2 ;;
            --dashboard) dash=1; shift ;;
            --timeout) timeout="$2"; shift 2 ;;
            *) die "up: unknown option $1 (see: local.sh help)" ;;
        esac
    done
    if ! [[ "$workers" =~ ^[0-9]+$ ]] || ((workers > 64)); then die "--workers must be 0..64"; fi
    for v in "$head_cpus" "$worker_cpus" "$worker_gpus" "$osmb" "$base" "$timeout"; do
        [[ "$v" =~ ^[0-9]+$ ]] || die "expected a non-negative integer, got '$v'"
    done
    ((osmb >= 75)) || die "--object-store-mb must be >= 75 (Ray's minimum)"
    if ((dash)) && ! "$PY" -c 'import sys, ray._private.utils as u; sys.exit(1 if u.get_dashboard_dependency_error() else 0)' 2>/dev/null; then
        die "--dashboard needs ray[default] in $(dirname "$RAY_BIN"): pip install \"ray[default]==$("$PY" -c 'import ray; print(ray.__version__)')\""
    fi

    lock_state
    if load_state; then
        local alive=""
        for name in $(node_names); do alive+="$(node_pids "$name")"; done
        [[ -z "$alive" ]] || die "a cluster is already up at $ADDRESS (state: $STATE); run: local.sh down"
        rm -f "$STATE/cluster.env"
        [[ -n "${TEMP_DIR:-}" && -d "$TEMP_DIR" ]] && rm -rf "$TEMP_DIR"
    fi
    rm -rf "$STATE/nodes"
    mkdir -p "$STATE/nodes" "$STATE/logs"
    printf '*\n' >"$STATE/.gitignore"

    NUM_WORKERS="$workers"; HEAD_CPUS="$head_cpus"; WORKER_CPUS="$worker_cpus"
    WORKER_GPUS="$worker_gpus"; OBJECT_STORE_MB="$osmb"; DASHBOARD="$dash"; UP_TIMEOUT="$timeout"
    CLUSTER_ID="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    BASE_PORT="$(pick_ports "$base" $((STRIDE * (workers + 1))))" || die "could not reserve ports"
    GCS_PORT="$BASE_PORT"
    ADDRESS="$HEAD_IP:$GCS_PORT"
    # Unix socket paths live under the temp dir and must stay < 108 bytes: keep it short.
    TEMP_DIR="$(mktemp -d /tmp/kdsr-XXXXXX)"

    # a fresh token every `up`, always at the same path so the exports stay valid
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE/auth_token")
    chmod 600 "$STATE/auth_token"
    auth_env

    {
        for v in CLUSTER_ID ADDRESS HEAD_IP GCS_PORT BASE_PORT NUM_WORKERS HEAD_CPUS WORKER_CPUS \
                 WORKER_GPUS OBJECT_STORE_MB DASHBOARD TEMP_DIR RAY_BIN UP_TIMEOUT; do
            printf '%s=%q\n' "$v" "${!v}"
        done
    } >"$STATE/cluster.env"
    echo "$ADDRESS" >"$STATE/address"
    print_exports "$ADDRESS" >"$STATE/env.sh"

    UP_OK=0
    trap 'if [[ "$UP_OK" != 1 ]]; then say "startup failed, stopping what was started"; stop_all 5; rm -f "$STATE/cluster.env" "$STATE/address"; rm -rf "$TEMP_DIR"; fi' EXIT

    say "starting head at $ADDRESS + $workers worker(s), ports $BASE_PORT..$((BASE_PORT + STRIDE * (workers + 1) - 1)), ray: $RAY_BIN"
    local deadline=$(($(date +%s) + timeout)) name
    launch_node head 0
    # workers only need the GCS: start them as soon as it accepts connections, while the head
    # is still bringing up its raylet and agents (they wait for the head node to register)
    wait_port "$HEAD_IP" "$GCS_PORT" "$deadline" head
    for ((i = 0; i < workers; i++)); do launch_node "worker-$i" $((i + 1)); done
    wait_node head "$deadline"
    for ((i = 0; i < workers; i++)); do wait_node "worker-$i" "$deadline"; done
    local left=$((deadline - $(date +%s)))
    ((left > 5)) || left=5
    gcs_nodes "$ADDRESS" $((workers + 1)) "$left" >&2 || die "the GCS does not see $((workers + 1)) alive nodes"
    UP_OK=1
    trap - EXIT
    cat "$STATE/env.sh"
}

cmd_down() {
    local keep=0 grace=20
    while (($#)); do
        case "$1" in
            --keep-temp) keep=1; shift ;;
            --grace) grace="$2"; shift 2 ;;
            *) die "down: unknown option $1" ;;
        esac
    done
    lock_state
    if ! load_state; then say "no cluster recorded in $STATE"; return 0; fi
    say "stopping $ADDRESS (head + $NUM_WORKERS worker(s))"
    local rc=0
    stop_all "$grace" || rc=1
    if [[ "$keep" == 0 && -n "${TEMP_DIR:-}" && "$TEMP_DIR" == /tmp/kdsr-* ]]; then rm -rf "$TEMP_DIR"; fi
    mv -f "$STATE/cluster.env" "$STATE/last-cluster.env"
    rm -f "$STATE/address"
    say "stopped; logs kept in $STATE/logs"
    return "$rc"
}

cmd_status() {
    STATE="$(cd "$STATE" 2>/dev/null && pwd || echo "$STATE")"
    if ! load_state; then echo "no cluster up (state dir: $STATE)"; return 3; fi
    auth_env
    local name ok=0
    echo "kdsearch local cluster  address $ADDRESS  state $STATE"
    printf '%-10s %-11s %-8s %-8s %-6s %s\n' node ip pid raylet procs state
    for name in $(node_names); do
        local pid raylet procs st
        pid="$(cat "$STATE/nodes/$name.pid" 2>/dev/null || echo -)"
        raylet="$(cat "$STATE/nodes/$name.raylet.pid" 2>/dev/null || echo -)"
        procs="$(node_pids "$name" | wc -l | tr -d ' ')"
        if [[ "$raylet" != - ]] && is_alive "$raylet" && [[ "$procs" -gt 0 ]]; then
            st=running
        else
            st=dead; ok=1
        fi
        printf '%-10s %-11s %-8s %-8s %-6s %s\n' "$name" "$(node_ip "$name")" "$pid" "$raylet" "$procs" "$st"
    done
    echo
    if ! gcs_listening; then
        echo "GCS at $ADDRESS is not accepting connections (head down?); run: local.sh down"
        return 1
    fi
    echo "GCS node table:"
    gcs_nodes "$ADDRESS" 0 10 || ok=1
    echo
    timeout 30 "$RAY_BIN" status --address "$ADDRESS" 2>&1 || ok=1
    return "$ok"
}

cmd_env() {
    STATE="$(cd "$STATE" 2>/dev/null && pwd || echo "$STATE")"
    load_state || die "no cluster up (state dir: $STATE)"
    print_exports "$ADDRESS"
}

worker_arg() {
    [[ "${1:-}" =~ ^[0-9]+$ ]] || die "expected a worker index"
    load_state || die "no cluster up (state dir: $STATE)"
    (($1 < NUM_WORKERS)) || die "no worker $1 (this cluster has $NUM_WORKERS)"
}

cmd_kill_worker() {
    lock_state
    worker_arg "${1:-}"
    local name="worker-$1" sid raylet pids
    sid="$(owned_sids "$name")"
    [[ -n "$sid" ]] || die "$name is not running"
    pids="$(session_pids "$sid" | tr '\n' ' ')"
    raylet="$(cat "$STATE/nodes/$name.raylet.pid")"
    # the raylet first, as when a VM vanishes; then the rest of the node
    if [[ " $pids " == *" $raylet "* ]]; then kill -KILL "$raylet" 2>/dev/null || true; fi
    stop_sessions KILL 5 "$sid" || true
    say "SIGKILLed $name (raylet $raylet): $pids"
    echo "$pids"
}

cmd_start_worker() {
    lock_state
    worker_arg "${1:-}"
    local name="worker-$1"
    [[ -z "$(owned_sids "$name")" ]] || die "$name is still running"
    resolve_ray_from_state
    auth_env
    launch_node "$name" $(($1 + 1))
    wait_node "$name" $(($(date +%s) + UP_TIMEOUT))
}

resolve_ray_from_state() { PY="$(dirname "$RAY_BIN")/python"; [[ -x "$PY" ]] || PY="$(command -v python3)"; }

main() {
    local cmd="${1:-help}"
    (($#)) && shift
    case "$cmd" in
        up) resolve_ray; cmd_up "$@" ;;
        down) cmd_down "$@" ;;
        status)
            if load_state 2>/dev/null; then resolve_ray_from_state; fi
            cmd_status
            ;;
        env) cmd_env ;;
        kill-worker) cmd_kill_worker "$@" ;;
        start-worker) cmd_start_worker "$@" ;;
        help | -h | --help) usage ;;
        *) usage >&2; exit 2 ;;
    esac
}

main "$@"
