#!/usr/bin/env bash
# vdpad with link=tap: the port's SoftNIC creates a TAP interface (vdpatapPID) when the port
# is created; the test moves it into a network namespace of its own and gives it
# 10.77.0.1/24 there. The QEMU guest on the port (10.77.0.2/24) then:
#   - pings 10.77.0.1, and the namespace pings the guest back;
#   - sends 1 MiB of known bytes over TCP to a listener in the namespace (guest TX);
#   - receives 1 MiB of other known bytes over TCP from the namespace (guest RX);
# both checked by md5 and length on arrival. Traffic stays between the namespace and the
# guest. Counters, as growth from a baseline taken with the guest up and quiet: no faults,
# and what the device moved matches the TAP's own counters.
# Also measured: vdpad's CPU use while the guest is idle (the DMA engine should sleep on
# the kick eventfds, not poll).
#
# Environment: TAP_IDLE_CPU_MAX (default 20): vdpad's maximum CPU % while idle.
set -uo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# shellcheck source=lib/guestnet.sh
source "$PEERS_DIR/lib/guestnet.sh"
peer_init qemu-tap 170
require_guest
[[ -c /dev/net/tun ]] || fail "no /dev/net/tun"
command -v ip >/dev/null || fail "no ip command (iproute2)"

ifname=vdpatap$$
ifname=${ifname:0:15}
ns=vdpa-peer-tap-$$
host_ip=10.77.0.1 guest_ip=10.77.0.2

# Payloads: deterministic text (numbers, one a line), 1 MiB each way, different each way.
seq 1 300000 | head -c 1048576 > "$TMP/to-host.bin"
seq 300001 600000 | head -c 1048576 > "$TMP/to-guest.bin"
size=1048576

sock=$TMP/vdpa0.sock
start_tap_port "$sock" "$ifname"
grep -q "tap link on interface $ifname" "$TMP/vdpad.log" || fail "vdpad did not log its TAP interface $ifname"
tap_into_ns "$ifname" "$ns" "$host_ip/24"

t0=$SECONDS
start_qemu vm1 --socket "$sock" --connect --queues 1 --mac 52:54:00:77:00:02 --ip "$guest_ip/24"
wait_guest vm1 60
boot=$((SECONDS - t0))
wait_status 30 --port vdpa0 --connection connected --feature-bit 32 --ring 0 --ring 1
guests_no_ipv6 vm1

# Idle: the guest sends nothing; the engine must be asleep.
sleep 1
idle_cpu=$(cpu_percent "${PIDS[vdpad]}" 3)
log "vdpad idle CPU ${idle_cpu}%"
awk -v x="$idle_cpu" -v m="${TAP_IDLE_CPU_MAX:-20}" 'BEGIN { exit !(x <= m) }' ||
    fail "vdpad used ${idle_cpu}% of a core over 3 s while the guest was idle (limit ${TAP_IDLE_CPU_MAX:-20}%)"

# snapshot P: the device's counters into P and the TAP's into P_tap_rx, P_tap_tx,
# P_tap_txdrop, retried until two device reads around the TAP read agree (nothing in flight).
# The TAP's rx is what the device wrote into it (guest TX), its tx what the device read
# from it (guest RX).
snapshot() {
    local _ t
    for _ in 1 2 3 4 5; do
        load_stats vdpa0 "${1}x"
        t=$(nsx cat "/sys/class/net/$ifname/statistics/rx_packets" "/sys/class/net/$ifname/statistics/tx_packets" \
                "/sys/class/net/$ifname/statistics/tx_dropped" | tr '\n' ' ')
        load_stats vdpa0 "$1"
        if [[ $(qstat "${1}x" 0 packets) == $(qstat "$1" 0 packets) && $(qstat "${1}x" 1 packets) == $(qstat "$1" 1 packets) ]]; then
            read -r "${1}_tap_rx" "${1}_tap_tx" "${1}_tap_txdrop" <<<"$t"
            return 0
        fi
        sleep 1
    done
    fail "device counters kept moving while the guest was quiet"
}
b0_tap_rx=0 b0_tap_tx=0 b0_tap_txdrop=0 s_tap_rx=0 s_tap_tx=0 s_tap_txdrop=0

