# shellcheck shell=bash disable=SC2034
# Shared helpers for the peer tests (source it; bash only).
#
# A test calls peer_init NAME LIMIT_SECONDS first. Then every process it starts with
# spawn is stopped (by PID) when the test ends, its temp dir under /tmp, its /dev/shm
# files and its DPDK runtime dirs are removed, and a watchdog fails the test after
# LIMIT_SECONDS. End with pass; fail REASON prints "FAIL NAME: REASON", the tails of the
# logs, and exits 1.
#
# Environment:
#   VDPAD, VDPACTL   the binaries (default: $(swift build --show-bin-path)/vdpad, vdpactl)
#   VDPA_CACHE       guest kernel and initramfs cache (see scripts/install-deps)
#   VDPA_KEEP_TMP=1  keep the temp dir (its path is printed)
#   VDPA_VERBOSE=1   print progress lines ("... name: step") to stderr
#   VDPA_LOG_LEVEL   vdpad --log-level (default debug)

PEERS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO_ROOT=$(cd "$PEERS_DIR/../.." && pwd)
GUEST_DIR=$REPO_ROOT/scripts/guest
CHECK_STATUS=$PEERS_DIR/lib/check-status.py

declare -A PIDS=()
declare -a SHM_FILES=() DPDK_PREFIXES=() CLEANUP_CMDS=()
TEST_NAME=unnamed
TMP=
WATCHDOG_PID=
FINISHED=0

log() { [[ ${VDPA_VERBOSE:-0} == 1 ]] && echo "... $TEST_NAME: $*" >&2; return 0; }

peer_init() {
    TEST_NAME=$1
    PEER_LIMIT=${2:-120}
    TMP=$(mktemp -d "/tmp/vdpa-peer-$TEST_NAME.XXXXXX")
    # The watchdog starts before the traps are set: a subshell that gets TERM before its own
    # `trap` lines ran would otherwise run the inherited EXIT trap (a second, bogus "FAIL ...
    # ended early" from a test that ends within milliseconds, e.g. one that skips).
    local self=$$
    (
        trap - EXIT INT USR1
        sp=''
        trap '[[ -n $sp ]] && kill "$sp" 2>/dev/null; exit 0' TERM
        sleep "$PEER_LIMIT" & sp=$!
        wait "$sp" && kill -USR1 "$self" 2>/dev/null
    ) &
    WATCHDOG_PID=$!
    trap peer_cleanup EXIT
    trap 'fail "interrupted"' INT TERM
    trap 'fail "timed out after ${PEER_LIMIT}s (test watchdog)"' USR1
    log "temp dir $TMP"
}

# shm_file NAME: set SHM to a unique /dev/shm path for this test (removed at the end).
# (Not a function printing it: $(...) would lose the record.)
SHM=
shm_file() {
    SHM=/dev/shm/vdpa-peer-$TEST_NAME-$$-$1
    SHM_FILES+=("$SHM")
}

# spawn NAME CMD...: start CMD in the background, output to $TMP/NAME.log.
spawn() {
    local name=$1; shift
    log "start $name: $*"
    "$@" </dev/null >"$TMP/$name.log" 2>&1 &
    PIDS[$name]=$!
}

# spawn_input NAME FIFO CMD...: like spawn, but CMD's stdin is the named pipe FIFO (made
# here). The test keeps it open for writing on a new fd whose number is left in INPUT_FD, so
# CMD never sees EOF until the test ends: printf 'start\n' >&"$INPUT_FD".
INPUT_FD=
spawn_input() {
    local name=$1 fifo=$2; shift 2
    mkfifo "$fifo" || fail "mkfifo $fifo failed"
    exec {INPUT_FD}<>"$fifo"
    log "start $name (stdin $fifo): $*"
    "$@" <"$fifo" >"$TMP/$name.log" 2>&1 &
    PIDS[$name]=$!
}

alive() { [[ -n ${PIDS[$1]:-} ]] && kill -0 "${PIDS[$1]}" 2>/dev/null; }

