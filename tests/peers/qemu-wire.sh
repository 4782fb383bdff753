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
peer_init qemu-wire 170
require_guest

ip_a=10.78.0.1 ip_b=10.78.0.2
size=1048576
seq 1 300000 | head -c $size > "$TMP/payload.bin"
md5=$(md5sum < "$TMP/payload.bin" | cut -d' ' -f1)

sock_a=$TMP/vdpa0.sock sock_b=$TMP/vdpa1.sock
start_vdpad --port "socket=$sock_a,id=vdpa0,queues=1,link=wire:vdpa1" \
    --port "socket=$sock_b,id=vdpa1,queues=1,link=wire:vdpa0"
wait_for_socket "$sock_a" 20 vdpad
wait_for_socket "$sock_b" 20 vdpad
wait_status 10 --port vdpa0 --connection listening
wait_status 10 --port vdpa1 --connection listening

t0=$SECONDS
start_qemu vma --socket "$sock_a" --connect --queues 1 --mac 52:54:00:78:00:01 --ip "$ip_a/24"
start_qemu vmb --socket "$sock_b" --connect --queues 1 --mac 52:54:00:78:00:02 --ip "$ip_b/24"
wait_guest vma 90
wait_guest vmb 90
boot=$((SECONDS - t0))
wait_status 30 --port vdpa0 --connection connected --feature-bit 32 --ring 0 --ring 1
wait_status 30 --port vdpa1 --connection connected --feature-bit 32 --ring 0 --ring 1
for vm in vma vmb; do
    guest_exec "$vm" 'for f in /proc/sys/net/ipv6/conf/*/disable_ipv6; do echo 1 > $f; done 2>/dev/null; true' >/dev/null
done

# Idle: neither guest sends anything; both engines must be asleep.
sleep 1
idle_cpu=$(cpu_percent "${PIDS[vdpad]}" 3)
log "vdpad idle CPU ${idle_cpu}%"
awk -v x="$idle_cpu" -v m="${WIRE_IDLE_CPU_MAX:-20}" 'BEGIN { exit !(x <= m) }' ||
    fail "vdpad used ${idle_cpu}% of a core over 3 s while both guests were idle (limit ${WIRE_IDLE_CPU_MAX:-20}%)"

# snapshot PA PB: both ports' counters into PA and PB, retried until two reads in a row
# agree (nothing in flight).
snapshot() {
    local _ same q
    for _ in 1 2 3 4 5; do
        load_stats vdpa0 "${1}x"; load_stats vdpa1 "${2}x"
        load_stats vdpa0 "$1"; load_stats vdpa1 "$2"
        same=1
        for q in 0 1; do
            [[ $(qstat "${1}x" $q packets) == $(qstat "$1" $q packets) &&
               $(qstat "${2}x" $q packets) == $(qstat "$2" $q packets) ]] || same=0
        done
        ((same)) && return 0
        sleep 1
    done
    fail "device counters kept moving while the guests were quiet"
}
# d P0 P1 QUEUE FIELD: counter growth from snapshot P0 to P1.
d() { echo $(($(qstat "$2" "$3" "$4") - $(qstat "$1" "$3" "$4"))); }

# Baseline, with both guests up and quiet. Frames sent while the other guest's RX ring was
# not running yet (IPv6 at boot) are lost on the way, and counted nowhere in vdpactl stats
# (vdpad keeps them in an internal link-drop counter): what the ports' counters cannot
# account for before this point is reported, and the checks below use the growth after it.
snapshot a0 b0
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

# TCP A -> B. (nc's stdin in B must stay open: at EOF on stdin nc shuts its sending side
# and A's nc would take that as the end. The rc file is written when nc exits.)
guest_exec vmb 'rm -f /tmp/recv /tmp/nc.rc; (sleep 150 | (nc -l -p 5003 > /tmp/recv 2>/tmp/nc.err; echo $? > /tmp/nc.rc)) </dev/null >/dev/null 2>&1 &
    i=0; while ! netstat -ltn | grep -q ":5003 " && [ $i -lt 50 ]; do usleep 100000; i=$((i+1)); done; netstat -ltn | grep -q ":5003 "' ||
    fail "guest B's listener did not start"
t=$(date +%s.%N)
out=$(GUEST_EXEC_TIMEOUT=100 guest_exec vma "seq 1 300000 | head -c $size | nc $ip_b 5003 && echo sent") ||
    fail "A -> B TCP transfer failed: $out"
xfer_s=$(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
out=$(GUEST_EXEC_TIMEOUT=30 guest_exec vmb 'i=0; while [ ! -e /tmp/nc.rc ] && [ $i -lt 100 ]; do usleep 100000; i=$((i+1)); done;
    echo "rc=$(cat /tmp/nc.rc 2>/dev/null) size=$(wc -c < /tmp/recv) md5=$(md5sum < /tmp/recv | cut -d" " -f1)";
    kill $(pidof sleep) 2>/dev/null; true') || fail "cannot check what guest B received: $out"
[[ $out == *"rc=0 size=$size md5=$md5"* ]] || fail "A -> B: expected rc=0 size=$size md5=$md5, guest B says: $out"

# Counters, once the traffic is over: growth since the baseline.
sleep 1
snapshot a b
no_faults a "port vdpa0"
no_faults b "port vdpa1"
counts="since baseline: A TX $(d a0 a 1 packets) (drops $(d a0 a 1 drops)) RX $(d a0 a 0 packets) (drops $(d a0 a 0 drops)); B TX $(d b0 b 1 packets) (drops $(d b0 b 1 drops)) RX $(d b0 b 0 packets) (drops $(d b0 b 0 drops))"
log "$counts"
(($(d a0 a 1 packets) >= size / 1500)) || fail "port vdpa0 TX counted too few frames for 1 MiB: $counts"
# What one port sent crossed the wire to the other: every frame is either delivered, or
# dropped at the sender (wire full: TX linkError). Frames waiting on the wire for buffers
# are not dropped.
for pair in "a b" "b a"; do
    set -- $pair
    tx=$(d "${1}0" "$1" 1 packets) lost=$(d "${1}0" "$1" 1 drop_linkError) rx=$(d "${2}0" "$2" 0 packets)
    ((tx == rx + lost)) || fail "frames lost on the wire: port $1 TX $tx != port $2 RX $rx + $1's TX linkError $lost: $counts"
done
for q in "a 0" "a 1" "b 0" "b 1"; do
    set -- $q
    (($(d "${1}0" "$1" "$2" drops) == 0)) ||
        fail "drops counted on port $1 queue $2 though every frame arrived: $counts ($(cat "$TMP/stats-$1.log"))"
done

stop_qemu vma
stop_qemu vmb
wait_status 15 --port vdpa0 --connection listening
wait_status 15 --port vdpa1 --connection listening
alive vdpad || fail "vdpad exited after QEMU quit"
rate=$(awk -v s="$xfer_s" -v n="$size" 'BEGIN { printf "%.0f", n / 1024 / s }')
pass "boot ${boot}s (both); ping rtt avg A->B $(cut -d/ -f2 <<<"$rtt_a") ms, B->A $(cut -d/ -f2 <<<"$rtt_b") ms; 1 MiB A->B in ${xfer_s}s (~$rate KiB/s), md5 ok; $counts; unaccounted before the baseline: A->B $boot_lost_ab, B->A $boot_lost_ba; idle CPU ${idle_cpu}%"
