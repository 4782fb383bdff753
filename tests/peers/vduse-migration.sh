#!/usr/bin/env bash
# Software-assisted live migration on a kernel vDPA device, inside the vDPA test guest: the
# SoftNIC exported through VDUSE (link source:size=128, bound to vhost_vdpa) is driven by the
# vdpad library through /dev/vhost-vdpa-N, and dirty logging goes on and off as QEMU does it.
# VDUSE in Linux 6.12 has no SUSPEND, so every switchover here is the reset-based one (the
# suspend-based one runs on the host against the kernel model: VhostVDPASuspendMigrationTests).
#
# In the guest, the project's test bundle runs VhostVDPAKernelDeviceMigrationTests: every
# migration test of the software NIC, on the real device:
#   - every page the device wrote while logging was on is marked, and nothing else but the
#     used ring (RAM compared before and after, page by page);
#   - the negative run: with the relay's buffer marking skipped (test switch) the same check
#     finds the device's pages unmarked;
#   - the source's sequence numbers stay continuous across direct → relay → direct, three
#     times, in each relay loop (nothing lost or repeated by a reset-based switch);
#   - GET_VRING_BASE while relayed relays the rest and marks the used ring; a TX ring kept
#     direct has its used ring marked at stop; a new log base takes over; a ring started
#     during logging starts in the relay.
# Then the vdpad binary on the same device and vdpa-bench --mode switch (direct, logging on,
# logging off, 2 s each) report completions per phase and the switchover gaps (TCG figures).
#
# Environment: VDPA_GUEST_RUNNER, XCTEST (as in vduse-vhost-vdpa.sh).
set -uo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
peer_init vduse-migration 170
resolve_bins
RUNNER=${VDPA_GUEST_RUNNER:-$GUEST_DIR/run-vdpa-guest}
BIN=$(dirname "$VDPAD")
XCTEST=${XCTEST:-$BIN/swift-vdpaPackageTests.xctest}
BENCH=$BIN/vdpa-bench
[[ -x $RUNNER ]] || fail "no guest runner $RUNNER (scripts/guest/run-vdpa-guest; run scripts/install-deps)"
for f in "$VDPAD" "$VDPACTL" "$XCTEST" "$BENCH"; do [[ -x $f ]] || fail "not built: $f (swift build --build-tests)"; done

cat > "$TMP/guest.sh" <<'GUEST'
#!/bin/bash
set -u
fail() { echo "FAIL-REASON: $*"; for f in /tmp/*.log; do echo "----- $f -----"; tail -n 60 "$f"; done; exit 1; }
step() { echo "STEP $*"; }
[[ -c /dev/vduse/control ]] || fail "no /dev/vduse/control in the guest"
"$VDPAD" --vduse "name=vm0,bind=vhost-vdpa,mac=52:54:00:aa:bb:01,link=source:size=128" --control /tmp/vm0.sock \
    --log-level info > /tmp/vm0.log 2>&1 &
vpid=$!
for _ in $(seq 1 300); do
    grep -q "on the vDPA bus" /tmp/vm0.log && break
    kill -0 "$vpid" 2>/dev/null || fail "vdpad --vduse exited: $(tail -n 5 /tmp/vm0.log)"
    sleep 0.1
done
grep -q "on the vDPA bus, driver vhost_vdpa" /tmp/vm0.log || fail "vm0 not on the vDPA bus with vhost_vdpa within 30 s"
d=$(ls -d /sys/bus/vdpa/devices/vm0/vhost-vdpa-* 2>/dev/null | head -n 1)
[[ -n $d && -c /dev/$(basename "$d") ]] || fail "vm0 has no vhost-vdpa character device"
dev=/dev/$(basename "$d")
step "vm0 at $dev"

t0=$SECONDS
VDPA_TEST_VHOST_VDPA_SOURCE=$dev "$XCTEST" SoftNICTests.VhostVDPAKernelDeviceMigrationTests > /tmp/xctest.log 2>&1
rc=$?
summary=$(grep -E "Executed [0-9]+ tests?, with" /tmp/xctest.log | tail -n 1)
[[ $rc == 0 ]] || fail "migration tests on $dev failed: $(grep -E 'error:' /tmp/xctest.log | head -n 6 | tr '\n' ' ')"
echo "$summary" | grep -q "Executed 8 tests, with 0 failures" || fail "expected 8 migration tests to run and pass: $summary"
echo "$summary" | grep -q "skipped" && fail "migration tests were skipped: $summary"
step "migration tests: $summary ($((SECONDS - t0)) s)"

"$VDPAD" --port "socket=/tmp/k.sock,id=k,device=vhost-vdpa:$dev" --control /tmp/k-control.sock \
    --relay-loop hybrid --log-level info > /tmp/port.log 2>&1 &
ppid=$!
for _ in $(seq 1 200); do [[ -S /tmp/k-control.sock ]] && break; sleep 0.1; done
[[ -S /tmp/k-control.sock ]] || fail "vdpad with the vhost-vdpa port did not start: $(tail -n 5 /tmp/port.log)"
"$BENCH" --socket /tmp/k.sock --control /tmp/k-control.sock --mode switch --seconds 2 --ring-size 256 > /tmp/bench.log 2>&1 ||
    fail "vdpa-bench --mode switch failed: $(tail -n 5 /tmp/bench.log)"
step "bench: $(tail -n 1 /tmp/bench.log)"
grep -o "switched to the relay[^\"]*\|back on the direct path[^\"]*" /tmp/port.log | sed 's/^/STEP port: /'
kill -TERM "$ppid"; wait "$ppid" || fail "vdpad (port) exited with status $?"
kill -TERM "$vpid"; wait "$vpid" || fail "vdpad --vduse exited with status $?"
exit 0
GUEST

log "booting the vDPA guest"
"$RUNNER" --name vduse-migration --log-dir "$TMP" --quiet --timeout 160 --mem 1024 \
    --env "VDPAD=$VDPAD" --env "VDPACTL=$VDPACTL" --env "XCTEST=$XCTEST" --env "BENCH=$BENCH" \
    "$TMP/guest.sh" "$VDPAD" "$VDPACTL" "$XCTEST" "$BENCH" > "$TMP/runner.log" 2>&1
rc=$?
out=$TMP/vduse-migration.output.log
[[ ${VDPA_VERBOSE:-0} == 1 && -r $out ]] && sed -n 's/^STEP /... vduse-migration: /p' "$out" | tr -d '\r' >&2
if [[ $rc != 0 ]]; then
    reason=$(tr -d '\r' < "$out" 2>/dev/null | sed -n 's/^FAIL-REASON: //p' | head -n 1)
    [[ -n $reason ]] || reason="the guest run ended with status $rc: $(tail -n 5 "$TMP/runner.log" | tr '\n' ' ')"
    tail -n 80 "$out" >&2 2>/dev/null
    fail "$reason"
fi
tr -d '\r' < "$out" | sed -n 's/^STEP \(migration tests.*\|bench.*\|port.*\)/  \1/p'
pass
