#!/usr/bin/env bash
# The SoftNIC as a VDUSE device bound to virtio_vdpa, inside the vDPA test guest (Debian's 6.12
# kernel under TCG, scripts/guest/run-vdpa-guest): the guest kernel's own virtio_net drives it.
#
# In the guest, vdpad --vduse name=vduse0,bind=virtio-vdpa,link=tap:ifname=vtap0 creates the
# device, adds it to the vDPA bus (netlink, as `vdpa dev add`), and binds virtio_vdpa; the
# netdev that appears (its MAC the one given with mac=) gets 10.81.0.2/24 in the guest's root
# namespace, the TAP (the SoftNIC's host link) is moved into a namespace of its own with
# 10.81.0.1/24. Then:
#   - `vdpa dev show` lists vduse0 on management device vduse, bound to virtio_vdpa;
#   - ping both ways;
#   - 2 MiB of known bytes over TCP each way (bash's /dev/tcp to busybox nc -l), checked by
#     length and md5;
#   - vdpad's CPU while the link is idle (the DMA engine and the request loop sleep);
#   - with the netdev down (nothing moves), every frame is accounted for: the device's TX
#     packets = the netdev's TX packets = the TAP's RX packets (+ the device's TX drops), and
#     the device's RX packets = the netdev's RX packets = the TAP's TX packets (- RX drops);
#     no faults;
#   - on SIGTERM vdpad takes the device off the bus and destroys it: /dev/vduse/vduse0 and
#     /sys/bus/vdpa/devices/vduse0 are gone, and vdpad exits 0.
#
# Environment: VDUSE_IDLE_CPU_MAX (default 20): vdpad's maximum CPU % while idle;
# VDPA_GUEST_RUNNER: the guest runner (default scripts/guest/run-vdpa-guest);
# VDUSE_BYTES (default 2097152, at most 16 MiB): bytes sent each way.
set -uo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
peer_init vduse-virtio-vdpa 170
resolve_bins
RUNNER=${VDPA_GUEST_RUNNER:-$GUEST_DIR/run-vdpa-guest}
[[ -x $RUNNER ]] || fail "no guest runner $RUNNER (scripts/guest/run-vdpa-guest; run scripts/install-deps)"
[[ -x $VDPAD ]] || fail "no vdpad at $VDPAD (swift build)"

