#!/usr/bin/env bash
# The vDPA test guest works: scripts/guest/run-vdpa-guest boots Debian's 6.12 kernel under
# TCG with vdpad and vdpactl (the normal debug build, with their libraries, in the overlay)
# and a script that checks, inside the guest:
#   - every module of the base initramfs is loaded (irqbypass, vhost_iotlb, vhost, vdpa,
#     vduse, vhost_vdpa, virtio_vdpa, failover, net_failover, virtio_net, veth, tun);
#   - /dev/vduse/control is a character device, and the vdpa bus has the vhost_vdpa and
#     virtio_vdpa drivers;
#   - `vdpa mgmtdev show` (iproute2) lists the vduse management device with class net;
#   - `vdpad --help` and `vdpactl --help` run (the Swift runtime and Foundation resolve);
#   - iproute2's ip makes a network namespace and a veth pair into it.
# The script's exit status must come back through the runner (0 here); the kernel must
# print no oops/BUG/WARNING (the runner checks). Creating a VDUSE device needs a userspace
# VDUSE program (the daemon's, issue 9): the tests that have it build on this one.
# Prints the boot time to the script and the whole run's time.
#
# Skipped (a failure with VDPA_REQUIRE_PEERS=1) when the vDPA guest files or QEMU are missing.
# Environment: VDUSE_SMOKE_EXIT=N: the guest script ends with `exit N` after its checks,
# and the test passes only if the runner returns N (to see the status come through, by
# hand: VDUSE_SMOKE_EXIT=3 tests/peers/vduse-smoke.sh). VDUSE_SMOKE_TIMEOUT: the runner's
# limit in seconds (default 120).
set -uo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
peer_init vduse-smoke 170
require_vdpa_guest
resolve_bins

want_exit=${VDUSE_SMOKE_EXIT:-0}
if ! [[ $want_exit =~ ^[0-9]+$ ]] || ((want_exit > 255)); then fail "bad VDUSE_SMOKE_EXIT=$want_exit (0-255)"; fi

cat > "$TMP/guest.sh" <<'EOF'
#!/bin/sh
# vduse-smoke's checks, inside the vDPA guest. One line per check: "ok ..." or "FAILED ...".
failed=0
ok() { echo "ok $*"; }
bad() { echo "FAILED $*"; failed=$((failed + 1)); }

for m in $(cat /lib/modules/order); do
    if grep -q "^$m " /proc/modules; then ok "module $m"; else bad "module $m not loaded"; fi
done
if [ -c /dev/vduse/control ]; then ok "/dev/vduse/control"; else bad "no character device /dev/vduse/control"; fi
for d in vhost_vdpa virtio_vdpa; do
    if [ -d /sys/bus/vdpa/drivers/$d ]; then ok "vdpa bus driver $d"; else bad "no vdpa bus driver $d"; fi
done

mg=$(vdpa -j mgmtdev show 2>&1)
echo "vdpa -j mgmtdev show: $mg"
case $mg in
    *'"vduse":{"supported_classes":['*'"net"'*) ok "vdpa mgmtdev vduse class net" ;;
    *) bad "vdpa mgmtdev show lists no vduse management device with class net" ;;
esac

if "$VDPAD" --help > /tmp/vdpad-help 2>&1 && grep -q 'vhost-user' /tmp/vdpad-help; then
    ok "vdpad --help"
else
    bad "vdpad --help failed:"; head -n 20 /tmp/vdpad-help
fi
if "$VDPACTL" --help > /tmp/vdpactl-help 2>&1; then
    ok "vdpactl --help"
else
    bad "vdpactl --help failed:"; head -n 20 /tmp/vdpactl-help
fi

if ip netns add smoke && ip link add smoke0 type veth peer name smoke1 netns smoke &&
        ip -n smoke link show smoke1 >/dev/null; then
    ok "netns and veth"
else
    bad "ip netns add / veth into it failed"
fi

echo "checks done, $failed failed"
[ "$failed" = 0 ] || exit 1
exit "${VDUSE_SMOKE_EXIT:-0}"
EOF

start=$SECONDS
run_vdpa_guest guest "${VDUSE_SMOKE_TIMEOUT:-120}" "$TMP/guest.sh" \
    --env "VDPAD=$VDPAD" --env "VDPACTL=$VDPACTL" --env "VDUSE_SMOKE_EXIT=$want_exit" \
    "$VDPAD" "$VDPACTL"
total=$((SECONDS - start))

grep -a '^FAILED ' "$GUEST_OUT" >&2
boot=$(tr -d '\r' < "$TMP/guest.console.log" 2>/dev/null | sed -n 's/^VDPA-GUEST: run start uptime=\([0-9.]*\).*/\1/p' | head -n 1)
case $GUEST_RC in
    124) fail "the guest did not finish within ${VDUSE_SMOKE_TIMEOUT:-120}s" ;;
    125) fail "the guest ended without the script's status, or its kernel complained (guest.log)" ;;
esac
checks=$(grep -ac '^ok ' "$GUEST_OUT")
grep -aq '^checks done, 0 failed' "$GUEST_OUT" || fail "checks in the guest failed (status $GUEST_RC): $(grep -a '^FAILED ' "$GUEST_OUT" | head -n 3 | tr '\n' ';')"
((GUEST_RC == want_exit)) || fail "the runner returned $GUEST_RC, the guest script exited $want_exit"
for line in "ok module vduse" "ok module vhost_vdpa" "ok module virtio_vdpa" "ok /dev/vduse/control" \
            "ok vdpa mgmtdev vduse class net" "ok vdpad --help" "ok netns and veth"; do
    grep -aqx "$line" "$GUEST_OUT" || fail "the guest did not report '$line'"
done
pass "$checks checks in the guest, script status $GUEST_RC came back; boot to script ${boot:-?}s, whole run ${total}s"
