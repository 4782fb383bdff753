#!/usr/bin/env bash
# shellcheck disable=SC2154  # t0, t1 and tp_* are set by traffic_window and testpmd_fwd_stats (lib/common.sh)
# vdpad with link=source (64-byte frames, rate 0 = as fast as the guest posts buffers)
# against testpmd's virtio-user port in rxonly mode for a few seconds; testpmd is stopped
# with SIGINT so it prints its final forward statistics. Then testpmd's RX-packets and the
# packets vdpad's RX queue (0) counted must agree within a strict bound:
#
#   0 <= vdpad RX - testpmd RX <= RX ring size (256)
#
# Why: the device counts a frame when it wrote it into a posted buffer; testpmd counts it
# when rx_burst took it off the used ring. After testpmd's forwarding lcore stopped, the
# buffers it had posted are still on the ring, and a rate-0 source fills every one of them
# before testpmd stops the ring; those frames are counted by the device and never read.
# There are at most ring-size posted buffers. And where the device stopped the RX ring
# (its GET_VRING_BASE answer, logged at debug level: "ring 0 stopped at N") must match what
# it counted: each 64-byte frame takes one buffer, so RX packets == N (mod 2^16).
# testpmd runs with --no-flush-rx: otherwise it
# reads and discards (uncounted) whatever arrived before forwarding started, which made the
# difference 3 rings' worth in a trial run.
# Also: bytes = 64 x packets, no drops (a rate-0 source waits for buffers instead of
# dropping), no faults, nothing counted on the TX queue.
#
# Environment: TESTPMD_SECONDS (default 3) of traffic.
set -uo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
peer_init testpmd-source 120
require_testpmd

secs=${TESTPMD_SECONDS:-3}
frame=64
sock=$TMP/vdpa0.sock
start_vdpad --port "socket=$sock,id=vdpa0,queues=1,link=source:size=$frame"
wait_for_socket "$sock" 20 vdpad
wait_status 10 --port vdpa0 --connection listening

start_testpmd_app testpmd "$sock" 1 --forward-mode=rxonly --no-flush-rx
wait_status 45 --port vdpa0 --connection connected --feature-bit 32 --ring 0 --ring 1
ring_size=$(vdpa_status | python3 -c 'import json,sys; d=json.load(sys.stdin); print([q for q in d["ports"][0]["queues"] if q["index"]==0][0]["ringSize"])') ||
    fail "cannot read the RX ring size"

rx_moving() { load_stats vdpa0 s; (($(qstat s 0 packets) > ring_size)); }
wait_until 20 "vdpad's RX queue to deliver frames" rx_moving
traffic_window "$secs"

dev_rx=$(qstat s 0 packets) dev_bytes=$(qstat s 0 bytes)
((tp_rx > 0)) || fail "testpmd received nothing (RX-packets 0)"
diff=$((dev_rx - tp_rx))
((diff >= 0)) || fail "testpmd RX-packets $tp_rx > vdpad RX queue $dev_rx: testpmd received $((-diff)) frame(s) the device did not count"
((diff <= ring_size)) || fail "vdpad RX queue $dev_rx, testpmd RX-packets $tp_rx: $diff frames unaccounted for, more than the $ring_size buffers a ring can hold"
stopped=$(ring_stopped_at vdpa0 0)
if [[ -n $stopped ]]; then
    ((dev_rx % 65536 == stopped)) ||
        fail "vdpad counted $dev_rx RX frames but stopped the RX ring at avail index $stopped: $(((stopped - dev_rx) & 0xffff)) buffer(s) (mod 2^16) filled and not counted"
fi
((dev_bytes == dev_rx * frame)) || fail "vdpad RX bytes $dev_bytes != $dev_rx x $frame"
(($(qstat s 0 drops) == 0)) || fail "vdpad dropped RX frames with a rate-0 source: $(cat "$TMP/stats-s.log")"
((tp_rx_dropped == 0)) || fail "testpmd RX-dropped (imissed) $tp_rx_dropped"
(($(qstat s 1 packets) == 0)) || fail "vdpad counted $(qstat s 1 packets) TX frames; testpmd rxonly sends none"

rate=$(awk -v n="$tp_rx" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", n / (b - a) }')
pass "testpmd RX-packets $tp_rx, vdpad RX $dev_rx (+$diff filled and unread, bound $ring_size; ring stopped at ${stopped:-?}) in ~${secs}s (~$rate pps), interrupts=$(qstat s 0 interrupts) doorbells=$(qstat s 0 doorbells)"