cat > "$TMP/guest.sh" <<'GUEST'
#!/bin/bash
# Runs in the vDPA guest. Prints "STEP ..." progress and "FAIL-REASON: ..." before exiting 1.
set -u
bytes=${VDUSE_BYTES:-2097152}
mac=52:54:00:81:00:02
ns=peer
fail() { echo "FAIL-REASON: $*"; echo "----- vdpad log -----"; cat /tmp/vdpad.log; exit 1; }
step() { echo "STEP $*"; }
nsx() { ip netns exec "$ns" "$@"; }
counter() { cat "/sys/class/net/$1/statistics/$2"; }
nscounter() { nsx cat "/sys/class/net/$1/statistics/$2"; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

[[ -c /dev/vduse/control ]] || fail "no /dev/vduse/control in the guest (vduse module not loaded)"
"$VDPAD" --vduse "name=vduse0,bind=virtio-vdpa,mac=$mac,link=tap:ifname=vtap0" --control /tmp/vdpad.sock \
    --log-level "${VDPA_LOG_LEVEL:-debug}" > /tmp/vdpad.log 2>&1 &
pid=$!
for _ in $(seq 1 300); do
    grep -q "on the vDPA bus" /tmp/vdpad.log && break
    kill -0 "$pid" 2>/dev/null || fail "vdpad exited while creating the device"
    sleep 0.1
done
grep -q "on the vDPA bus, driver virtio_vdpa" /tmp/vdpad.log || fail "vdpad did not report vduse0 on the bus with virtio_vdpa within 30 s"
step "device up after ${SECONDS}s"
vdpa dev show vduse0 | grep -q "mgmtdev vduse" || fail "vdpa dev show does not list vduse0 on mgmtdev vduse: $(vdpa dev show 2>&1)"
[[ $(basename "$(readlink /sys/bus/vdpa/devices/vduse0/driver)") == virtio_vdpa ]] || fail "vduse0 is not bound to virtio_vdpa"
dev=$(ls /sys/bus/vdpa/devices/vduse0/virtio*/net/ 2>/dev/null | head -n 1)
[[ -n $dev ]] || fail "virtio_vdpa gave no netdev for vduse0"
[[ $(cat "/sys/class/net/$dev/address") == "$mac" ]] || fail "$dev has MAC $(cat "/sys/class/net/$dev/address"), not the config space's $mac"
step "netdev $dev"

# The TAP in a namespace of its own; no IPv6 anywhere (router solicitations would be noise).
ip netns add "$ns" || fail "ip netns add"
ip link set vtap0 netns "$ns" || fail "cannot move vtap0 into $ns"
nsx ip link set lo up
nsx sysctl -qw net.ipv6.conf.all.disable_ipv6=1
sysctl -qw net.ipv6.conf.all.disable_ipv6=1
sysctl -qw "net.ipv6.conf.$dev.disable_ipv6=1"
nsx ip addr add 10.81.0.1/24 dev vtap0
nsx ip link set vtap0 up
ip addr add 10.81.0.2/24 dev "$dev"
ip link set "$dev" up

ping -c 3 -W 5 10.81.0.1 > /tmp/ping1 2>&1 || fail "the guest cannot ping the namespace: $(cat /tmp/ping1)"
nsx ping -c 3 -W 5 10.81.0.2 > /tmp/ping2 2>&1 || fail "the namespace cannot ping the guest: $(cat /tmp/ping2)"
step "ping both ways"

# Known bytes, different each way.
seq 1 4000000 | head -c "$bytes" > /tmp/to-ns.bin
seq 4000001 8000000 | head -c "$bytes" > /tmp/to-guest.bin
[[ $(stat -c %s /tmp/to-ns.bin) == "$bytes" && $(stat -c %s /tmp/to-guest.bin) == "$bytes" ]] || fail "payload generation"
t0=$(date +%s)
nsx nc -l -p 5001 > /tmp/got-ns.bin &
lpid=$!
sleep 0.5
# The sender is bash's /dev/tcp: busybox nc exits at the end of its input without sending all of it.
timeout 120 bash -c 'cat /tmp/to-ns.bin > /dev/tcp/10.81.0.1/5001' || fail "sending to the namespace failed"
for _ in $(seq 1 200); do kill -0 "$lpid" 2>/dev/null || break; sleep 0.1; done
kill "$lpid" 2>/dev/null
t1=$(date +%s)
[[ $(stat -c %s /tmp/got-ns.bin) == "$bytes" ]] || fail "guest -> namespace: $(stat -c %s /tmp/got-ns.bin) bytes arrived of $bytes"
[[ $(md5sum < /tmp/got-ns.bin) == "$(md5sum < /tmp/to-ns.bin)" ]] || fail "guest -> namespace: the bytes differ (md5)"
nc -l -p 5002 > /tmp/got-guest.bin &
lpid=$!
sleep 0.5
nsx timeout 120 bash -c 'cat /tmp/to-guest.bin > /dev/tcp/10.81.0.2/5002' || fail "sending from the namespace failed"
for _ in $(seq 1 200); do kill -0 "$lpid" 2>/dev/null || break; sleep 0.1; done
kill "$lpid" 2>/dev/null
t2=$(date +%s)
[[ $(stat -c %s /tmp/got-guest.bin) == "$bytes" ]] || fail "namespace -> guest: $(stat -c %s /tmp/got-guest.bin) bytes arrived of $bytes"
[[ $(md5sum < /tmp/got-guest.bin) == "$(md5sum < /tmp/to-guest.bin)" ]] || fail "namespace -> guest: the bytes differ (md5)"
awk -v a="$t0" -v b="$t1" -v c="$t2" -v n="$bytes" \
    'BEGIN { printf "STEP TCP %d bytes each way, md5 checked: guest->ns %d s, ns->guest %d s (with 0.5 s of listener start each)\n", n, b - a, c - b }'

# Idle: nothing is sent; the engine sleeps on its kick eventfds, the loop on the device's fd.
sleep 1
c0=$(cpu_ticks "$pid")
sleep 3
c1=$(cpu_ticks "$pid")
hz=$(getconf CLK_TCK 2>/dev/null || echo 100)
idle=$(awk -v a="$c0" -v b="$c1" -v hz="$hz" 'BEGIN { printf "%.1f", (b - a) * 100 / hz / 3 }')
step "vdpad idle CPU ${idle}%"
awk -v x="$idle" -v m="${VDUSE_IDLE_CPU_MAX:-20}" 'BEGIN { exit !(x <= m) }' ||
    fail "vdpad used ${idle}% of a core over 3 s while the link was idle (limit ${VDUSE_IDLE_CPU_MAX:-20}%)"

# Accounting, with nothing moving: the netdev down, then the counters of all three.
ip link set "$dev" down
sleep 0.5
dev_tx=$(counter "$dev" tx_packets) dev_rx=$(counter "$dev" rx_packets)
tap_rx=$(nscounter vtap0 rx_packets) tap_tx=$(nscounter vtap0 tx_packets)

kill -TERM "$pid"
for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$pid" 2>/dev/null && fail "vdpad did not exit within 10 s of SIGTERM"
wait "$pid"
rc=$?
[[ $rc == 0 ]] || fail "vdpad exited with status $rc"
grep -q "VDUSE vduse0: destroyed" /tmp/vdpad.log || fail "vdpad did not destroy the device"
[[ ! -e /dev/vduse/vduse0 ]] || fail "/dev/vduse/vduse0 still exists after vdpad exited"
[[ ! -e /sys/bus/vdpa/devices/vduse0 ]] || fail "vduse0 is still on the vDPA bus after vdpad exited"
step "removed on exit"

q() { sed -n "s/.*VDUSE vduse0: queue $1 ([rt]x): \(.*\)/\1/p" /tmp/vdpad.log | tail -n 1; }
rxq=$(q 0) txq=$(q 1)
[[ -n $rxq && -n $txq ]] || fail "vdpad logged no queue counters at exit"
field() { echo "$1" | sed -n "s/.*$2 \([^ ]*\).*/\1/p"; }
drops_total() { echo "$1" | tr ',' '\n' | sed -n 's/.*=\([0-9]*\)$/\1/p' | awk '{ s += $1 } END { print s + 0 }'; }
nic_rx=$(field "$rxq" packets) nic_tx=$(field "$txq" packets)
rx_drops=$(drops_total "$(field "$rxq" drops)") tx_drops=$(drops_total "$(field "$txq" drops)")
echo "STEP counters: device rx $nic_rx (drops $rx_drops) tx $nic_tx (drops $tx_drops); netdev rx $dev_rx tx $dev_tx; tap rx $tap_rx tx $tap_tx"
[[ $(field "$rxq" faults) == 0 && $(field "$txq" faults) == 0 ]] || fail "device faults: rx [$rxq] tx [$txq]"
[[ $rxq != *error:* && $txq != *error:* ]] || fail "a ring reported an error: rx [$rxq] tx [$txq]"
[[ $nic_tx == "$dev_tx" ]] || fail "the device took $nic_tx frames from the TX ring, the netdev sent $dev_tx"
[[ $((nic_tx - tx_drops)) == "$tap_rx" ]] || fail "the device sent $((nic_tx - tx_drops)) frames to the TAP (TX $nic_tx - drops $tx_drops), the TAP received $tap_rx"
[[ $nic_rx == "$dev_rx" ]] || fail "the device delivered $nic_rx frames to the RX ring, the netdev received $dev_rx"
[[ $((nic_rx + rx_drops)) == "$tap_tx" ]] || fail "the TAP sent $tap_tx frames, the device delivered $nic_rx and dropped $rx_drops"
grep -q "IOMMU misses [1-9][0-9]*, [1-9][0-9]* mapped" /tmp/vdpad.log ||
    echo "STEP note: no IOMMU miss was resolved (the bounce buffer was known before the first access)"
echo "STEP $(grep -o '[0-9]* requests answered.*' /tmp/vdpad.log | tail -n 1)"
exit 0
GUEST

log "booting the vDPA guest"
"$RUNNER" --name vduse-virtio-vdpa --log-dir "$TMP" --quiet --timeout 160 \
    --env "VDPAD=$VDPAD" --env "VDUSE_BYTES=${VDUSE_BYTES:-2097152}" --env "VDUSE_IDLE_CPU_MAX=${VDUSE_IDLE_CPU_MAX:-20}" \
    --env "VDPA_LOG_LEVEL=${VDPA_LOG_LEVEL:-debug}" \
    "$TMP/guest.sh" "$VDPAD" > "$TMP/runner.log" 2>&1
rc=$?
out=$TMP/vduse-virtio-vdpa.output.log
[[ ${VDPA_VERBOSE:-0} == 1 && -r $out ]] && sed -n 's/^STEP /... vduse-virtio-vdpa: /p' "$out" | tr -d '\r' >&2
if [[ $rc != 0 ]]; then
    reason=$(tr -d '\r' < "$out" 2>/dev/null | sed -n 's/^FAIL-REASON: //p' | head -n 1)
    [[ -n $reason ]] || reason="the guest run ended with status $rc: $(tail -n 5 "$TMP/runner.log" | tr '\n' ' ')"
    tail -n 60 "$out" >&2 2>/dev/null
    fail "$reason"
fi
tr -d '\r' < "$out" | sed -n 's/^STEP \(TCP.*\|counters.*\|vdpad idle.*\)/  \1/p'
pass
