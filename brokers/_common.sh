# shellcheck shell=bash
# Helpers shared by the brokers/* scripts. Sourced, not executed.
#
# Safety rule for every script here: the machine-wide servers on
# 127.0.0.1:6379 (Redis) and 127.0.0.1:5672 (RabbitMQ node rabbit@localhost)
# are never started, stopped or reconfigured. Only processes whose data dir is
# the one we were given are ever signalled.

BROKERS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
RUN_DIR="$BROKERS_DIR/run"

# Ports of the shared servers; refused outright.
SHARED_REDIS_PORT=6379
SHARED_RABBITMQ_PORT=5672

PROG="$(basename "$0")"

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# parse_args USAGE "$@" -> sets KILL (0/1), PORT, DATADIR_ARG
parse_args() {
    local usage="$1"; shift
    KILL=0
    local positional=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --kill) KILL=1 ;;
            -h|--help) printf 'usage: %s %s\n' "$PROG" "$usage"; exit 0 ;;
            --) shift; positional+=("$@"); break ;;
            -*) die "unknown option: $1 (usage: $PROG $usage)" ;;
            *) positional+=("$1") ;;
        esac
        shift
    done
    if [ "${#positional[@]}" -lt 1 ] || [ "${#positional[@]}" -gt 2 ]; then
        die "usage: $PROG $usage"
    fi
    PORT="${positional[0]}"
    DATADIR_ARG="${positional[1]:-}"
    case "$PORT" in
        ''|*[!0-9]*) die "PORT must be a number, got '$PORT'" ;;
    esac
    PORT=$((10#$PORT))
}

# abs_dir DIR -> absolute physical path of DIR (created if missing)
abs_dir() {
    mkdir -p -- "$1"
    (cd -- "$1" && pwd -P)
}

# abs_dir_nocreate DIR -> absolute path; does not create DIR
abs_dir_nocreate() {
    if [ -d "$1" ]; then
        (cd -- "$1" && pwd -P)
    else
        case "$1" in
            /*) printf '%s\n' "$1" ;;
            *) printf '%s/%s\n' "$(pwd -P)" "$1" ;;
        esac
    fi
}

# port_open PORT -> 0 if something accepts TCP connections on 127.0.0.1:PORT
port_open() {
    timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# pid_alive PID: the process exists and is not a zombie (a killed daemon can
# stay a zombie for a while until its reaper, often PID 1, collects it).
pid_alive() {
    local pid="${1:-}" stat
    [ -n "$pid" ] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    if [ -r "/proc/$pid/stat" ]; then
        stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
        stat="${stat##*) }"
        case "${stat%% *}" in
            Z|X) return 1 ;;
        esac
    fi
    return 0
}

# read_pidfile FILE -> pid (empty if missing/garbage)
read_pidfile() {
    local pid=""
    if [ -f "$1" ]; then
        pid="$(tr -dc '0-9' <"$1" 2>/dev/null || true)"
    fi
    printf '%s\n' "$pid"
}

# wait_pid_gone PID TIMEOUT_SECONDS -> 0 once PID is gone, 1 on timeout
wait_pid_gone() {
    local pid="$1" deadline=$((SECONDS + $2))
    while pid_alive "$pid"; do
        [ "$SECONDS" -ge "$deadline" ] && return 1
        sleep 0.1
    done
    return 0
}

# log_tail FILE: print the last lines of a log to stderr
log_tail() {
    if [ -f "$1" ]; then
        log "---- last lines of $1 ----"
        tail -n 40 -- "$1" >&2 || true
        log "----"
    else
        log "(no log file at $1)"
    fi
}

# ---------------------------------------------------------------- RabbitMQ --
# Directory with the real RabbitMQ scripts. On Debian, /usr/sbin/rabbitmq-*
# are wrappers that `su rabbitmq` (and redirect server output to
# /var/log/rabbitmq/startup_log, the shared node's file), so we call the
# scripts in /usr/lib/rabbitmq/bin directly, as the current user.
rabbit_bin_dir() {
    if [ -n "${EPQ_RABBITMQ_BIN:-}" ]; then
        printf '%s\n' "$EPQ_RABBITMQ_BIN"
    elif [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
        printf '%s\n' /usr/lib/rabbitmq/bin
    elif command -v rabbitmq-server >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v rabbitmq-server)")"
    else
        die "rabbitmq-server not found (apt-get install rabbitmq-server)"
    fi
}

# rabbit_setup_env PORT DATADIR: export everything that makes the node
# epq-PORT@localhost fully independent of the shared rabbit@localhost node.
rabbit_setup_env() {
    local port="$1" datadir="$2"
    [ "$port" -ge 1024 ] && [ "$port" -le 35525 ] \
        || die "RabbitMQ PORT must be 1024..35525 (dist port = PORT+20000, CLI ports = PORT+30000..+10), got $port"
    [ "$port" -ne "$SHARED_RABBITMQ_PORT" ] \
        || die "port $SHARED_RABBITMQ_PORT is the shared RabbitMQ; pick another port"

    RMQ_BIN="$(rabbit_bin_dir)"
    NODENAME="epq-$port@localhost"
    DIST_PORT=$((port + 20000))
    PIDFILE="$datadir/rabbitmq.pid"
    LOGDIR="$datadir/log"
    LOGFILE="$LOGDIR/$NODENAME.log"
    URL="amqp://guest:guest@127.0.0.1:$port/%2F"

    # Drop anything inherited that could point the node elsewhere.
    local v
    for v in $(compgen -e); do
        case "$v" in RABBITMQ_*|ERL_*) unset "$v" ;; esac
    done

    # Own Erlang cookie in DATADIR (HOME is only used for ~/.erlang.cookie);
    # nothing is written to the real home directory.
    export HOME="$datadir"
    export RABBITMQ_NODENAME="$NODENAME"
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT="$port"
    export RABBITMQ_DIST_PORT="$DIST_PORT"
    export RABBITMQ_CTL_DIST_PORT_MIN=$((port + 30000))
    export RABBITMQ_CTL_DIST_PORT_MAX=$((port + 30010))
    # Our own (empty) env file, so /etc/rabbitmq/rabbitmq-env.conf (which sets
    # NODENAME=rabbit@localhost) is not read.
    export RABBITMQ_CONF_ENV_FILE="$datadir/rabbitmq-env.conf"
    export RABBITMQ_CONFIG_FILE="$datadir/rabbitmq.conf"
    export RABBITMQ_CONFIG_FILES="$datadir/conf.d"
    export RABBITMQ_ADVANCED_CONFIG_FILE="$datadir/advanced.config"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$datadir/enabled_plugins"
    export RABBITMQ_MNESIA_BASE="$datadir/mnesia"
    export RABBITMQ_LOG_BASE="$LOGDIR"
    export RABBITMQ_PID_FILE="$PIDFILE"
    # Distribution (and an epmd we might have to start) on loopback only.
    export ERL_EPMD_ADDRESS=127.0.0.1
    export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
    export ERL_CRASH_DUMP="$datadir/erl_crash.dump"
}

# rabbit_ctl ARGS...: rabbitmqctl against our node (quiet)
rabbit_ctl() {
    "$RMQ_BIN/rabbitmqctl" -q -n "$NODENAME" "$@"
}

# is_our_beam PID DATADIR: PID is a beam.smp started with -home DATADIR
# (that is how our nodes are recognised; the shared node has
# -home /var/lib/rabbitmq).
is_our_beam() {
    local pid="$1" datadir="$2" prev="" arg
    pid_alive "$pid" || return 1
    [ -r "/proc/$pid/cmdline" ] || return 1
    case "$(cat "/proc/$pid/comm" 2>/dev/null)" in
        beam*) ;;
        *) return 1 ;;
    esac
    while IFS= read -r -d '' arg; do
        if [ "$prev" = "-home" ] && [ "$arg" = "$datadir" ]; then
            return 0
        fi
        prev="$arg"
    done <"/proc/$pid/cmdline"
    return 1
}

# find_our_beam DATADIR -> pid of our node's beam (pid file first, then /proc)
find_our_beam() {
    local datadir="$1" pid p
    pid="$(read_pidfile "$datadir/rabbitmq.pid")"
    if is_our_beam "$pid" "$datadir"; then
        printf '%s\n' "$pid"
        return 0
    fi
    for p in /proc/[0-9]*; do
        pid="${p#/proc/}"
        if is_our_beam "$pid" "$datadir"; then
            printf '%s\n' "$pid"
            return 0
        fi
    done
    return 1
}
