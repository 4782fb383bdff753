#!/usr/bin/env bash
# shellcheck disable=SC2154  # t0, t1 and tp_* are set by traffic_window and testpmd_fwd_stats (lib/common.sh)
# vdpad with link=loopback (every TX frame comes back on RX) against testpmd's virtio-user
# port in io mode with --tx-first: testpmd sends one burst (32 frames of 64 bytes), then
# sends back whatever it receives, so the burst circulates testpmd -> TX ring -> device ->
# RX ring -> testpmd for a few seconds. testpmd is stopped with SIGINT (final statistics).
# The counters must agree. With
#   L = testpmd TX - vdpad TX    frames testpmd put on the TX ring that the device had not
#                                consumed when testpmd stopped that ring (GET_VRING_BASE);
#                                exactly (testpmd TX - N1) mod 2^16 where N1 is where vdpad
#                                says it stopped ring 1 ("ring 1 stopped at N1", debug log)
#   U = vdpad RX - testpmd RX    frames the device delivered that testpmd no longer read
#   D = vdpad RX drops           looped frames the device could not deliver
# the checks are:
#   vdpad TX == vdpad RX + D               every looped frame delivered or counted as dropped
#   vdpad RX == N0 (mod 2^16)              one buffer per 64-byte frame, N0 = where ring 0 stopped
#   U + D + L + testpmd TX-dropped == 32   the burst: every frame of it is accounted for
#   testpmd TX + TX-dropped == 32 + testpmd RX   (testpmd's own bookkeeping)
#   D == 0 during the traffic (32 frames never exhaust 256 buffers); D > 0 at the end is
#   explained: testpmd stops ring 0 (RX) before ring 1 (TX), so frames the device takes from
#   the TX ring in between find no running RX ring.
#
# Environment: TESTPMD_SECONDS (default 3) of traffic.
set -uo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
peer_init testpmd-loopback 120
require_testpmd

secs=${TESTPMD_SECONDS:-3}
frame=64
burst=32
sock=$TMP/vdpa0.sock
start_vdpad --port "socket=$sock,id=vdpa0,queues=1,link=loopback"
wait_for_socket "$sock" 20 vdpad
wait_status 10 --port vdpa0 --connection listening

start_testpmd_app testpmd "$sock" 1 --forward-mode=io --port-topology=loop --tx-first \
    --burst=$burst --txpkts=$frame --no-flush-rx
wait_status 45 --port vdpa0 --connection connected --feature-bit 32 --ring 0 --ring 1

moving() { load_stats vdpa0 s; (($(qstat s 0 packets) > 10 * burst)); }
wait_until 20 "frames to circulate (vdpad RX > $((10 * burst)))" moving
traffic_window "$secs"

dev_rx=$(qstat s 0 packets) dev_tx=$(qstat s 1 packets) dev_rx_drops=$(qstat s 0 drops)
counts="testpmd TX $tp_tx TX-dropped $tp_tx_dropped RX $tp_rx RX-dropped $tp_rx_dropped; vdpad TX $dev_tx RX $dev_rx RX-drops $dev_rx_drops TX-drops $(qstat s 1 drops)"
log "$counts"
((tp_rx > 10 * burst)) || fail "frames did not circulate: $counts"
(($(qstat mid 0 drops) == 0)) || fail "vdpad dropped looped frames during the traffic though only $burst circulate: $(cat "$TMP/stats-mid.log")"
(($(qstat s 1 drops) == 0)) || fail "vdpad dropped TX frames: $(cat "$TMP/stats-s.log")"
((dev_tx == dev_rx + dev_rx_drops)) || fail "vdpad TX != RX + RX drops (looped frames unaccounted for: $((dev_tx - dev_rx - dev_rx_drops))): $counts"
L=$((tp_tx - dev_tx)) U=$((dev_rx - tp_rx))
((L >= 0 && L <= burst)) || fail "testpmd TX - vdpad TX = $L, outside 0..$burst: $counts"
((U >= 0 && U <= burst)) || fail "vdpad RX - testpmd RX = $U, outside 0..$burst: $counts"
stopped_tx=$(ring_stopped_at vdpa0 1) stopped_rx=$(ring_stopped_at vdpa0 0)
if [[ -n $stopped_tx && -n $stopped_rx ]]; then
    ((L == ((tp_tx - stopped_tx) & 0xffff))) ||
        fail "testpmd TX - vdpad TX = $L, but the device stopped the TX ring at $stopped_tx, which leaves $(((tp_tx - stopped_tx) & 0xffff)) on it: $counts"
    ((dev_rx % 65536 == stopped_rx)) ||
        fail "vdpad counted $dev_rx RX frames but stopped the RX ring at avail index $stopped_rx: $counts"
fi
if ((dev_rx_drops > 0)); then
    l0=$(grep -n 'port=vdpa0 .*\] ring 0 stopped at' "$TMP/vdpad.log" | tail -n 1 | cut -d: -f1)
    l1=$(grep -n 'port=vdpa0 .*\] ring 1 stopped at' "$TMP/vdpad.log" | tail -n 1 | cut -d: -f1)
    [[ -n $l0 && -n $l1 ]] && ((l0 < l1)) ||
        fail "vdpad dropped $dev_rx_drops looped frames, and not because the RX ring was stopped before the TX ring: $counts"
fi
((U + dev_rx_drops + L + tp_tx_dropped == burst)) ||
    fail "the burst of $burst is not accounted for: unread on RX $U + dropped $dev_rx_drops + left on TX $L + testpmd TX-dropped $tp_tx_dropped: $counts"
((tp_tx + tp_tx_dropped == burst + tp_rx)) || fail "testpmd's own counters do not balance (TX + TX-dropped != $burst + RX): $counts"
(($(qstat s 0 bytes) == dev_rx * frame && $(qstat s 1 bytes) == dev_tx * frame)) ||
    fail "bytes are not $frame x packets: $(cat "$TMP/stats-s.log")"

rate=$(awk -v n="$tp_rx" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", n / (b - a) }')
pass "testpmd TX $tp_tx, vdpad TX $dev_tx RX $dev_rx, testpmd RX $tp_rx; burst $burst = unread $U + dropped at stop $dev_rx_drops + left on TX ring $L + testpmd TX-dropped $tp_tx_dropped; ~$rate frames/s looped, interrupts=$(qstat s 0 interrupts) doorbells=$(qstat s 1 doorbells)"
