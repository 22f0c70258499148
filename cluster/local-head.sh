#!/usr/bin/env bash
# A private local Ray head for trying `ray job submit` on this machine.
#
#   cluster/local-head.sh start    start the head (dashboard on 127.0.0.1) and print how to submit
#   cluster/local-head.sh stop     stop THIS head only (never `ray stop`, which is machine-wide)
#   cluster/local-head.sh status   say whether the dashboard answers
#   cluster/local-head.sh pids     list the processes `stop` would signal
#
# Environment (all optional):
#   RAY                    ray executable (default: `ray` on PATH, e.g. from an activated venv); its
#                          directory goes first on the head's PATH, so jobs' `python` is that venv's
#   RAY_AUTH_MODE          exported to the head; default `disabled`; `token` is honoured
#   ATOMS_HEAD_DIR         Ray --temp-dir of this head, absolute and short (default /tmp/atoms-head);
#                          it identifies the head for `stop` and `status`
#   ATOMS_HEAD_PORT        GCS port (default 6380)
#   ATOMS_DASHBOARD_PORT   dashboard / jobs API port (default 8265)
#   ATOMS_HEAD_CPUS        --num-cpus (default: Ray detects the cores)
#   ATOMS_AGENT_PORT       dashboard agent HTTP port, which job submission needs (default: a random
#                          free port in 20000-29999, not Ray's 52365 that other local Rays take)
#   ATOMS_CLIENT_PORT      Ray client server port (default: a random free port in 20000-29999)
#   ATOMS_HEAD_WAIT        seconds `start` waits for the dashboard (default 60)
#
# How `stop` finds the processes of this head (checked on ray 2.60): `ray start` runs under
# `setsid`, so gcs_server, raylet, dashboard (+ its forkserver modules), agents, monitor, log
# monitor, client server and workers all share one session id, recorded in $ATOMS_HEAD_DIR/head.sid.
# Not every process carries the temp dir in its command line (`ray::DashboardAgent`,
# `ray::RuntimeEnvAgent`, `ray::IDLE` workers, the `ray-dashboard-*` modules and
# `python -m ray.util.client.server` do not), and job drivers are started by the job supervisor
# in a new session of their own (cwd under <temp dir>/session_*/runtime_resources/). So `stop`
# signals the union of: processes in the recorded session; processes whose command line contains
# the temp dir or the head's GCS address (`python -m ray.util.client.server --address=IP:PORT`);
# processes whose cwd is a job working dir of the head; and all descendants of those (job
# drivers and the supervisor's `while kill -s 0 ...` watcher), never this script or its
# ancestors. It signals the raylet first, then the other daemons, the GCS last, like `ray stop`.
set -euo pipefail

RAY=${RAY:-ray}
HEAD_DIR=${ATOMS_HEAD_DIR:-/tmp/atoms-head}
HEAD_DIR=${HEAD_DIR%/}
GCS_PORT=${ATOMS_HEAD_PORT:-6380}
DASH_PORT=${ATOMS_DASHBOARD_PORT:-8265}
AUTH_MODE=${RAY_AUTH_MODE:-disabled}
WAIT_S=${ATOMS_HEAD_WAIT:-60}
STATE="$HEAD_DIR/head.state"
SID_FILE="$HEAD_DIR/head.sid"
START_LOG="$HEAD_DIR/start.log"
SELF=$0

die() { echo "local-head: error: $*" >&2; exit 1; }
say() { echo "local-head: $*"; }

