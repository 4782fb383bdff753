#!/usr/bin/env bash
# A kernel vDPA device that vanishes under a port, inside the vDPA test guest: two VDUSE
# SoftNICs (loopback) bound to vhost_vdpa, one port of the vdpad library on each (the test
# bundle's VhostVDPAKernelDeviceFaultTests, the frontend library as both guests). Traffic flows
# on both; then the VDUSE daemon behind the first is killed (SIGKILL: the device stops answering
# the kernel, as a NIC that died or a driver that hung). VDUSE's message timeout is set to 2 s
# here (sysfs msg_timeout; 30 s by default): the kernel then gives the port EIO. Checked: the
# frontend's next control message on that port fails (no hang) with an error naming the device,
# the port's status says so, a new connection on it fails (at connecting or at its first ring)
# within seconds instead of hanging, and the other port's traffic carries on byte for byte
# throughout. A failing ioctl, a failed IOTLB batch and a device that does not take DRIVER_OK
# run on the host against the kernel model (VhostVDPADriverTests).
#
# Environment: VDPA_GUEST_RUNNER, XCTEST (as in vduse-vhost-vdpa.sh).
set -uo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
peer_init vduse-faults 170
resolve_bins
RUNNER=${VDPA_GUEST_RUNNER:-$GUEST_DIR/run-vdpa-guest}
BIN=$(dirname "$VDPAD")
XCTEST=${XCTEST:-$BIN/swift-vdpaPackageTests.xctest}
[[ -x $RUNNER ]] || fail "no guest runner $RUNNER (scripts/guest/run-vdpa-guest; run scripts/install-deps)"
for f in "$VDPAD" "$XCTEST"; do [[ -x $f ]] || fail "not built: $f (swift build --build-tests)"; done

cat > "$TMP/guest.sh" <<'GUEST'
#!/bin/bash
set -u
fail() { echo "FAIL-REASON: $*"; for f in /tmp/*.log; do echo "----- $f -----"; tail -n 40 "$f"; done; exit 1; }
step() { echo "STEP $*"; }
[[ -c /dev/vduse/control ]] || fail "no /dev/vduse/control in the guest"

# vduse NAME LINK: a VDUSE SoftNIC bound to vhost_vdpa; sets DEV to its /dev/vhost-vdpa-N.
# (Not in a subshell: the daemon must stay this shell's child, for `wait`.)
vduse() {
    "$VDPAD" --vduse "name=$1,bind=vhost-vdpa,mac=52:54:00:aa:bb:01,link=$2" --control "/tmp/$1.sock" \
        --log-level debug > "/tmp/$1.log" 2>&1 &
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
stop_vduse() {
    local pid; pid=$(cat "/tmp/$1.pid")
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && fail "vdpad --vduse $1 did not exit within 10 s of SIGTERM"
    wait "$pid" || fail "vdpad --vduse $1 exited with status $?"
}
vduse vd0 loopback
dev0=$DEV
vduse vd1 loopback
dev1=$DEV
[[ -w /sys/class/vduse/vd0/msg_timeout ]] || fail "no /sys/class/vduse/vd0/msg_timeout"
echo 2 > /sys/class/vduse/vd0/msg_timeout
step "vd0 at $dev0 (its daemon will be killed), vd1 at $dev1"
VDPA_TEST_VHOST_VDPA_DOOMED=$dev0 VDPA_TEST_VHOST_VDPA_OTHER=$dev1 VDPA_TEST_VDUSE_DOOMED_PID=$(cat /tmp/vd0.pid) \
    "$XCTEST" SoftNICTests.VhostVDPAKernelDeviceFaultTests > /tmp/xctest.log 2>&1 ||
    fail "VhostVDPAKernelDeviceFaultTests failed: $(grep -E 'error' /tmp/xctest.log | head -n 5 | tr '\n' ' ')"
grep -q "Executed 1 test, with 0 failures" /tmp/xctest.log || fail "the fault test did not run: $(tail -n 3 /tmp/xctest.log)"
step "$(grep -o 'VANISHED-DEVICE-ERROR.*' /tmp/xctest.log)"
step "$(grep -o 'VANISHED-DEVICE-STATUS.*' /tmp/xctest.log | cut -c1-300)"
wait "$(cat /tmp/vd0.pid)" 2>/dev/null
stop_vduse vd1
exit 0
GUEST

log "booting the vDPA guest"
"$RUNNER" --name vduse-faults --log-dir "$TMP" --quiet --timeout 160 --mem 1024 \
    --env "VDPAD=$VDPAD" --env "XCTEST=$XCTEST" \
    "$TMP/guest.sh" "$VDPAD" "$XCTEST" > "$TMP/runner.log" 2>&1
rc=$?
out=$TMP/vduse-faults.output.log
[[ ${VDPA_VERBOSE:-0} == 1 && -r $out ]] && sed -n 's/^STEP /... vduse-faults: /p' "$out" | tr -d '\r' >&2
if [[ $rc != 0 ]]; then
    reason=$(tr -d '\r' < "$out" 2>/dev/null | sed -n 's/^FAIL-REASON: //p' | head -n 1)
    [[ -n $reason ]] || reason="the guest run ended with status $rc: $(tail -n 5 "$TMP/runner.log" | tr '\n' ' ')"
    tail -n 80 "$out" >&2 2>/dev/null
    fail "$reason"
fi
tr -d '\r' < "$out" | sed -n 's/^STEP \(VANISHED.*\)/  \1/p'
pass
