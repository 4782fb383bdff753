#!/usr/bin/env bash
# vdpad drives a kernel vDPA device through /dev/vhost-vdpa-N behind a vhost-user socket,
# inside the vDPA test guest (Debian's 6.12 kernel under TCG, scripts/guest/run-vdpa-guest).
# The device is the SoftNIC exported through VDUSE by a second vdpad (`vdpad --vduse ...,
# bind=vhost-vdpa`): the kernel's vhost_vdpa driver sits between the two processes, so every
# ring address, IOTLB entry, kick and interrupt goes through the real kernel paths.
#
# In the guest:
#   1. VDUSE device vd0 (link=loopback) bound to vhost_vdpa. The project's test bundle runs
#      VhostVDPAKernelDeviceTests on its /dev/vhost-vdpa-N (a port of the vdpad library with
#      device=vhost-vdpa, the project's frontend library as the guest): 320 frames of 60-1453
#      bytes go out on TX and come back on RX byte for byte; the status shows the device at
#      DRIVER_OK. Then vd0's daemon is stopped and the counters it logs for the device's
#      queues must equal the frontend's: TX packets and bytes, RX packets and bytes.
#   2. VDUSE device vd1 (link=source:size=128) bound to vhost_vdpa, and the vdpad binary with
#      --port socket=...,device=vhost-vdpa:/dev/vhost-vdpa-M; vdpa-bench (the frontend library
#      as a fast RX guest) receives for 2 s: completions > 0; `vdpactl status --json` shows the
#      vhost-vdpa details (DRIVER_OK, both rings); the port's stats say the device reports no
#      counters (deviceCounters false) rather than zeros; vdpad exits 0 on SIGTERM.
#
# Environment: VDPA_GUEST_RUNNER (default scripts/guest/run-vdpa-guest), XCTEST (default the
# debug build's swift-vdpaPackageTests.xctest).
set -uo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
peer_init vduse-vhost-vdpa 170
# shellcheck source=lib/vduse-host.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/vduse-host.sh"

cat > "$TMP/guest.sh" <<'GUEST'
#!/bin/bash
set -u
# shellcheck source=lib/vduse-guest.sh
source "$GUEST_LIB"

# --- 1: the test bundle's kernel-device tests on vd0 ------------------------------------------
vduse vd0 loopback
dev0=$DEV
step "vd0 at $dev0"
VDPA_TEST_VHOST_VDPA_LOOPBACK=$dev0 "$XCTEST" SoftNICTests.VhostVDPAKernelDeviceTests > /tmp/xctest.log 2>&1 ||
    fail "VhostVDPAKernelDeviceTests failed: $(grep -E 'error|failed' /tmp/xctest.log | head -n 5)"
grep -q "Executed 1 test, with 0 failures" /tmp/xctest.log || fail "the kernel-device test did not run: $(tail -n 3 /tmp/xctest.log)"
counts=$(sed -n 's/.*VDUSE-FRONTEND-COUNTS //p' /tmp/xctest.log | tail -n 1)
[[ -n $counts ]] || fail "the test printed no counts"
step "frontend: $counts"
stop_vduse vd0
rxq=$(q vd0 0) txq=$(q vd0 1)
[[ -n $rxq && -n $txq ]] || fail "vd0's daemon logged no queue counters at exit"
step "device rx: $rxq"
step "device tx: $txq"
fv() { echo "$counts" | sed -n "s/.*$1=\([0-9]*\).*/\1/p"; }
[[ $(field "$txq" packets) == "$(fv tx_frames)" ]] || fail "device TX packets $(field "$txq" packets) != frontend's $(fv tx_frames)"
[[ $(field "$rxq" packets) == "$(fv rx_frames)" ]] || fail "device RX packets $(field "$rxq" packets) != frontend's $(fv rx_frames)"
[[ $(field "$txq" bytes) == "$(fv tx_bytes)" ]] || fail "device TX bytes $(field "$txq" bytes) != frontend's $(fv tx_bytes)"
[[ $(field "$rxq" bytes) == "$(fv rx_bytes)" ]] || fail "device RX bytes $(field "$rxq" bytes) != frontend's $(fv rx_bytes)"
[[ $(field "$rxq" faults) == 0 && $(field "$txq" faults) == 0 ]] || fail "device faults: rx [$rxq] tx [$txq]"
step "counters agree on both sides"

# --- 2: the vdpad binary with device=vhost-vdpa, vdpa-bench as the guest ----------------------
vduse vd1 source:size=128
dev1=$DEV
start_port /tmp/k.sock "$dev1"
"$BENCH" --socket /tmp/k.sock --control /tmp/k-control.sock --mode direct --seconds 2 --ring-size 256 > /tmp/bench.log 2>&1 &
bpid=$!
sleep 1.5
"$VDPACTL" status --control /tmp/k-control.sock --json > /tmp/status.json 2>&1 || fail "vdpactl status: $(cat /tmp/status.json)"
"$VDPACTL" stats --control /tmp/k-control.sock --json > /tmp/stats.json 2>&1 || fail "vdpactl stats: $(cat /tmp/stats.json)"
wait "$bpid" || fail "vdpa-bench failed: $(tail -n 5 /tmp/bench.log)"
grep -q '"driver":"vhost-vdpa"' /tmp/status.json || fail "status has no vhost-vdpa details: $(head -c 400 /tmp/status.json)"
grep -q '"switchover":"reset"' /tmp/status.json || fail "status does not say the switchover is reset-based (VDUSE has no SUSPEND)"
grep -q '"deviceCounters":false' /tmp/stats.json || fail "stats do not say the device reports no counters"
mpps=$(sed -n 's/.*"phase0_direct_mpps":\([0-9.e-]*\).*/\1/p' /tmp/bench.log | tail -n 1)
step "bench: direct through vhost-vdpa ${mpps:-?} Mpps (TCG)"
awk -v x="${mpps:-0}" 'BEGIN { exit !(x > 0) }' || fail "vdpa-bench saw no completions: $(tail -n 5 /tmp/bench.log)"
kill -TERM "$PORT_PID"; wait "$PORT_PID" || fail "vdpad (port) exited with status $?"
stop_vduse vd1
exit 0
GUEST

run_vduse_guest 160 'frontend.*\|counters.*\|bench.*'
