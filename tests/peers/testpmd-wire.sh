#!/usr/bin/env bash
# shellcheck disable=SC2154  # tp_* are set by testpmd_fwd_stats (lib/common.sh)
# Two wired ports of one vdpad (vdpa0 link=wire:vdpa1, vdpa1 link=wire:vdpa0), a testpmd
# virtio-user frontend on each. B (on vdpa1) is interactive and does not forward at first:
# its RX ring holds the buffers it posted, nobody takes them. A (on vdpa0) sends 64-byte
# frames as fast as it can (txonly). So B's ring fills, then the wire between the ports
# fills, then A's port has to drop what it sends (TX linkError). Frames on the wire wait for
# B's buffers: none is dropped at B. Then A stops, B starts forwarding (rxonly), and every
# frame held on the wire reaches B.
#
# Checks:
#   while B is stalled: B's RX delivered exactly its ring's buffers (256), A's TX counted
#     linkError drops, and B's RX queue counted NO drops (the held frames are not lost);
#   testpmd A TX-packets == vdpad vdpa0 TX packets (as in testpmd-sink);
#   held on the wire = A TX - A linkError - B RX, 0 < held <= 4096 (the wire's capacity);
#   after B forwarded: vdpad vdpa1 RX == A TX - A linkError (nothing lost on the wire), and
#     testpmd B RX-packets == vdpad vdpa1 RX (B read all of them, with --no-flush-rx);
#   no faults, B's RX drops 0 at the end too.
set -uo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
peer_init testpmd-wire 120
require_testpmd

wire_capacity=4096
sock_a=$TMP/vdpa0.sock sock_b=$TMP/vdpa1.sock
start_vdpad --port "socket=$sock_a,id=vdpa0,queues=1,link=wire:vdpa1" \
    --port "socket=$sock_b,id=vdpa1,queues=1,link=wire:vdpa0"
wait_for_socket "$sock_a" 20 vdpad
wait_for_socket "$sock_b" 20 vdpad
wait_status 10 --port vdpa0 --connection listening
wait_status 10 --port vdpa1 --connection listening

# B: interactive, rxonly once told to start, commands on a pipe.
testpmd_cmd testpmdb "$sock_b" 1
spawn_input testpmdb "$TMP/testpmdb.in" "${TESTPMD_CMD[@]}" -i --forward-mode=rxonly --no-flush-rx
wait_status 45 --port vdpa1 --connection connected --feature-bit 32 --ring 0 --ring 1
wait_for_log "$TMP/testpmdb.log" 'testpmd>' 30 testpmdb
ring_size=$(vdpa_status | python3 -c 'import json,sys; d=json.load(sys.stdin); p=[p for p in d["ports"] if p["id"]=="vdpa1"][0]; print([q for q in p["queues"] if q["index"]==0][0]["ringSize"])') ||
    fail "cannot read B's RX ring size"

# Idle: B connected and not forwarding, A not there yet: vdpad should not use the CPU.
idle_cpu=$(cpu_percent "${PIDS[vdpad]}" 2)
log "vdpad CPU while B is connected and idle: ${idle_cpu}%"

# A: txonly.
start_testpmd_app testpmda "$sock_a" 1 --forward-mode=txonly --txpkts=64 --no-flush-rx
wait_status 45 --port vdpa0 --connection connected --feature-bit 32 --ring 0 --ring 1
wire_full() { load_stats vdpa0 a; (($(qstat a 1 drop_linkError) > 0)); }
wait_until 20 "the wire to fill (vdpa0 TX linkError drops)" wire_full
sleep 2
alive testpmda || fail "testpmd A exited during the traffic"
load_stats vdpa1 bs
stalled="while B was stalled: vdpa1 RX $(qstat bs 0 packets) drops $(qstat bs 0 drops) (noBuffer $(qstat bs 0 drop_noBuffer))"
log "$stalled"

