#!/usr/bin/env bash
# Two ports of one vdpad wired to each other (link=wire:ID both ways), a QEMU guest on each:
# guest A (10.78.0.1/24) and guest B (10.78.0.2/24) ping each other, then A sends 1 MiB of
# known bytes over TCP to a listener in B, checked by md5 and length in B. Traffic exists
# only between the two guests. Counters, as growth from a baseline taken once both guests
# are up and quiet: no faults, and what one port sent is what the other received (frames on
# the wire are kept until the receiver has buffers, so none should be lost). Frames the
# ports' counters cannot account for before the baseline are reported. Also measured: vdpad's CPU use while both guests are idle.
#
# Environment: WIRE_IDLE_CPU_MAX (default 20): vdpad's maximum CPU % while idle.
set -uo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# shellcheck source=lib/guestnet.sh
source "$PEERS_DIR/lib/guestnet.sh"
peer_init qemu-wire 170
require_guest

ip_a=10.78.0.1 ip_b=10.78.0.2
size=1048576
seq 1 300000 | head -c $size > "$TMP/payload.bin"

sock_a=$TMP/vdpa0.sock sock_b=$TMP/vdpa1.sock
start_vdpad --port "socket=$sock_a,id=vdpa0,queues=1,link=wire:vdpa1" \
    --port "socket=$sock_b,id=vdpa1,queues=1,link=wire:vdpa0"
start_wire_guests "$sock_a" "$sock_b" 52:54:00:78:00:01 52:54:00:78:00:02 "$ip_a" "$ip_b"
boot=$BOOT_S

# Idle: neither guest sends anything; both engines must be asleep.
sleep 1
idle_cpu=$(cpu_percent "${PIDS[vdpad]}" 3)
log "vdpad idle CPU ${idle_cpu}%"
awk -v x="$idle_cpu" -v m="${WIRE_IDLE_CPU_MAX:-20}" 'BEGIN { exit !(x <= m) }' ||
    fail "vdpad used ${idle_cpu}% of a core over 3 s while both guests were idle (limit ${WIRE_IDLE_CPU_MAX:-20}%)"

# Baseline, with both guests up and quiet. Frames sent while the other guest's RX ring was
# not running yet (IPv6 at boot) are lost on the way, and counted nowhere in vdpactl stats
# (vdpad keeps them in an internal link-drop counter): what the ports' counters cannot
# account for before this point is reported, and the checks below use the growth after it.
snapshot_wire a0 b0
boot_lost_ab=$(($(qstat a0 1 packets) - $(qstat a0 1 drop_linkError) - $(qstat b0 0 packets)))
boot_lost_ba=$(($(qstat b0 1 packets) - $(qstat b0 1 drop_linkError) - $(qstat a0 0 packets)))
log "before the test traffic: A TX $(qstat a0 1 packets) B RX $(qstat b0 0 packets) (unaccounted $boot_lost_ab); B TX $(qstat b0 1 packets) A RX $(qstat a0 0 packets) (unaccounted $boot_lost_ba)"

# Pings.
out=$(GUEST_EXEC_TIMEOUT=40 guest_exec vma "ping -c 5 -W 5 $ip_b") || fail "A ping B failed: $out"
grep -q ' 5 packets received' <<<"$out" || fail "A ping B lost packets: $out"
rtt_a=$(grep -o 'min/avg/max = [0-9./]*' <<<"$out" | cut -d' ' -f3)
out=$(GUEST_EXEC_TIMEOUT=40 guest_exec vmb "ping -c 3 -W 5 $ip_a") || fail "B ping A failed: $out"
grep -q ' 3 packets received' <<<"$out" || fail "B ping A lost packets: $out"
rtt_b=$(grep -o 'min/avg/max = [0-9./]*' <<<"$out" | cut -d' ' -f3)
log "ping rtt A->B $rtt_a ms, B->A $rtt_b ms"

# TCP A -> B.
tcp_guest_to_guest vma vmb 5003 "$TMP/payload.bin" 100 "seq 1 300000 | head -c $size | nc $ip_b 5003"
xfer_s=$XFER_S

# Counters, once the traffic is over: growth since the baseline.
sleep 1
snapshot_wire a b
no_faults a "port vdpa0"
no_faults b "port vdpa1"
counts="since baseline: A TX $(qdelta a0 a 1 packets) (drops $(qdelta a0 a 1 drops)) RX $(qdelta a0 a 0 packets) (drops $(qdelta a0 a 0 drops)); B TX $(qdelta b0 b 1 packets) (drops $(qdelta b0 b 1 drops)) RX $(qdelta b0 b 0 packets) (drops $(qdelta b0 b 0 drops))"
log "$counts"
# Bytes, not frames: with the offloads both guests negotiate, one frame can carry up to 64 KiB.
(($(qdelta a0 a 1 bytes) >= size)) || fail "port vdpa0 TX counted fewer bytes ($(qdelta a0 a 1 bytes)) than the 1 MiB sent: $counts"
# What one port sent crossed the wire to the other: every frame is either delivered, or
# dropped at the sender (wire full: TX linkError). Frames waiting on the wire for buffers
# are not dropped.
for pair in "a b" "b a"; do
    set -- $pair
    tx=$(qdelta "${1}0" "$1" 1 packets) lost=$(qdelta "${1}0" "$1" 1 drop_linkError) rx=$(qdelta "${2}0" "$2" 0 packets)
    ((tx == rx + lost)) || fail "frames lost on the wire: port $1 TX $tx != port $2 RX $rx + $1's TX linkError $lost: $counts"
done
for q in "a 0" "a 1" "b 0" "b 1"; do
    set -- $q
    (($(qdelta "${1}0" "$1" "$2" drops) == 0)) ||
        fail "drops counted on port $1 queue $2 though every frame arrived: $counts ($(cat "$TMP/stats-$1.log"))"
done

stop_wire_guests
pass "boot ${boot}s (both); ping rtt avg A->B $(cut -d/ -f2 <<<"$rtt_a") ms, B->A $(cut -d/ -f2 <<<"$rtt_b") ms; 1 MiB A->B in ${xfer_s}s (~$(kib_rate "$size" "$xfer_s") KiB/s), md5 ok; $counts; unaccounted before the baseline: A->B $boot_lost_ab, B->A $boot_lost_ba; idle CPU ${idle_cpu}%"