# stop NAME [SIGNAL] [SECONDS]: signal it (default TERM), wait, then KILL. Returns the
# process's exit status (or 137 after KILL).
stop() {
    local name=$1 sig=${2:-TERM} secs=${3:-10} pid=${PIDS[$1]:-} i rc=0
    [[ -n $pid ]] || return 0
    log "stop $name ($sig)"
    kill "-$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "... $TEST_NAME: $name did not stop on $sig within ${secs}s, killing" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || rc=$?
    unset "PIDS[$name]"
    return $rc
}

peer_cleanup() {
    local rc=$? name
    trap - EXIT INT TERM USR1
    [[ -n $WATCHDOG_PID ]] && kill "$WATCHDOG_PID" 2>/dev/null
    for name in "${!PIDS[@]}"; do kill -TERM "${PIDS[$name]}" 2>/dev/null || true; done
    local i
    for ((i = 0; i < 50; i++)); do
        local any=0
        for name in "${!PIDS[@]}"; do kill -0 "${PIDS[$name]}" 2>/dev/null && any=1; done
        ((any)) || break
        sleep 0.1
    done
    for name in "${!PIDS[@]}"; do kill -KILL "${PIDS[$name]}" 2>/dev/null || true; done
    wait 2>/dev/null
    local f
    for ((i = ${#CLEANUP_CMDS[@]} - 1; i >= 0; i--)); do
        log "cleanup: ${CLEANUP_CMDS[$i]}"
        eval "${CLEANUP_CMDS[$i]}" >/dev/null 2>&1 || true
    done
    for f in "${SHM_FILES[@]}"; do rm -f "$f"; done
    for f in "${DPDK_PREFIXES[@]}"; do rm -rf "/var/run/dpdk/$f"; done
    if [[ -n $TMP ]]; then
        if [[ ${VDPA_KEEP_TMP:-0} == 1 ]]; then echo "... $TEST_NAME: kept $TMP" >&2
        else rm -rf "$TMP"; fi
    fi
    if [[ $FINISHED == 0 ]]; then
        echo "FAIL $TEST_NAME: test script ended early (status $rc)"
        rc=1
    fi
    exit $rc
}

# on_cleanup COMMAND-LINE: eval it when the test ends, after every spawned process has
# stopped (latest registered first; errors ignored). For things that are not processes:
# network namespaces, interfaces.
on_cleanup() { CLEANUP_CMDS+=("$*"); }

# Print the last lines of every log in $TMP to stderr (for a failure).
dump_logs() {
    local f
    for f in "$TMP"/*.log; do
        [[ -s $f ]] || continue
        echo "----- $TEST_NAME: tail of ${f##*/} -----" >&2
        # testpmd's stats screens are long and repetitive: drop escape sequences and them.
        tail -n 400 "$f" | sed 's/\x1b\[[0-9;]*[A-Za-z]//g' |
            grep -v -e '^ *$' -e 'RX-\|TX-\|Rx-pps\|Tx-pps\|Rx-bps\|Tx-bps\|####\|Throughput\|statistics for port' |
            tail -n 25 >&2
    done
}

fail() {
    FINISHED=1
    echo "FAIL $TEST_NAME: $*"
    dump_logs
    exit 1
}

pass() {
    FINISHED=1
    echo "PASS $TEST_NAME${1:+ ($1)}"
    exit 0
}

# wait_until SECONDS DESCRIPTION CMD...: poll CMD every 0.1 s.
wait_until() {
    local secs=$1 what=$2; shift 2
    local deadline=$((SECONDS + secs))
    until "$@"; do
        ((SECONDS < deadline)) || fail "timed out after ${secs}s waiting for $what"
        sleep 0.1
    done
}

# wait_for_socket PATH SECONDS [PROCESS]: the socket exists (fail early if PROCESS died).
wait_for_socket() {
    local path=$1 secs=$2 proc=${3:-} deadline=$((SECONDS + $2))
    until [[ -S $path ]]; do
        if [[ -n $proc ]] && ! alive "$proc"; then fail "$proc exited before creating $path"; fi
        ((SECONDS < deadline)) || fail "timed out after ${secs}s waiting for socket $path"
        sleep 0.1
    done
}

# wait_for_log FILE REGEX SECONDS [PROCESS]: a line of FILE matches (grep -E).
wait_for_log() {
    local file=$1 re=$2 secs=$3 proc=${4:-} deadline=$((SECONDS + $3))
    until grep -qaE "$re" "$file" 2>/dev/null; do
        if [[ -n $proc ]] && ! alive "$proc"; then fail "$proc exited before '$re' appeared in ${file##*/}"; fi
        ((SECONDS < deadline)) || fail "timed out after ${secs}s waiting for '$re' in ${file##*/}"
        sleep 0.1
    done
}

# --- vdpad ---------------------------------------------------------------------------------
resolve_bins() {
    if [[ -z ${VDPAD:-} || -z ${VDPACTL:-} ]]; then
        local bin
        bin=$(cd "$REPO_ROOT" && timeout 600 swift build --show-bin-path 2>/dev/null) ||
            fail "swift build --show-bin-path failed (set VDPAD and VDPACTL)"
        VDPAD=${VDPAD:-$bin/vdpad}
        VDPACTL=${VDPACTL:-$bin/vdpactl}
    fi
    [[ -x $VDPAD ]] || fail "vdpad not built: no executable at $VDPAD (swift build)"
    [[ -x $VDPACTL ]] || fail "vdpactl not built: no executable at $VDPACTL (swift build)"
}

CONTROL=
# start_vdpad ARGS...: vdpad with a control socket in $TMP; waits for the control socket.
start_vdpad() {
    resolve_bins
    CONTROL=$TMP/control.sock
    spawn vdpad "$VDPAD" --control "$CONTROL" --log-level "${VDPA_LOG_LEVEL:-debug}" "$@"
    wait_for_socket "$CONTROL" 20 vdpad
}

# vdpa_status: the JSON of `vdpactl status --json` on stdout (non-zero if vdpactl failed).
vdpa_status() {
    timeout 5 "$VDPACTL" --control "$CONTROL" status --json
}

# wait_status SECONDS CHECK-STATUS-ARGS...: poll vdpactl status until check-status.py
# accepts it. STATUS_SUMMARY holds its summary afterwards. Fails the test on timeout with
# the last reason, or at once if vdpad died.
STATUS_SUMMARY=
wait_status() {
    local secs=$1; shift
    local deadline=$((SECONDS + secs)) json reason
    while :; do
        if json=$(vdpa_status 2>"$TMP/vdpactl.err"); then
            if reason=$(printf '%s' "$json" | python3 "$CHECK_STATUS" "$@" 2>&1); then
                STATUS_SUMMARY=$reason
                log "status ok: $reason"
                return 0
            fi
        else
            reason="vdpactl status failed: $(head -c 300 "$TMP/vdpactl.err")"
        fi
        alive vdpad || fail "vdpad exited; last status check: $reason"
        if ((SECONDS >= deadline)); then
            printf '%s\n' "$json" > "$TMP/last-status.log"
            fail "status not as expected after ${secs}s: $reason"
        fi
        sleep 0.2
    done
}

# --- DPDK testpmd --------------------------------------------------------------------------
TESTPMD=${TESTPMD:-dpdk-testpmd}

# start_testpmd_frontend NAME SOCKET [QUEUES]: testpmd with a virtio-user port (a vhost-user
# frontend) connecting to SOCKET. Main lcore 1, so a DPDK backend on main lcore 0 does not
# share its forwarding core.
start_testpmd_frontend() {
    local name=$1 sock=$2 queues=${3:-1} prefix=vu-$$-$1
    DPDK_PREFIXES+=("$prefix")
    spawn "$name" "$TESTPMD" -l 0-1 --main-lcore 1 --no-huge -m 1024 --no-pci \
        --file-prefix="$prefix" --vdev "net_virtio_user0,path=$sock,queues=$queues" -- \
        --no-mlockall --forward-mode=io -a --total-num-mbufs=16384 --stats-period 1
}

# start_testpmd_vhost NAME SOCKET [client] [FORWARD-MODE] [VDEV-OPTIONS]: testpmd with a
# vhost-user backend port (DPDK's vhost PMD). FORWARD-MODE defaults to io: frames looped back to
# the frontend (loop topology); icmpecho answers the frontend's ARP requests and pings.
# VDEV-OPTIONS are appended to net_vhost0's (e.g. ",tso=1").
start_testpmd_vhost() {
    local name=$1 sock=$2 client=${3:+,client=1} fwd=${4:-io} prefix=vh-$$-$1
    DPDK_PREFIXES+=("$prefix")
    spawn "$name" "$TESTPMD" -l 0-1 --main-lcore 0 --no-huge -m 1024 --no-pci \
        --file-prefix="$prefix" --vdev "net_vhost0,iface=$sock,queues=1$client${5:-}" -- \
        --no-mlockall --forward-mode="$fwd" --port-topology=loop -a --total-num-mbufs=16384 \
        --stats-period 1
}

# --- QEMU ----------------------------------------------------------------------------------
# start_qemu NAME RUN-QEMU-ARGS...: the guest, with its serial log $TMP/NAME.serial.log, HMP
# monitor $TMP/NAME.mon, command channel $TMP/NAME.cmd and RAM in a unique /dev/shm file.
# QEMU's own stderr goes to $TMP/NAME.log.
start_qemu() {
    local name=$1; shift
    shm_file "$name"
    spawn "$name" "$GUEST_DIR/run-qemu" --name "$name" --shm "$SHM" \
        --serial-log "$TMP/$name.serial.log" --monitor "$TMP/$name.mon" \
        --cmd-sock "$TMP/$name.cmd" "$@"
}

# wait_guest NAME SECONDS: the guest's eth0 is up (marker on its console).
wait_guest() {
    wait_for_log "$TMP/$1.serial.log" '^VDPA-GUEST: eth0 up' "$2" "$1"
    log "$1: $(grep -a '^VDPA-GUEST: eth0 up' "$TMP/$1.serial.log")"
}

# monitor NAME COMMAND: send an HMP command to QEMU's monitor, print the reply.
monitor() {
    timeout 10 python3 - "$TMP/$1.mon" "$2" <<'EOF'
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(2)
def read_prompt():
    buf = b""
    while not buf.endswith(b"(qemu) "):
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        buf += chunk
    return buf
read_prompt()
s.sendall(sys.argv[2].encode() + b"\n")
out = read_prompt().decode(errors="replace")
lines = [l for l in out.replace("\r", "").split("\n") if "(qemu)" not in l and "\x1b" not in l]
print("\n".join(lines).strip())
EOF
}

# stop_qemu NAME: "quit" on the monitor (QEMU stops the vhost-user device properly), then
# wait; stop() signals it if it does not exit.
stop_qemu() {
    alive "$1" || return 0
    monitor "$1" quit >/dev/null 2>&1 || true
    stop "$1" TERM 10 || true
}

# guest_exec NAME COMMAND: run a shell command in the guest (scripts/guest/guest-exec),
# within GUEST_EXEC_TIMEOUT seconds (default 20).
guest_exec() {
    local name=$1; shift
    "$GUEST_DIR/guest-exec" --timeout "${GUEST_EXEC_TIMEOUT:-20}" --serial-log "$TMP/$name.serial.log" \
        "$TMP/$name.cmd" "$@"
}

# Guest files are there? (scripts/install-deps makes them.)
require_guest() {
    local cache=${VDPA_CACHE:-${HOME:-/root}/.cache/swift-vdpa}
    [[ -r $cache/guest/vmlinuz && -r $cache/guest/initramfs.cpio.gz ]] ||
        fail "no guest kernel/initramfs in $cache/guest: run scripts/install-deps"
    command -v qemu-system-x86_64 >/dev/null || fail "qemu-system-x86_64 missing: run scripts/install-deps"
}

require_testpmd() {
    command -v "$TESTPMD" >/dev/null || fail "$TESTPMD missing: run scripts/install-deps"
}

# --- data-path counters ---------------------------------------------------------------------
STATS_PY=$PEERS_DIR/lib/stats.py
TESTPMD_STATS_PY=$PEERS_DIR/lib/testpmd-stats.py

# vdpa_stats: the JSON of `vdpactl stats --json` on stdout (non-zero if vdpactl failed).
vdpa_stats() {
    timeout 5 "$VDPACTL" --control "$CONTROL" stats --json
}

# load_stats PORT PREFIX: set PREFIX_qI_packets, PREFIX_qI_drops, ... from vdpactl stats
# (lib/stats.py lists the names); the JSON is kept in $TMP/stats-PREFIX.log. Fails the test
# if vdpactl or the JSON fails.
load_stats() {
    local json vars
    json=$(vdpa_stats 2>"$TMP/vdpactl.err") ||
        fail "vdpactl stats failed: $(head -c 300 "$TMP/vdpactl.err")"
    printf '%s\n' "$json" > "$TMP/stats-$2.log"
    vars=$(printf '%s' "$json" | python3 "$STATS_PY" --port "$1" --prefix "$2" 2>"$TMP/stats-py.err") ||
        fail "bad stats reply: $(head -c 300 "$TMP/stats-py.err")"
    [[ -s $TMP/stats-py.err ]] && fail "stats reply incomplete: $(head -c 300 "$TMP/stats-py.err")"
    eval "$vars"
}

# qstat PREFIX QUEUE FIELD: print a loaded counter (e.g. qstat s 1 packets, qstat s 0 drop_noBuffer).
qstat() { local v=${1}_q${2}_$3; printf '%s' "${!v:-}"; }

# no_faults PREFIX [WHAT]: every queue of the loaded stats has faults=0 and no error.
no_faults() {
    local p=$1 what=${2:-} n=${1}_queues i f e
    for ((i = 0; i < ${!n:-0}; i++)); do
        f=$(qstat "$p" "$i" faults) e=$(qstat "$p" "$i" error)
        [[ $f == 0 && -z $e ]] || fail "${what:+$what: }queue $i has a device fault: faults=$f error=$e"
    done
}

# start_testpmd_app NAME SOCKET QUEUES TESTPMD-APP-ARGS...: testpmd with a virtio-user port on
# SOCKET (main lcore 1, forwarding on lcore 0), auto-start, stats every second, and the given
# application arguments (--forward-mode=..., ...).
start_testpmd_app() {
    local name=$1 sock=$2 queues=$3
    shift 3
    testpmd_cmd "$name" "$sock" "$queues"
    spawn "$name" "${TESTPMD_CMD[@]}" -a --stats-period 1 "$@"
}

# testpmd_cmd NAME SOCKET QUEUES: set the array TESTPMD_CMD to testpmd with a virtio-user port
# on SOCKET, up to and including "-- --no-mlockall --total-num-mbufs=16384"; append the
# application arguments. Its DPDK runtime dir is removed at the end.
TESTPMD_CMD=()
testpmd_cmd() {
    local prefix=vu-$$-$1
    DPDK_PREFIXES+=("$prefix")
    TESTPMD_CMD=("$TESTPMD" -l 0-1 --main-lcore 1 --no-huge -m 1024 --no-pci
        --file-prefix="$prefix" --vdev "net_virtio_user0,path=$2,queues=$3" --
        --no-mlockall --total-num-mbufs=16384)
}

# testpmd_fwd_stats NAME: set tp_rx, tp_rx_dropped, tp_tx, tp_tx_dropped, tp_bye from the
# final forward statistics in testpmd NAME's log (lib/testpmd-stats.py).
tp_rx=0 tp_rx_dropped=0 tp_tx=0 tp_tx_dropped=0 tp_bye=0
testpmd_fwd_stats() {
    local vars
    vars=$(python3 "$TESTPMD_STATS_PY" "$TMP/$1.log" 2>&1) || fail "$1: $vars"
    eval "$vars"
}

# cpu_ticks PID: user+system CPU time of PID in clock ticks (getconf CLK_TCK a second).
cpu_ticks() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    echo $(( ${12} + ${13} ))
}

# ring_stopped_at PORT INDEX: the avail index vdpad answered to the last GET_VRING_BASE for
# ring INDEX of PORT (from its debug log line "port=PORT ... ring INDEX stopped at N"), i.e.
# where the device stopped consuming: every avail entry before it was consumed. Prints
# nothing when the log has no such line (VDPA_LOG_LEVEL above debug).
ring_stopped_at() {
    sed -n "s/.*port=$1 .*\\] ring $2 stopped at \\([0-9][0-9]*\\)\$/\\1/p" "$TMP/vdpad.log" | tail -n 1
}

# traffic_window SECONDS: lets testpmd's traffic run for SECONDS (testpmd must stay up and
# vdpad report no fault), stops testpmd with SIGINT (it must exit 0 after printing its final
# statistics, read into tp_* by testpmd_fwd_stats), waits for port vdpa0 to listen again and
# loads vdpad's stats as "s" (no faults). Sets t0 and t1 around the window.
traffic_window() {
    t0=$(date +%s.%N)
    sleep "$1"
    alive testpmd || fail "testpmd exited during the traffic"
    load_stats vdpa0 mid
    no_faults mid "during traffic"
    stop testpmd INT 20
    local rc=$?
    t1=$(date +%s.%N)
    ((rc == 0)) || fail "testpmd exited with status $rc after SIGINT (expected a clean 0)"
    testpmd_fwd_stats testpmd
    ((tp_bye == 1)) || fail "testpmd did not finish cleanly (no 'Bye...')"
    wait_status 15 --port vdpa0 --connection listening
    alive vdpad || fail "vdpad exited after testpmd stopped"
    load_stats vdpa0 s
    no_faults s
}

# cpu_percent PID SECONDS: prints the share of one core (percent, one decimal) that process
# PID used over the next SECONDS.
cpu_percent() {
    local hz c0 c1 w0 w1
    hz=$(getconf CLK_TCK)
    c0=$(cpu_ticks "$1") && w0=$(date +%s.%N)
    sleep "$2"
    c1=$(cpu_ticks "$1") && w1=$(date +%s.%N)
    awk -v c="$((c1 - c0))" -v hz="$hz" -v a="$w0" -v b="$w1" 'BEGIN { printf "%.1f", 100 * c / hz / (b - a) }'
}

# --- vdpad and guest probes shared by the migration tests ---

say() { echo "    $*"; }   # report lines (stdout, indented: not PASS/FAIL lines)

# vd_json CONTROL COMMAND: vdpactl's JSON reply.
vd_json() { timeout 5 "$VDPACTL" --control "$1" "$2" --json; }

# vd_q CONTROL QUEUE [PORT-ID]: "mode packets relayed pagesMarked switchovers gapMicros faults"
# of a queue of port PORT-ID (default: the daemon's first port).
vd_q() {
    vd_json "$1" stats 2>/dev/null | jq -r --argjson q "$2" --arg p "${3:-}" \
        '[.ports[] | select($p == "" or .id == $p)][0].queues[] | select(.index == $q) |
         "\(.mode) \(.packets) \(.relayed) \(.pagesMarked) \(.switchovers) \(.lastSwitchoverGapMicros) \(.faults)"' 2>/dev/null
}

# info_field TEXT KEY: the value after "KEY:" in QEMU's `info migrate` output (first word).
info_field() { sed -n "s/^$2: *\([^ ]*\).*/\1/p" <<<"$1" | head -n 1; }

# guest_ctr CMD-SOCKET [TIMEOUT]: "rx_packets tx_packets" of the guest's eth0 (no serial-log
# wait: after a migration the destination's console log never says the channel is ready).
guest_ctr() {
    # shellcheck disable=SC2016  # expanded by the guest's shell
    "$GUEST_DIR/guest-exec" --timeout "${2:-15}" "$1" \
        'echo $(cat /sys/class/net/eth0/statistics/rx_packets /sys/class/net/eth0/statistics/tx_packets)' 2>&1 | tail -n 1
}

# The destination's verdict: a migration test collects in DEST_WHY (emptied before each
# destination) what shows that the destination does not work, then dest_judge decides.
DEST_WHY=() DEST_VERDICT='' DEST_JUDGED=0

# dest_guest_check VM G1 G2: the destination guest VM's "rx tx" (guest_ctr), read G1 then G2:
# adds to DEST_WHY each of them that did not grow, and a panic, BUG or Oops on its console.
dest_guest_check() {
    local -a a b
    local panic
    read -r -a a <<<"$2"; read -r -a b <<<"$3"
    [[ ${a[0]:-x} =~ ^[0-9]+$ && ${b[0]:-x} =~ ^[0-9]+$ && ${b[0]} -gt ${a[0]} ]] ||
        DEST_WHY+=("guest rx_packets did not grow ('$2' -> '$3')")
    [[ ${a[1]:-x} =~ ^[0-9]+$ && ${b[1]:-x} =~ ^[0-9]+$ && ${b[1]} -gt ${a[1]} ]] ||
        DEST_WHY+=("guest tx_packets did not grow ('$2' -> '$3')")
    panic=$(grep -a -m 1 -E 'Kernel panic|BUG:|Oops' "$TMP/$1.serial.log" 2>/dev/null) && DEST_WHY+=("guest console: $panic")
}

# dest_judge TAG LOSS CLEAN LOSS-NOTE: sets DEST_VERDICT from DEST_WHY ("destination keeps
# working" or "destination NOT working: REASONS"). LOSS 1 (QEMU lost pages of its own, which
# alone can break the guest): reported only, "TAG: LOSS-NOTE: VERDICT (not judged)". LOSS 0:
# judged (DEST_JUDGED + 1): fails "TAG: clean migration (CLEAN) but the VERDICT" unless
# DEST_WHY is empty, and reports "TAG: CLEAN; VERDICT".
dest_judge() {
    DEST_VERDICT="destination keeps working"
    ((${#DEST_WHY[@]} == 0)) || DEST_VERDICT="destination NOT working: ${DEST_WHY[*]}"
    if (($2)); then
        say "$1: $4: $DEST_VERDICT (not judged)"
    else
        DEST_JUDGED=$((DEST_JUDGED + 1))
        ((${#DEST_WHY[@]} == 0)) || fail "$1: clean migration ($3) but the $DEST_VERDICT"
        say "$1: $3; $DEST_VERDICT"
    fi
}

# free_port: a free TCP port on 127.0.0.1.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- skipping and the vDPA guest ------------------------------------------------------------

# skip REASON: the test cannot run here (a missing peer or guest). With VDPA_REQUIRE_PEERS=1
# (scripts/test, CI) that is a failure; otherwise the test ends as passed, saying so:
# "PASS NAME (skipped: REASON)" (run-all counts PASS lines only).
skip() {
    [[ ${VDPA_REQUIRE_PEERS:-0} == 1 ]] && fail "$* (VDPA_REQUIRE_PEERS=1: a missing peer is a failure)"
    FINISHED=1
    echo "PASS $TEST_NAME (skipped: $*)"
    exit 0
}

# The vDPA guest: Debian's 6.12 kernel with vDPA, VDUSE, vhost-vdpa and virtio-vdpa,
# booted by scripts/guest/run-vdpa-guest (see its header and docs/TESTING.md).
VDPA_GUEST_RUNNER=$GUEST_DIR/run-vdpa-guest

# require_vdpa_guest: its kernel and base initramfs are in the cache and QEMU is installed
# (skip otherwise, see skip).
require_vdpa_guest() {
    local cache=${VDPA_CACHE:-${HOME:-/root}/.cache/swift-vdpa}
    [[ -r $cache/guest-vdpa/vmlinuz && -r $cache/guest-vdpa/initramfs.cpio.gz ]] ||
        skip "no vDPA guest kernel/initramfs in $cache/guest-vdpa: run scripts/install-deps"
    command -v qemu-system-x86_64 >/dev/null || skip "qemu-system-x86_64 missing: run scripts/install-deps"
}

# run_vdpa_guest NAME TIMEOUT SCRIPT [RUNNER-ARGS...] [FILE...]: run SCRIPT in the vDPA
# guest (run-vdpa-guest, in the background so the watchdog can interrupt it) and wait for it.
# Sets GUEST_RC to the runner's status (the script's, or 124 timeout / 125 no status or a
# kernel oops), GUEST_OUT to the script's output file. Logs: $TMP/NAME.output.log (the
# script's stdout+stderr), $TMP/NAME.console.log (kernel and init), $TMP/NAME.qemu.log,
# $TMP/NAME.log (the runner's own messages, with its timing line).
GUEST_RC= GUEST_OUT=
run_vdpa_guest() {
    local name=$1 secs=$2 script=$3
    shift 3
    GUEST_OUT=$TMP/$name.output.log
    spawn "$name" env VDPA_VERBOSE=1 "$VDPA_GUEST_RUNNER" --name "$name" --log-dir "$TMP" --quiet \
        --timeout "$secs" "$script" "$@"
    local pid=${PIDS[$name]}
    while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    GUEST_RC=0
    wait "$pid" || GUEST_RC=$?
    unset "PIDS[$name]"
    log "$name: status $GUEST_RC; $(grep -a '^run-vdpa-guest: overlay' "$TMP/$name.log" || true)"
}