stop testpmda INT 20
rc=$?
((rc == 0)) || fail "testpmd A exited with status $rc after SIGINT"
testpmd_fwd_stats testpmda
a_tx_tp=$tp_tx
wait_status 15 --port vdpa0 --connection listening
load_stats vdpa0 a
load_stats vdpa1 b
a_tx=$(qstat a 1 packets) a_lost=$(qstat a 1 drop_linkError) b_rx0=$(qstat b 0 packets)
held=$((a_tx - a_lost - b_rx0))
log "A: testpmd TX $a_tx_tp, vdpa0 TX $a_tx linkError $a_lost; vdpa1 RX $b_rx0 -> held on the wire $held"

# B forwards now: everything held must arrive.
printf 'start\n' >&"$INPUT_FD"
want=$((a_tx - a_lost))
drained() { load_stats vdpa1 b; (($(qstat b 0 packets) >= want)); }
wait_until 30 "B to receive the $held frames held on the wire" drained
sleep 1
# (testpmd's stdout is a file, so block-buffered: its statistics show up when it exits.)
printf 'stop\nquit\n' >&"$INPUT_FD"
exited() { ! alive testpmdb; }
wait_until 20 "testpmd B to quit" exited
stop testpmdb
testpmd_fwd_stats testpmdb
b_tp_rx=$tp_rx
wait_status 15 --port vdpa1 --connection listening
alive vdpad || fail "vdpad exited"
load_stats vdpa0 a
load_stats vdpa1 b
no_faults a "vdpa0"
no_faults b "vdpa1"
b_rx=$(qstat b 0 packets)
counts="vdpad idle CPU ${idle_cpu}%; testpmd A TX $a_tx_tp; vdpa0 TX $a_tx (linkError $a_lost); vdpa1 RX $b_rx (drops $(qstat b 0 drops), noBuffer $(qstat b 0 drop_noBuffer)); testpmd B RX $b_tp_rx; held on the wire $held"
log "$counts"

problems=()
# As in testpmd-sink: frames testpmd placed on the ring that the device had not consumed when
# testpmd stopped the ring (GET_VRING_BASE) are not the device's; the stop position says how many.
a_stopped=$(ring_stopped_at vdpa0 1)
if [[ -n $a_stopped ]]; then
    (((a_tx % 65536) == a_stopped)) ||
        problems+=("vdpa0 counted TX $a_tx but stopped its TX ring at avail index $a_stopped (mod 2^16)")
    ((a_tx_tp - a_tx == ((a_tx_tp - a_stopped) & 0xffff))) ||
        problems+=("testpmd A TX-packets $a_tx_tp != vdpa0 TX $a_tx + $(((a_tx_tp - a_stopped) & 0xffff)) left on the ring at GET_VRING_BASE")
else
    ((a_tx_tp - a_tx >= 0 && a_tx_tp - a_tx <= ring_size)) || problems+=("testpmd A TX-packets $a_tx_tp != vdpa0 TX $a_tx (more than a ring apart)")
fi
(($(qstat bs 0 packets) == ring_size)) ||
    problems+=("while B was stalled its RX queue counted $(qstat bs 0 packets) frames, expected its $ring_size posted buffers")
(($(qstat bs 0 drops) == 0)) ||
    problems+=("while B was stalled its RX queue counted $(qstat bs 0 drops) drops (noBuffer $(qstat bs 0 drop_noBuffer)), but the frames were held on the wire, not dropped: they all arrived later")
((a_lost > 0)) || problems+=("the wire never filled (no linkError on vdpa0 TX)")
((held > 0 && held <= wire_capacity)) || problems+=("held on the wire $held, expected 1..$wire_capacity")
((b_rx == want)) || problems+=("vdpa1 RX $b_rx != vdpa0 TX - linkError $want: $((want - b_rx)) frames lost on the wire")
((b_tp_rx == b_rx)) || problems+=("testpmd B RX-packets $b_tp_rx != vdpa1 RX $b_rx")
(($(qstat b 0 drops) == 0)) || problems+=("vdpa1 RX drops $(qstat b 0 drops) at the end (noBuffer $(qstat b 0 drop_noBuffer)) though every frame that reached the wire was delivered")
((${#problems[@]} == 0)) || fail "$(printf '%s; ' "${problems[@]}")[$counts]"
pass "$counts"
