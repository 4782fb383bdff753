#!/usr/bin/env bash
# Offloads across a wire (issue 10): two ports of one vdpad wired to each other, a QEMU guest
# on each. Port A (vdpa0, guest 10.88.0.1/24) offers the checksum and segmentation offloads
# (the default); port B (vdpa1, guest 10.88.0.2/24) is started with `offloads=off`, so its
# guest negotiates none. The wire carries A's virtio-net header with each frame, and B's
# device must segment A's TSO frames and fill in their checksums in software, since B's guest
# takes neither large frames nor partial checksums. Checked:
#   - negotiation (vdpactl status, acked features): A acked CSUM, GUEST_CSUM, HOST_TSO4/6,
#     HOST_ECN, HOST_UFO, GUEST_TSO4/6, GUEST_ECN, GUEST_UFO; B was offered none of them;
#     A's `ethtool -k eth0` shows TSO and tx checksumming on;
#   - A -> B, TCP_BYTES of known bytes sent from a file in A's tmpfs, md5 and length checked in
#     B: A's port sent frames longer than 1514 B (its TX bytes per packet above 1514 on
#     average) and B's port delivered more frames than A's sent (segmentation happened);
#   - B -> A, TCP_BYTES of other known bytes, md5 and length checked in A: B's frames reach A
#     one for one (B TX = A RX + B's TX linkError);
#   - checksums: no InCsumErrors growth in /proc/net/snmp of either guest (B checks every
#     checksum in software: it did not negotiate GUEST_CSUM);
#   - no faults, and no drops for badHeader or badOffload on any queue of either port.
# A failed transfer, a checksum error or a badHeader/badOffload drop fails at once; the offload
# checks are all made and reported together at the end, after the transfers.
#
# Environment: TCP_BYTES (default 2097152 per direction); WIRE_PLAIN_PORT_OPTS (default
# `offloads=off`): the port options that make port B's device offer no offloads (empty: B
# like A, to run the rest of the test on a tree without the option; it then fails on the
# negotiation check).
set -uo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
peer_init qemu-wire-offload 170
require_guest
command -v jq >/dev/null || fail "no jq: run scripts/install-deps"

ip_a=10.88.0.1 ip_b=10.88.0.2
size=${TCP_BYTES:-2097152}
seq 1 900000 | head -c "$size" > "$TMP/a.bin"
seq 900001 1800000 | head -c "$size" > "$TMP/b.bin"
[[ $(stat -c %s "$TMP/a.bin") == "$size" && $(stat -c %s "$TMP/b.bin") == "$size" ]] ||
    fail "TCP_BYTES=$size is more than the payload generator makes (about 5 MiB)"
md5_a=$(md5sum < "$TMP/a.bin" | cut -d' ' -f1)
md5_b=$(md5sum < "$TMP/b.bin" | cut -d' ' -f1)

missing=()
want() { missing+=("$*"); log "offload check failed: $*"; }

plain_opts=${WIRE_PLAIN_PORT_OPTS-offloads=off}
sock_a=$TMP/vdpa0.sock sock_b=$TMP/vdpa1.sock
resolve_bins
CONTROL=$TMP/control.sock
spawn vdpad "$VDPAD" --control "$CONTROL" --log-level "${VDPA_LOG_LEVEL:-debug}" \
    --port "socket=$sock_a,id=vdpa0,queues=1,link=wire:vdpa1" \
    --port "socket=$sock_b,id=vdpa1,queues=1,link=wire:vdpa0${plain_opts:+,$plain_opts}"
deadline=$((SECONDS + 20))
until [[ -S $CONTROL ]]; do
    if ! alive vdpad; then
        sleep 0.2
        fail "vdpad did not start with port B's options '${plain_opts}': $( (grep -m1 -i 'error' "$TMP/vdpad.log" || tail -n 2 "$TMP/vdpad.log") | tr '\n' ' ')"
    fi
    ((SECONDS < deadline)) || fail "timed out waiting for vdpad's control socket"
    sleep 0.1
done
wait_for_socket "$sock_a" 20 vdpad
wait_for_socket "$sock_b" 20 vdpad
wait_status 10 --port vdpa0 --connection listening
wait_status 10 --port vdpa1 --connection listening

start_qemu vma --socket "$sock_a" --connect --queues 1 --mac 52:54:00:88:00:01 --ip "$ip_a/24"
start_qemu vmb --socket "$sock_b" --connect --queues 1 --mac 52:54:00:88:00:02 --ip "$ip_b/24"
wait_guest vma 90
wait_guest vmb 90
wait_status 30 --port vdpa0 --connection connected --feature-bit 32 --ring 0 --ring 1
wait_status 30 --port vdpa1 --connection connected --feature-bit 32 --ring 0 --ring 1
for vm in vma vmb; do
    guest_exec "$vm" 'for f in /proc/sys/net/ipv6/conf/*/disable_ipv6; do echo 1 > $f; done 2>/dev/null; true' >/dev/null
done