usage() {
    cat >&2 <<EOF
usage: $SELF {start|stop|status|pids}
  start   start a private Ray head (temp dir $HEAD_DIR, dashboard http://127.0.0.1:$DASH_PORT)
  stop    stop that head only (SIGTERM, then SIGKILL after ~10 s); never runs \`ray stop\`
  status  say whether it is up (exit 0 up, 3 down)
  pids    list the processes \`stop\` would signal (pid and command line)
env: RAY RAY_AUTH_MODE ATOMS_HEAD_DIR ATOMS_HEAD_PORT ATOMS_DASHBOARD_PORT ATOMS_HEAD_CPUS
     ATOMS_AGENT_PORT ATOMS_CLIENT_PORT ATOMS_HEAD_WAIT
EOF
}

is_port() { [[ $1 =~ ^[0-9]+$ ]] && (( $1 > 0 && $1 < 65536 )); }

check_dir() {
    [[ $HEAD_DIR == /* ]] || die "ATOMS_HEAD_DIR must be an absolute path (got '$HEAD_DIR')"
    # Ray puts unix sockets at <dir>/session_<date>_<pid>/sockets/plasma_store (limit 107 bytes).
    (( ${#HEAD_DIR} <= 40 )) || die "ATOMS_HEAD_DIR '$HEAD_DIR' is too long (max 40 chars; Ray socket paths)"
    # `stop` kills what mentions this dir: it must be the head's own, never a shared one.
    local parent=${HEAD_DIR%/*}
    if [[ -z $parent || $HEAD_DIR == /tmp/ray || $HEAD_DIR == "${HOME:-/root}" || $HEAD_DIR == */.. \
          || $HEAD_DIR == */. || $HEAD_DIR =~ ^/(tmp|var/tmp|dev/shm|home|root|usr|var|opt|work)$ ]]; then
        die "ATOMS_HEAD_DIR '$HEAD_DIR' must be a directory of its own, e.g. /tmp/atoms-head"
    fi
}

# The state file written by `start` wins over the environment for ports, so `stop`/`status`
# work from any shell as long as ATOMS_HEAD_DIR matches.
load_state() {
    if [[ -r $STATE ]]; then
        local k v
        while IFS='=' read -r k v; do
            case $k in
                DASH_PORT) DASH_PORT=$v ;;
                GCS_PORT) GCS_PORT=$v ;;
                AUTH_MODE) AUTH_MODE=$v ;;
            esac
        done < "$STATE"
    fi
}

port_in_use() {
    local port=$1
    if command -v ss > /dev/null 2>&1; then
        [[ -n $(ss -Hltn "sport = :$port" 2> /dev/null) ]]
    else
        (exec 3<> "/dev/tcp/127.0.0.1/$port") 2> /dev/null
    fi
}

# A random free port in 20000-29999: outside Ray's worker ports (10002-19999) and the kernel's
# ephemeral range, and not Ray's fixed defaults (52365, 10001), which other Ray instances on
# this machine (e.g. tests' embedded ray.init) grab at the same moment. Args: ports to avoid.
random_free_port() {
    local p i
    for (( i = 0; i < 100; i++ )); do
        p=$((20000 + RANDOM % 10000))
        [[ " $* " == *" $p "* ]] && continue
        port_in_use "$p" || { echo "$p"; return 0; }
    done
    return 1
}

curl_api() {  # curl_api PATH -> prints the body, a newline, then the HTTP code
    local args=(-s -m 3 -w '\n%{http_code}')
    if [[ $AUTH_MODE == token ]]; then
        local tok=${RAY_AUTH_TOKEN:-}
        local tok_path=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
        [[ -z $tok && -r $tok_path ]] && tok=$(< "$tok_path")
        [[ -n $tok ]] && args+=(-H "Authorization: Bearer $tok")
    fi
    curl "${args[@]}" "http://127.0.0.1:$DASH_PORT$1" 2> /dev/null || true
}

dashboard_code() {  # HTTP code of /api/version, 000 when nothing answers
    local out
    out=$(curl_api /api/version)
    out=${out##*$'\n'}
    echo "${out:-000}"
}

# ---------------------------------------------------------------- process discovery
declare -A P_PPID P_SID P_START P_CMD
scan_procs() {
    P_PPID=(); P_SID=(); P_START=(); P_CMD=()
    local d pid stat rest
    local -a f args
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        { read -r stat < "$d/stat"; } 2> /dev/null || continue
        rest=${stat##*) }                       # fields from 3 on (comm may contain spaces)
        read -r -a f <<< "$rest"
        [[ ${f[0]} == Z ]] && continue              # zombies are dead; their parent reaps them
        P_PPID[$pid]=${f[1]}; P_SID[$pid]=${f[3]}; P_START[$pid]=${f[19]}
        args=()
        { mapfile -d '' -t args < "$d/cmdline"; } 2> /dev/null || true
        P_CMD[$pid]="${args[*]:-}"
    done
}

# Sets HEAD to "pid starttime" for every process of this head (P_CMD etc. stay filled in).
HEAD=()
head_pids() {
    scan_procs
    local sid="" gcs_addr="" pid cwd
    [[ -r $SID_FILE ]] && sid=$(< "$SID_FILE")
    [[ -r $HEAD_DIR/ray_current_cluster ]] && gcs_addr=$(head -n1 "$HEAD_DIR/ray_current_cluster")
    # never this script, its subshells or its ancestors (e.g. a shell whose cwd is the temp dir)
    declare -A mine=() hit=()
    pid=$$
    while [[ -n $pid && $pid != 0 ]]; do mine[$pid]=1; pid=${P_PPID[$pid]:-}; done
    for pid in "${!P_PPID[@]}"; do
        local q=$pid
        while [[ -n $q && $q != 0 && $q != 1 ]]; do
            [[ $q == "$$" ]] && { mine[$pid]=1; break; }
            q=${P_PPID[$q]:-}
        done
    done
    # 1. anchors: command line names the temp dir (gcs_server, raylet, dashboard, monitors, ...)
    local cmd sid_ok=0
    for pid in "${!P_CMD[@]}"; do
        [[ -n ${mine[$pid]:-} ]] && continue
        cmd=" ${P_CMD[$pid]} "
        if [[ $cmd == *"$HEAD_DIR/"* || $cmd == *[\ =]"$HEAD_DIR "* ]]; then
            hit[$pid]=1
            [[ -n $sid && ${P_SID[$pid]} == "$sid" ]] && sid_ok=1
        fi
    done
    # The recorded session id and GCS address are trusted only while an anchor is alive (in that
    # session): after a crash their numbers may be reused by someone else's processes.
    (( sid_ok )) || sid=""
    (( ${#hit[@]} > 0 )) || gcs_addr=""
    # 2. same session, the head's GCS address, or a cwd in one of the head's job working dirs
    for pid in "${!P_CMD[@]}"; do
        [[ -n ${mine[$pid]:-} || -n ${hit[$pid]:-} ]] && continue
        cmd=" ${P_CMD[$pid]} "
        if [[ -n $sid && ${P_SID[$pid]} == "$sid" ]] \
            || [[ -n $gcs_addr && $cmd == *[\ =/@]"$gcs_addr "* ]]; then
            hit[$pid]=1
            continue
        fi
        cwd=$(readlink "/proc/$pid/cwd" 2> /dev/null) || continue
        # job drivers run in Ray's per-job working dir (not a user's shell sitting in the temp dir)
        [[ $cwd == "$HEAD_DIR"/session_*/runtime_resources/* ]] && hit[$pid]=1
    done
    # descendants (job drivers live in their own session but are children of the supervisor)
    local changed=1
    while (( changed )); do
        changed=0
        for pid in "${!P_PPID[@]}"; do
            [[ -n ${mine[$pid]:-} ]] && continue
            [[ -z ${hit[$pid]:-} && -n ${hit[${P_PPID[$pid]}]:-} ]] && { hit[$pid]=1; changed=1; }
        done
    done
    HEAD=()
    for pid in "${!hit[@]}"; do
        [[ $pid == 1 ]] && continue
        HEAD+=("$pid ${P_START[$pid]}")
    done
    return 0
}

alive_same() {  # alive_same PID STARTTIME: still the same process?
    local stat rest
    local -a f
    { read -r stat < "/proc/$1/stat"; } 2> /dev/null || return 1
    rest=${stat##*) }
    read -r -a f <<< "$rest"
    [[ ${f[19]} == "$2" && ${f[0]} != Z ]]
}

# term_and_wait DEADLINE "pid starttime"...: SIGTERM them, wait until they are gone or until
# DEADLINE seconds after $t0 (a variable of the caller).
term_and_wait() {
    local deadline=$1 line alive
    shift
    for line in "$@"; do kill -TERM "${line%% *}" 2> /dev/null || true; done
    while (( SECONDS - t0 < deadline )); do
        alive=0
        for line in "$@"; do
            alive_same "${line%% *}" "${line#* }" && { alive=1; break; }
        done
        (( alive )) || return 0
        sleep 0.2
    done
    return 0
}

# ---------------------------------------------------------------- commands
cmd_stop() {
    check_dir
    local -a victims=() survivors=()
    local line pid i
    head_pids; victims=("${HEAD[@]}")
    if (( ${#victims[@]} == 0 )); then
        say "no head running for $HEAD_DIR; nothing to stop"
        rm -f "$SID_FILE"
        return 0
    fi
    say "stopping ${#victims[@]} processes of the head in $HEAD_DIR (SIGTERM, then SIGKILL after ~10 s)"
    # Same order as `ray stop`: raylet first (it stops its workers and agents), then the other
    # daemons, the GCS last; a GCS signalled together with the rest hangs in its shutdown flush.
    local -a raylets=() others=() gcs=()
    for line in "${victims[@]}"; do
        pid=${line%% *}
        case ${P_CMD[$pid]:-} in
            */raylet/raylet\ * | */raylet/raylet) raylets+=("$line") ;;
            */gcs/gcs_server\ * | */gcs/gcs_server) gcs+=("$line") ;;
            *) others+=("$line") ;;
        esac
    done
    local t0=$SECONDS
    term_and_wait 4 "${raylets[@]}"
    term_and_wait 7 "${others[@]}"
    term_and_wait 10 "${gcs[@]}"
    survivors=()
    for line in "${victims[@]}"; do
        alive_same "${line%% *}" "${line#* }" && survivors+=("$line")
    done
    if (( ${#survivors[@]} > 0 )); then
        say "SIGKILL to ${#survivors[@]} survivors after $((SECONDS - t0)) s: $(printf '%s ' "${survivors[@]%% *}")"
        for line in "${survivors[@]}"; do
            kill -KILL "${line%% *}" 2> /dev/null || true
        done
    fi
    # processes started while we were killing (e.g. a worker being spawned): one more round
    for (( i = 0; i < 3; i++ )); do
        head_pids; victims=("${HEAD[@]}")
        (( ${#victims[@]} == 0 )) && break
        for line in "${victims[@]}"; do kill -KILL "${line%% *}" 2> /dev/null || true; done
        sleep 0.3
    done
    head_pids; victims=("${HEAD[@]}")
    (( ${#victims[@]} == 0 )) || die "could not stop processes: $(printf '%s ' "${victims[@]%% *}")"
    rm -f "$SID_FILE" "$HEAD_DIR/ray_current_cluster"
    say "stopped (logs kept in $HEAD_DIR)"
}

cmd_status() {
    check_dir
    load_state
    local code n
    code=$(dashboard_code)
    head_pids; n=${#HEAD[@]}
    if [[ $code == 200 || $code == 401 || $code == 403 ]]; then
        local body
        body=$(curl_api /api/version); body=${body%$'\n'*}
        say "up: dashboard http://127.0.0.1:$DASH_PORT (HTTP $code), $n processes, temp dir $HEAD_DIR"
        [[ $code == 200 ]] && echo "$body"
        return 0
    fi
    if (( n > 0 )); then
        say "down: dashboard http://127.0.0.1:$DASH_PORT does not answer, but $n processes of $HEAD_DIR are alive (run: $SELF stop)"
    else
        say "down: no head at http://127.0.0.1:$DASH_PORT for $HEAD_DIR"
    fi
    return 3
}

cmd_start() {
    check_dir
    local p
    for p in "$GCS_PORT" "$DASH_PORT" ${ATOMS_AGENT_PORT:+"$ATOMS_AGENT_PORT"} \
             ${ATOMS_CLIENT_PORT:+"$ATOMS_CLIENT_PORT"}; do
        is_port "$p" || die "invalid port '$p'"
    done
    if [[ -n ${ATOMS_HEAD_CPUS:-} && ! $ATOMS_HEAD_CPUS =~ ^[0-9]+$ ]]; then
        die "ATOMS_HEAD_CPUS must be an integer (got '$ATOMS_HEAD_CPUS')"
    fi
    case $AUTH_MODE in
        disabled) ;;
        token)
            if [[ -z ${RAY_AUTH_TOKEN:-} && ! -s ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token} ]]; then
                die "RAY_AUTH_MODE=token but no token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (create one: ray get-auth-token --generate)"
            fi ;;
        *) die "RAY_AUTH_MODE must be 'disabled' or 'token' (got '$AUTH_MODE')" ;;
    esac
    local ray_bin
    ray_bin=$(command -v "$RAY" 2> /dev/null) || die "ray not found ('$RAY'); activate the venv or set RAY=/path/to/ray"
    command -v curl > /dev/null || die "curl not found"
    command -v setsid > /dev/null || die "setsid not found (util-linux)"

    head_pids
    if (( ${#HEAD[@]} > 0 )); then
        die "a head is already running in $HEAD_DIR (run: $SELF status / $SELF stop)"
    fi
    port_in_use "$GCS_PORT" && die "port $GCS_PORT (GCS) is in use; set ATOMS_HEAD_PORT"
    port_in_use "$DASH_PORT" && die "port $DASH_PORT (dashboard) is in use; set ATOMS_DASHBOARD_PORT"
    local agent_port client_port
    if [[ -n ${ATOMS_AGENT_PORT:-} ]]; then
        agent_port=$ATOMS_AGENT_PORT
        port_in_use "$agent_port" && die "port $agent_port (dashboard agent) is in use; set ATOMS_AGENT_PORT"
    else
        agent_port=$(random_free_port "$GCS_PORT" "$DASH_PORT") \
            || die "no free port for the dashboard agent; set ATOMS_AGENT_PORT"
    fi
    if [[ -n ${ATOMS_CLIENT_PORT:-} ]]; then
        client_port=$ATOMS_CLIENT_PORT
        port_in_use "$client_port" && die "port $client_port (Ray client) is in use; set ATOMS_CLIENT_PORT"
    else
        client_port=$(random_free_port "$GCS_PORT" "$DASH_PORT" "$agent_port") \
            || die "no free port for the Ray client server; set ATOMS_CLIENT_PORT"
    fi
    [[ $(printf '%s\n' "$GCS_PORT" "$DASH_PORT" "$agent_port" "$client_port" | sort -u | wc -l) == 4 ]] \
        || die "ports must differ: GCS $GCS_PORT, dashboard $DASH_PORT, agent $agent_port, client $client_port"

    mkdir -p "$HEAD_DIR"
    rm -f "$SID_FILE" "$HEAD_DIR/ray_current_cluster"
    printf 'DASH_PORT=%s\nGCS_PORT=%s\nAUTH_MODE=%s\nAGENT_PORT=%s\nCLIENT_PORT=%s\n' \
        "$DASH_PORT" "$GCS_PORT" "$AUTH_MODE" "$agent_port" "$client_port" > "$STATE"

    local -a args=(start --head --port="$GCS_PORT"
        --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT"
        --dashboard-agent-listen-port="$agent_port" --ray-client-server-port="$client_port"
        --temp-dir="$HEAD_DIR" --disable-usage-stats --log-style=record --log-color=false)
    [[ -n ${ATOMS_HEAD_CPUS:-} ]] && args+=(--num-cpus="$ATOMS_HEAD_CPUS")

    say "starting Ray head in $HEAD_DIR (RAY_AUTH_MODE=$AUTH_MODE, ray: $ray_bin)"
    local t0=$SECONDS rc=0
    # A new session: every daemon of this head shares it, which is how `stop` finds them.
    (
        unset RAY_ADDRESS RAY_API_SERVER_ADDRESS
        # `python` in a job's entrypoint must be the interpreter that has ray (e.g. RAY=.venv/bin/ray
        # without an activated venv): put ray's bin directory first on the head's PATH.
        export PATH="$(dirname "$ray_bin"):$PATH"
        export RAY_AUTH_MODE=$AUTH_MODE RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_ENABLE_STATE_TRACKING=1
        exec setsid -w bash -c 'echo $$ > "$1"; shift; exec "$@"' _ "$SID_FILE" "$ray_bin" "${args[@]}"
    ) < /dev/null > "$START_LOG" 2>&1 || rc=$?
    if (( rc != 0 )); then
        tail -n 25 "$START_LOG" >&2 || true
        cmd_stop > /dev/null 2>&1 || true
        die "ray start failed (exit $rc); full log: $START_LOG"
    fi
    # Ready = the dashboard answers and the dashboard agent (which runs submitted jobs) listens.
    local code=000 agent_log="$HEAD_DIR/session_latest/logs/dashboard_agent.log" agent_up=0
    while (( SECONDS - t0 < WAIT_S )); do
        if grep -qs "failed to bind" "$agent_log"; then
            cmd_stop > /dev/null 2>&1 || true
            die "the dashboard agent could not bind port $agent_port (taken meanwhile?); start again or set ATOMS_AGENT_PORT"
        fi
        [[ $code == 200 || $code == 401 || $code == 403 ]] || code=$(dashboard_code)
        (( agent_up )) || { port_in_use "$agent_port" && agent_up=1; }
        [[ ($code == 200 || $code == 401 || $code == 403) && $agent_up == 1 ]] && break
        sleep 0.5
    done
    if [[ $code != 200 && $code != 401 && $code != 403 ]] || (( ! agent_up )); then
        tail -n 25 "$START_LOG" >&2 || true
        cmd_stop > /dev/null 2>&1 || true
        die "head not ready within ${WAIT_S}s (dashboard HTTP $code, agent port $agent_port up: $agent_up); see $HEAD_DIR/session_latest/logs"
    fi

    local token_hint=""
    if [[ $AUTH_MODE == token && -n ${RAY_AUTH_TOKEN_PATH:-} ]]; then
        token_hint=$'\n'"  export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
    fi
    local stop_cmd="$SELF stop"
    [[ $HEAD_DIR != /tmp/atoms-head ]] && stop_cmd="ATOMS_HEAD_DIR=$HEAD_DIR $stop_cmd"
    cat <<EOF
local-head: up after $((SECONDS - t0)) s
  dashboard:   http://127.0.0.1:$DASH_PORT
  GCS address: 127.0.0.1:$GCS_PORT  (RAY_TRAIN_ENABLE_STATE_TRACKING=1: the Train tab shows runs)
  temp dir:    $HEAD_DIR  (logs: $HEAD_DIR/session_latest/logs)

Submit from the repository root (the client needs the same RAY_AUTH_MODE as the head):
  export RAY_AUTH_MODE=$AUTH_MODE$token_hint
  ray job submit --address http://127.0.0.1:$DASH_PORT --working-dir . -- python experiments/scaling.py --config CONFIG.yaml

Stop it with:  $stop_cmd      (never \`ray stop\`: it kills every Ray on the machine)
EOF
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    pids)
        check_dir; head_pids
        for line in "${HEAD[@]}"; do
            pid=${line%% *}; printf '%s %s\n' "$pid" "${P_CMD[$pid]:0:150}"
        done ;;
    -h | --help | help) usage; exit 0 ;;
    *) usage; exit 2 ;;
esac
