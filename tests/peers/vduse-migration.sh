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
# shellcheck source=lib/vduse-host.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/vduse-host.sh"

cat > "$TMP/guest.sh" <<'GUEST'
#!/bin/bash
set -u
# shellcheck source=lib/vduse-guest.sh
source "$GUEST_LIB"

vduse vm0 source:size=128 info
dev=$DEV
step "vm0 at $dev"

t0=$SECONDS
VDPA_TEST_VHOST_VDPA_SOURCE=$dev "$XCTEST" SoftNICTests.VhostVDPAKernelDeviceMigrationTests > /tmp/xctest.log 2>&1
rc=$?
summary=$(grep -E "Executed [0-9]+ tests?, with" /tmp/xctest.log | tail -n 1)
[[ $rc == 0 ]] || fail "migration tests on $dev failed: $(grep -E 'error:' /tmp/xctest.log | head -n 6 | tr '\n' ' ')"
echo "$summary" | grep -q "Executed 9 tests, with 0 failures" || fail "expected 9 migration tests (MigrationTests on the kernel device) to run and pass: $summary"
echo "$summary" | grep -q "skipped" && fail "migration tests were skipped: $summary"
step "migration tests: $summary ($((SECONDS - t0)) s)"

start_port /tmp/k.sock "$dev"
"$BENCH" --socket /tmp/k.sock --control /tmp/k-control.sock --mode switch --seconds 2 --ring-size 256 > /tmp/bench.log 2>&1 ||
    fail "vdpa-bench --mode switch failed: $(tail -n 5 /tmp/bench.log)"
step "bench: $(tail -n 1 /tmp/bench.log)"
grep -o "switched to the relay[^\"]*\|back on the direct path[^\"]*" /tmp/port.log | sed 's/^/STEP port: /'
kill -TERM "$PORT_PID"; wait "$PORT_PID" || fail "vdpad (port) exited with status $?"
stop_vduse vm0
exit 0
GUEST

run_vduse_guest 160 'migration tests.*\|bench.*\|port.*'
