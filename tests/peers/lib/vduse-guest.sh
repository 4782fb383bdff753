# Sourced by the guest side of the kernel-vDPA peer tests (tests/peers/vduse-*.sh), inside the
# vDPA test guest: the vdpad binary is $VDPAD. Messages: "STEP ..." lines are progress, a
# "FAIL-REASON: ..." line is what the host side reports, then the logs follow.

fail() { echo "FAIL-REASON: $*"; for f in /tmp/*.log; do echo "----- $f -----"; tail -n 40 "$f"; done; exit 1; }
step() { echo "STEP $*"; }
[[ -c /dev/vduse/control ]] || fail "no /dev/vduse/control in the guest"

# vduse NAME LINK [LEVEL]: a VDUSE SoftNIC bound to vhost_vdpa; sets DEV to its
# /dev/vhost-vdpa-N. Not to be called in a subshell: the daemon must stay this shell's child,
# for `wait` in stop_vduse.
vduse() {
    "$VDPAD" --vduse "name=$1,bind=vhost-vdpa,mac=52:54:00:aa:bb:01,link=$2" --control "/tmp/$1.sock" \
        --log-level "${3:-debug}" > "/tmp/$1.log" 2>&1 &
    echo $! > "/tmp/$1.pid"
    for _ in $(seq 1 300); do
        grep -q "on the vDPA bus" "/tmp/$1.log" && break
        kill -0 "$(cat "/tmp/$1.pid")" 2>/dev/null || fail "vdpad --vduse $1 exited: $(tail -n 5 "/tmp/$1.log")"
        sleep 0.1
    done
    grep -q "on the vDPA bus, driver vhost_vdpa" "/tmp/$1.log" || fail "$1 not on the vDPA bus with vhost_vdpa within 30 s"
    local d
    d=$(ls -d /sys/bus/vdpa/devices/"$1"/vhost-vdpa-* 2>/dev/null | head -n 1)
    [[ -n $d && -c /dev/$(basename "$d") ]] || fail "$1 has no vhost-vdpa character device"
    DEV=/dev/$(basename "$d")
}

# stop_vduse NAME: SIGTERM, and it must exit 0 within 10 s.
stop_vduse() {
    local pid; pid=$(cat "/tmp/$1.pid")
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && fail "vdpad --vduse $1 did not exit within 10 s of SIGTERM"
    wait "$pid" || fail "vdpad --vduse $1 exited with status $?"
}

# start_port SOCKET DEV: the vdpad binary with one port on kernel device DEV (control socket
# /tmp/k-control.sock, log /tmp/port.log); sets PORT_PID.
start_port() {
    rm -f "$1" /tmp/k-control.sock
    "$VDPAD" --port "socket=$1,id=k,device=vhost-vdpa:$2" --control /tmp/k-control.sock \
        --relay-loop hybrid --log-level info > /tmp/port.log 2>&1 &
    PORT_PID=$!
    for _ in $(seq 1 200); do [[ -S /tmp/k-control.sock ]] && break; sleep 0.1; done
    [[ -S /tmp/k-control.sock ]] || fail "vdpad with the vhost-vdpa port did not start: $(tail -n 5 /tmp/port.log)"
}

# q NAME INDEX: the counters vdpad logged for queue INDEX of VDUSE device NAME at exit.
q() { sed -n "s/.*VDUSE $1: queue $2 ([rt]x): \(.*\)/\1/p" "/tmp/$1.log" | tail -n 1; }
field() { echo "$1" | sed -n "s/.*$2 \([^ ,]*\).*/\1/p"; }