# --- negotiation ------------------------------------------------------------------------------
declare -A BIT=([CSUM]=0 [GUEST_CSUM]=1 [GUEST_TSO4]=7 [GUEST_TSO6]=8 [GUEST_ECN]=9 [GUEST_UFO]=10
                [HOST_TSO4]=11 [HOST_TSO6]=12 [HOST_ECN]=13 [HOST_UFO]=14)
OFFLOAD_NAMES=(CSUM GUEST_CSUM GUEST_TSO4 GUEST_TSO6 GUEST_ECN GUEST_UFO HOST_TSO4 HOST_TSO6 HOST_ECN HOST_UFO)
# features PORT: "acked offered ackedNames" from vdpactl status.
features() {
    vdpa_status | jq -r --arg p "$1" '.ports[] | select(.id == $p) | "\(.features.acked) \(.features.offered) \(.features.ackedNames)"'
}
read -r a_acked a_offered a_names <<<"$(features vdpa0)"
read -r b_acked b_offered b_names <<<"$(features vdpa1)"
[[ $a_acked == 0x* && $b_offered == 0x* ]] || fail "cannot read the ports' features from vdpactl status"
log "A acked $a_acked [$a_names] of $a_offered; B acked $b_acked [$b_names] of $b_offered"
a_lacks=() b_has=()
for n in "${OFFLOAD_NAMES[@]}"; do
    (((a_acked >> BIT[$n]) & 1)) || a_lacks+=("$n")
    (((b_offered >> BIT[$n]) & 1)) && b_has+=("$n")
