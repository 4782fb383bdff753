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
# shellcheck source=lib/guestnet.sh
source "$PEERS_DIR/lib/guestnet.sh"
peer_init qemu-wire-offload 170
require_guest
command -v jq >/dev/null || fail "no jq: run scripts/install-deps"

ip_a=10.88.0.1 ip_b=10.88.0.2
size=${TCP_BYTES:-2097152}
payloads "$size" "$TMP/a.bin" "$TMP/b.bin"

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
start_wire_guests "$sock_a" "$sock_b" 52:54:00:88:00:01 52:54:00:88:00:02 "$ip_a" "$ip_b"

# --- negotiation ------------------------------------------------------------------------------
read -r a_acked a_offered a_names <<<"$(port_features vdpa0)"
read -r b_acked b_offered b_names <<<"$(port_features vdpa1)"
[[ $a_acked == 0x* && $b_offered == 0x* ]] || fail "cannot read the ports' features from vdpactl status"
log "A acked $a_acked [$a_names] of $a_offered; B acked $b_acked [$b_names] of $b_offered"
a_lacks=() b_has=()
for n in "${OFFLOAD_NAMES[@]}"; do
    (((a_acked >> OFFLOAD_BIT[$n]) & 1)) || a_lacks+=("$n")
    (((b_offered >> OFFLOAD_BIT[$n]) & 1)) && b_has+=("$n")
done
((${#a_lacks[@]} == 0)) || want "port A's guest did not ack ${a_lacks[*]} (acked $a_acked [$a_names], offered $a_offered)"
((${#b_has[@]} == 0)) || want "port B ('${plain_opts}') still offers ${b_has[*]} (offered $b_offered)"
gk=$(guest_exec vma 'ethtool -k eth0') || fail "ethtool -k eth0 in guest A failed: $gk"
want_ethtool_on "$gk" "guest A eth0" tx-checksumming tcp-segmentation-offload

# --- payloads, counters -----------------------------------------------------------------------
# Each guest sends a file from its tmpfs.
guest_payload vma 1 "$size" "$MD5_1"
guest_payload vmb 2 "$size" "$MD5_2"

sleep 1
snapshot_wire a0 b0
csum_a0=$(guest_csum vma) csum_b0=$(guest_csum vmb)
[[ $csum_a0 =~ ^[0-9]+$ && $csum_b0 =~ ^[0-9]+$ ]] || fail "cannot read the guests' /proc/net/snmp: $csum_a0 / $csum_b0"

# --- A -> B (A's TSO frames, segmented for B) -------------------------------------------------
tcp_guest_to_guest vma vmb 5003 "$TMP/a.bin" 100 "nc $ip_b 5003 < /tmp/send.bin"
ab_s=$XFER_S
sleep 0.5
snapshot_wire a1 b1

# --- B -> A -----------------------------------------------------------------------------------
tcp_guest_to_guest vmb vma 5004 "$TMP/b.bin" 100 "nc $ip_a 5004 < /tmp/send.bin"
ba_s=$XFER_S
sleep 1
snapshot_wire a2 b2
csum_a1=$(guest_csum vma) csum_b1=$(guest_csum vmb)

# --- checks -----------------------------------------------------------------------------------
no_faults a2 "port vdpa0"
no_faults b2 "port vdpa1"
for p in a b; do
    for q in 0 1; do
        for r in badHeader badOffload; do
            n=$(qdelta "${p}0" "${p}2" $q "drop_$r")
            ((n == 0)) || fail "port $p queue $q dropped $n frames as $r: $(cat "$TMP/stats-${p}2.log")"
        done
    done
done
((csum_b1 == csum_b0)) || fail "guest B counted $((csum_b1 - csum_b0)) checksum errors (InCsumErrors): the device's software checksums are wrong"
((csum_a1 == csum_a0)) || fail "guest A counted $((csum_a1 - csum_a0)) checksum errors (InCsumErrors)"

# A -> B window (a0/b0 to a1/b1): A's TX queue against B's RX queue.
ab_tx=$(qdelta a0 a1 1 packets) ab_txb=$(qdelta a0 a1 1 bytes) ab_lost=$(qdelta a0 a1 1 drop_linkError)
ab_rx=$(qdelta b0 b1 0 packets) ab_rxb=$(qdelta b0 b1 0 bytes)
ab_avg=$(avg "$ab_txb" "$ab_tx")
# B -> A window (a1/b1 to a2/b2).
ba_tx=$(qdelta b1 b2 1 packets) ba_lost=$(qdelta b1 b2 1 drop_linkError) ba_rx=$(qdelta a1 a2 0 packets)
drops="A drops RX $(qdelta a0 a2 0 drops) TX $(qdelta a0 a2 1 drops), B drops RX $(qdelta b0 b2 0 drops) TX $(qdelta b0 b2 1 drops)"
counts="A->B: A TX $ab_tx frames $ab_txb B (avg $ab_avg B, linkError $ab_lost), B RX $ab_rx frames $ab_rxb B; B->A: B TX $ba_tx (linkError $ba_lost), A RX $ba_rx; $drops"
log "$counts"
((ab_tx >= 1)) || fail "port A counted no TX frames during A -> B: $counts"
# B's frames need no segmentation: one for one.
((ba_tx == ba_rx + ba_lost)) || fail "B -> A: B TX $ba_tx != A RX $ba_rx + B's TX linkError $ba_lost: $counts"
((ab_avg > 1514)) || want "A sent no large frames: port A's TX average over A -> B is $ab_avg B (<= 1514; no TSO in guest A)"
((ab_rx > ab_tx - ab_lost)) || want "no segmentation: port B delivered $ab_rx frames for the $((ab_tx - ab_lost)) port A sent over the wire (A TX $ab_tx - linkError $ab_lost)"

stop_wire_guests
summary="$((size / 1024)) KiB each way, md5 ok: A->B ${ab_s}s (~$(kib_rate "$size" "$ab_s") KiB/s), B->A ${ba_s}s (~$(kib_rate "$size" "$ba_s") KiB/s); $counts; InCsumErrors +0 in both guests; no badHeader/badOffload drops"
offloads_verdict "$summary"
pass "A acked [$a_names], B acked [$b_names]; $summary"