# Baseline with the guest up and quiet. What the counters cannot account for before it
# (frames read from the TAP while the guest's RX ring was not running are counted only in
# vdpad's internal link-drop counter, not in vdpactl stats) is reported; the checks use the
# growth after it.
snapshot b0
boot_unaccounted=$((b0_tap_tx - $(qstat b0 0 packets) - $(qstat b0 0 drops)))
log "baseline: device RX $(qstat b0 0 packets) TX $(qstat b0 1 packets); TAP rx $b0_tap_rx tx $b0_tap_tx (read by the device and not in its RX counters: $boot_unaccounted)"

# Ping both ways.
out=$(guest_exec vm1 "ping -c 5 -W 3 $host_ip") || fail "guest ping $host_ip failed: $out"
grep -q ' 5 packets received' <<<"$out" || fail "guest ping lost packets: $out"
ping_guest=$(grep -o 'min/avg/max = [0-9./]*' <<<"$out" | cut -d' ' -f3)
out=$(nsx busybox ping -c 3 -W 3 "$guest_ip" 2>&1) || fail "namespace ping $guest_ip failed: $out"
ping_ns=$(grep -o "min/avg/max = [0-9./]*" <<<"$out" | cut -d" " -f3)
log "ping rtt guest->ns $ping_guest ms, ns->guest $ping_ns ms"

# Guest -> namespace, then namespace -> guest.
tcp_guest_to_ns vm1 5001 "$TMP/to-host.bin" 90 "seq 1 300000 | head -c $size | nc $host_ip 5001"
up_s=$XFER_S
tcp_ns_to_guest vm1 "$guest_ip" 5002 "$TMP/to-guest.bin" 90
down_s=$XFER_S

# Counters, once the traffic is over: growth since the baseline, device against TAP.
sleep 1
snapshot s
no_faults s
dev_rx=$(qdelta b0 s 0 packets) dev_tx=$(qdelta b0 s 1 packets) dev_rx_drops=$(qdelta b0 s 0 drops)
tap_rx=$((s_tap_rx - b0_tap_rx)) tap_tx=$((s_tap_tx - b0_tap_tx)) tap_txdrop=$((s_tap_txdrop - b0_tap_txdrop))
counts="since baseline: device RX $dev_rx (drops $dev_rx_drops) TX $dev_tx (drops $(qdelta b0 s 1 drops)); TAP rx $tap_rx tx $tap_tx tx_dropped $tap_txdrop"
log "$counts"
# Bytes, not frames: with the offloads the guest negotiates, one frame can carry up to 64 KiB.
(($(qdelta b0 s 1 bytes) >= size)) || fail "device TX counted fewer bytes ($(qdelta b0 s 1 bytes)) than the 1 MiB sent: $counts"
(($(qdelta b0 s 0 bytes) >= size)) || fail "device RX counted fewer bytes ($(qdelta b0 s 0 bytes)) than the 1 MiB received: $counts"
(($(qdelta b0 s 1 drops) == 0)) || fail "device dropped TX frames: $(cat "$TMP/stats-s.log")"
# Every frame the guest sent went into the TAP.
((tap_rx == dev_tx)) || fail "TAP rx_packets != device TX packets: $counts"
# Every frame read from the TAP was delivered or counted as dropped. (RX drops are possible:
# the device reads the TAP whether or not the guest has posted buffers, and drops what
# does not fit; TCP recovers. They are reported.)
((tap_tx == dev_rx + dev_rx_drops)) || fail "TAP tx_packets != device RX packets + RX drops: $counts"

stop_qemu vm1
wait_status 15 --port vdpa0 --connection listening
alive vdpad || fail "vdpad exited after QEMU quit"
pass "boot ${boot}s; ping rtt avg $(cut -d/ -f2 <<<"$ping_guest") ms (guest) / $(cut -d/ -f2 <<<"$ping_ns") ms (ns); 1 MiB guest->ns ${up_s}s (~$(kib_rate "$size" "$up_s") KiB/s), ns->guest ${down_s}s (~$(kib_rate "$size" "$down_s") KiB/s), md5 ok; $counts; before the baseline unaccounted $boot_unaccounted; idle CPU ${idle_cpu}%"