done
((${#a_lacks[@]} == 0)) || want "port A's guest did not ack ${a_lacks[*]} (acked $a_acked [$a_names], offered $a_offered)"
((${#b_has[@]} == 0)) || want "port B ('${plain_opts}') still offers ${b_has[*]} (offered $b_offered)"
gk=$(guest_exec vma 'ethtool -k eth0') || fail "ethtool -k eth0 in guest A failed: $gk"
for f in tx-checksumming tcp-segmentation-offload; do
    grep -q "^$f: on" <<<"$gk" || want "guest A eth0: $(grep "^$f:" <<<"$gk" || echo "$f: (absent)")"
done

# --- payloads, listeners, counters ------------------------------------------------------------
# Each guest sends a file from its tmpfs (generating bytes on the fly would make the guest's
# CPU set the pace and the writes small).
out=$(GUEST_EXEC_TIMEOUT=60 guest_exec vma "seq 1 900000 | head -c $size > /tmp/send.bin && md5sum < /tmp/send.bin") ||
    fail "cannot write guest A's payload: $out"
[[ $out == *"$md5_a"* ]] || fail "guest A's payload is not the expected one: $out"
out=$(GUEST_EXEC_TIMEOUT=60 guest_exec vmb "seq 900001 1800000 | head -c $size > /tmp/send.bin && md5sum < /tmp/send.bin") ||
    fail "cannot write guest B's payload: $out"
[[ $out == *"$md5_b"* ]] || fail "guest B's payload is not the expected one: $out"

# guest_listen VM PORT: nc -l in the guest, its output in /tmp/recv, its status in /tmp/nc.rc
# (nc's stdin stays open: at EOF on stdin it would shut its sending side).
guest_listen() {
    guest_exec "$1" "rm -f /tmp/recv /tmp/nc.rc; (sleep 150 | (nc -l -p $2 > /tmp/recv 2>/tmp/nc.err; echo \$? > /tmp/nc.rc)) </dev/null >/dev/null 2>&1 &
        i=0; while ! netstat -ltn | grep -q \":$2 \" && [ \$i -lt 50 ]; do usleep 100000; i=\$((i+1)); done; netstat -ltn | grep -q \":$2 \"" >/dev/null ||
        fail "guest $1's listener on port $2 did not start"
}
# guest_received VM: "rc=N size=N md5=HEX" of what the guest's listener got, once nc ended.
guest_received() {
    GUEST_EXEC_TIMEOUT=30 guest_exec "$1" 'i=0; while [ ! -e /tmp/nc.rc ] && [ $i -lt 100 ]; do usleep 100000; i=$((i+1)); done;
        echo "rc=$(cat /tmp/nc.rc 2>/dev/null) size=$(wc -c < /tmp/recv) md5=$(md5sum < /tmp/recv | cut -d" " -f1)";
        kill $(pidof sleep) 2>/dev/null; true'
}
# shellcheck disable=SC2016
CSUM_AWK='{ if (seen[$1]++) { for (i = 2; i <= NF; i++) if (h[$1 "," i] == "InCsumErrors") s += $i }
           else for (i = 2; i <= NF; i++) h[$1 "," i] = $i } END { print s + 0 }'
guest_csum() { guest_exec "$1" "awk '$CSUM_AWK' /proc/net/snmp" | tail -n 1; }

# snapshot PA PB: both ports' counters, retried until two reads agree (nothing in flight).
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
d() { echo $(($(qstat "$2" "$3" "$4") - $(qstat "$1" "$3" "$4"))); }
avg() { (($2 > 0)) && echo $(($1 / $2)) || echo 0; }

sleep 1
snapshot a0 b0
csum_a0=$(guest_csum vma) csum_b0=$(guest_csum vmb)
[[ $csum_a0 =~ ^[0-9]+$ && $csum_b0 =~ ^[0-9]+$ ]] || fail "cannot read the guests' /proc/net/snmp: $csum_a0 / $csum_b0"

# --- A -> B (A's TSO frames, segmented for B) -------------------------------------------------
guest_listen vmb 5003
t=$(date +%s.%N)
out=$(GUEST_EXEC_TIMEOUT=100 guest_exec vma "nc $ip_b 5003 < /tmp/send.bin && echo sent") || fail "A -> B TCP transfer failed: $out"
ab_s=$(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
out=$(guest_received vmb) || fail "cannot check what guest B received: $out"
[[ $out == *"rc=0 size=$size md5=$md5_a"* ]] || fail "A -> B: expected rc=0 size=$size md5=$md5_a, guest B says: $out"
sleep 0.5
snapshot a1 b1

# --- B -> A -----------------------------------------------------------------------------------
guest_listen vma 5004
t=$(date +%s.%N)
out=$(GUEST_EXEC_TIMEOUT=100 guest_exec vmb "nc $ip_a 5004 < /tmp/send.bin && echo sent") || fail "B -> A TCP transfer failed: $out"
ba_s=$(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
out=$(guest_received vma) || fail "cannot check what guest A received: $out"
[[ $out == *"rc=0 size=$size md5=$md5_b"* ]] || fail "B -> A: expected rc=0 size=$size md5=$md5_b, guest A says: $out"
sleep 1
snapshot a2 b2
csum_a1=$(guest_csum vma) csum_b1=$(guest_csum vmb)

# --- checks -----------------------------------------------------------------------------------
no_faults a2 "port vdpa0"
no_faults b2 "port vdpa1"
for p in a b; do
    for q in 0 1; do
        for r in badHeader badOffload; do
            n=$(d "${p}0" "${p}2" $q "drop_$r")
            ((n == 0)) || fail "port $p queue $q dropped $n frames as $r: $(cat "$TMP/stats-${p}2.log")"
        done
    done
done
((csum_b1 == csum_b0)) || fail "guest B counted $((csum_b1 - csum_b0)) checksum errors (InCsumErrors): the device's software checksums are wrong"
((csum_a1 == csum_a0)) || fail "guest A counted $((csum_a1 - csum_a0)) checksum errors (InCsumErrors)"

# A -> B window (a0/b0 to a1/b1): A's TX queue against B's RX queue.
ab_tx=$(d a0 a1 1 packets) ab_txb=$(d a0 a1 1 bytes) ab_lost=$(d a0 a1 1 drop_linkError)
ab_rx=$(d b0 b1 0 packets) ab_rxb=$(d b0 b1 0 bytes)
ab_avg=$(avg "$ab_txb" "$ab_tx")
# B -> A window (a1/b1 to a2/b2).
ba_tx=$(d b1 b2 1 packets) ba_lost=$(d b1 b2 1 drop_linkError) ba_rx=$(d a1 a2 0 packets)
drops="A drops RX $(d a0 a2 0 drops) TX $(d a0 a2 1 drops), B drops RX $(d b0 b2 0 drops) TX $(d b0 b2 1 drops)"
counts="A->B: A TX $ab_tx frames $ab_txb B (avg $ab_avg B, linkError $ab_lost), B RX $ab_rx frames $ab_rxb B; B->A: B TX $ba_tx (linkError $ba_lost), A RX $ba_rx; $drops"
log "$counts"
((ab_tx >= 1)) || fail "port A counted no TX frames during A -> B: $counts"
# B's frames need no segmentation: one for one.
((ba_tx == ba_rx + ba_lost)) || fail "B -> A: B TX $ba_tx != A RX $ba_rx + B's TX linkError $ba_lost: $counts"
((ab_avg > 1514)) || want "A sent no large frames: port A's TX average over A -> B is $ab_avg B (<= 1514; no TSO in guest A)"
((ab_rx > ab_tx - ab_lost)) || want "no segmentation: port B delivered $ab_rx frames for the $((ab_tx - ab_lost)) port A sent over the wire (A TX $ab_tx - linkError $ab_lost)"

stop_qemu vma
stop_qemu vmb
wait_status 15 --port vdpa0 --connection listening
wait_status 15 --port vdpa1 --connection listening
alive vdpad || fail "vdpad exited after QEMU quit"
rate() { awk -v s="$1" -v n="$size" 'BEGIN { printf "%.0f", n / 1024 / s }'; }
summary="$((size / 1024)) KiB each way, md5 ok: A->B ${ab_s}s (~$(rate "$ab_s") KiB/s), B->A ${ba_s}s (~$(rate "$ba_s") KiB/s); $counts; InCsumErrors +0 in both guests; no badHeader/badOffload drops"
if ((${#missing[@]})); then
    msg=$(printf '%s; ' "${missing[@]}")
    fail "offloads not in effect (${#missing[@]} checks): ${msg%; } | the transfers themselves passed: $summary"
fi
pass "A acked [$a_names], B acked [$b_names]; $summary"
