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
# shellcheck source=lib/vduse-host.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/vduse-host.sh"

cat > "$TMP/guest.sh" <<'GUEST'
#!/bin/bash
set -u
# shellcheck source=lib/vduse-guest.sh
source "$GUEST_LIB"

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

run_vduse_guest 160 'VANISHED.*'
