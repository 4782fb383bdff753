#!/usr/bin/env bash
# Checksum and segmentation offloads on a link=tap port (issue 10). vdpad's port opens its
# TAP (vdpatoPID) with IFF_VNET_HDR and sets TUNSETOFFLOAD from the offloads the guest
# negotiated; the TAP goes into a namespace of the test (10.86.0.1/24), the QEMU guest
# (10.86.0.2/24) runs Debian's 6.1 virtio_net. Checked:
#   - negotiation: the port's acked features (vdpactl status, the authority) hold CSUM,
#     GUEST_CSUM, HOST_TSO4/6, HOST_ECN, HOST_UFO, GUEST_TSO4/6, GUEST_ECN, GUEST_UFO; the
#     guest's `ethtool -k eth0` shows tx checksumming, TSO and rx checksumming on; in the
#     namespace the TAP has vnet_hdr on (`ip -d link`) and TSO and tx checksumming on
#     (`ethtool -k`: what TUNSETOFFLOAD turned on for the guest's GUEST_* features);
#   - guest -> namespace (TSO): TCP_BYTES of known bytes (md5 and length checked on arrival);
#     frames longer than an MTU-sized frame (1514 B) entered the TAP (an AF_PACKET capture in
#     the namespace, lib/framesizes.py, and the TAP's rx_bytes/rx_packets above 1514 on
#     average), the guest's eth0 sent them (its tx average above 1514);
#   - namespace -> guest (GUEST_TSO): TCP_BYTES of other known bytes (md5 and length checked
#     in the guest); the namespace's stack handed the TAP frames longer than 1514 B (capture),
#     and the guest received frames longer than 1514 B (its eth0 rx average above 1514);
#   - checksums: no InCsumErrors growth in /proc/net/snmp, in the namespace nor in the guest
#     (a bad or missing checksum would be dropped there and counted);
#   - the device: no faults, no TX drops, no badHeader/badOffload drops anywhere; every
#     frame the guest sent went into the TAP whole (TAP rx packets = device TX packets), every
#     frame read from the TAP was delivered or counted (TAP tx = device RX + RX drops).
# A failed transfer (md5, length) or counter mismatch fails at once. The offload checks are
# all made and reported together, so a tree without offloads fails with the list of what is
# missing after the transfers have shown the data path itself works.
#
# Environment: TCP_BYTES (default 2097152 per direction).
set -uo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# shellcheck source=lib/guestnet.sh
source "$PEERS_DIR/lib/guestnet.sh"
peer_init qemu-tap-offload 170
require_guest
[[ -c /dev/net/tun ]] || fail "no /dev/net/tun"
command -v ip >/dev/null || fail "no ip command (iproute2)"
command -v ethtool >/dev/null || fail "no ethtool on the host: run scripts/install-deps"
command -v jq >/dev/null || fail "no jq: run scripts/install-deps"

FRAMES_PY=$PEERS_DIR/lib/framesizes.py
ifname=vdpato$$
ifname=${ifname:0:15}
ns=vdpa-peer-tapo-$$
host_ip=10.86.0.1 guest_ip=10.86.0.2

size=${TCP_BYTES:-2097152}
payloads "$size" "$TMP/to-host.bin" "$TMP/to-guest.bin"

sock=$TMP/vdpa0.sock
start_tap_port "$sock" "$ifname"
tap_into_ns "$ifname" "$ns" "$host_ip/24"

start_qemu vm1 --socket "$sock" --connect --queues 1 --mac 52:54:00:86:00:02 --ip "$guest_ip/24"
wait_guest vm1 60
wait_status 30 --port vdpa0 --connection connected --feature-bit 32 --ring 0 --ring 1
guests_no_ipv6 vm1

# --- negotiation ------------------------------------------------------------------------------
# The port must offer the offload bits (OFFLOAD_NAMES) and the 6.1 guest ack them.
feat=$(port_features vdpa0) || fail "cannot read the port's features from vdpactl status"
read -r acked offered acked_names <<<"$feat"
[[ $acked == 0x* && $offered == 0x* ]] || fail "unexpected features in vdpactl status: $feat"
not_offered=() not_acked=()
for n in "${OFFLOAD_NAMES[@]}"; do
    (((offered >> OFFLOAD_BIT[$n]) & 1)) || not_offered+=("$n")
    (((acked >> OFFLOAD_BIT[$n]) & 1)) || not_acked+=("$n")
done
log "features acked $acked [$acked_names] of $offered"
((${#not_offered[@]} == 0)) || want "the port does not offer ${not_offered[*]} (offered $offered)"
((${#not_acked[@]} == 0)) || want "the guest did not ack ${not_acked[*]} (acked $acked [$acked_names])"

# What the guest's driver made of them.
gk=$(guest_exec vm1 'ethtool -k eth0') || fail "ethtool -k eth0 in the guest failed: $gk"
printf '%s\n' "$gk" > "$TMP/guest-ethtool-k.log"
# (rx-checksumming is on in 6.1's virtio_net whatever was negotiated; rx-gro-hw comes with
# GUEST_TSO4/6, the others with CSUM and HOST_TSO4/6.)
want_ethtool_on "$gk" "guest eth0" tx-checksumming tcp-segmentation-offload rx-gro-hw

# The TAP: vnet_hdr (IFF_VNET_HDR) and the offloads TUNSETOFFLOAD turned on.
tapd=$(nsx ip -d link show dev "$ifname") || fail "ip -d link show $ifname failed"
grep -q 'vnet_hdr on' <<<"$tapd" || want "the TAP was not opened with IFF_VNET_HDR (ip -d link: $(grep -o 'tun type tap.*vnet_hdr [a-z]*' <<<"$tapd"))"
tk=$(nsx ethtool -k "$ifname") || fail "ethtool -k $ifname failed"
printf '%s\n' "$tk" > "$TMP/tap-ethtool-k.log"
want_ethtool_on "$tk" "TAP $ifname (TUNSETOFFLOAD)" tx-checksumming tcp-segmentation-offload

# --- counters ---------------------------------------------------------------------------------
# ns_csum: InCsumErrors in the namespace (guest_csum: in a guest).
ns_csum() { nsx awk "$CSUM_AWK" /proc/net/snmp; }
# guest_eth: "rx_packets rx_bytes tx_packets tx_bytes" of the guest's eth0.
guest_eth() {
    # shellcheck disable=SC2016
    guest_exec vm1 'cd /sys/class/net/eth0/statistics && echo $(cat rx_packets rx_bytes tx_packets tx_bytes)' | tail -n 1
}
# tap_ctr: "rx_packets rx_bytes tx_packets tx_bytes tx_dropped" of the TAP (rx: written by the
# device, i.e. guest TX; tx: read by the device, i.e. guest RX).
tap_ctr() {
    local d=/sys/class/net/$ifname/statistics
    nsx cat "$d/rx_packets" "$d/rx_bytes" "$d/tx_packets" "$d/tx_bytes" "$d/tx_dropped" | tr '\n' ' '
}

guest_payload vm1 1 "$size" "$MD5_1"
sleep 1
load_stats vdpa0 b0
read -r t0_rxp t0_rxb t0_txp t0_txb t0_txd <<<"$(tap_ctr)"
read -r _ _ g0_txp g0_txb <<<"$(guest_eth)"
[[ -n ${g0_txb:-} ]] || fail "cannot read the guest's eth0 counters"
ns_csum0=$(ns_csum) guest_csum0=$(guest_csum vm1)
[[ $guest_csum0 =~ ^[0-9]+$ ]] || fail "cannot read the guest's /proc/net/snmp: $guest_csum0"

spawn capture ip netns exec "$ns" python3 "$FRAMES_PY" "$ifname"
wait_for_log "$TMP/capture.log" '^capturing' 10 capture

# --- guest -> namespace (TSO) ----------------------------------------------------------------
# The guest sends the file guest_payload wrote into its tmpfs.
tcp_guest_to_ns vm1 5001 "$TMP/to-host.bin" 100 "nc $host_ip 5001 < /tmp/send.bin"
up_s=$XFER_S
sleep 0.5
read -r t1_rxp t1_rxb t1_txp t1_txb _ <<<"$(tap_ctr)"
read -r g1_rxp g1_rxb g1_txp g1_txb <<<"$(guest_eth)"
load_stats vdpa0 m

# --- namespace -> guest (GUEST_TSO) -----------------------------------------------------------
tcp_ns_to_guest vm1 "$guest_ip" 5002 "$TMP/to-guest.bin" 100
down_s=$XFER_S

sleep 1
read -r t2_rxp _ t2_txp t2_txb t2_txd <<<"$(tap_ctr)"
read -r g2_rxp g2_rxb _ _ <<<"$(guest_eth)"
load_stats vdpa0 s
ns_csum1=$(ns_csum) guest_csum1=$(guest_csum vm1)
stop capture TERM 5 || true
read -r _ _ cin_n _ _ _ cin_max _ cin_over <<<"$(grep '^in ' "$TMP/capture.log")"
read -r _ _ cout_n _ _ _ cout_max _ cout_over <<<"$(grep '^out ' "$TMP/capture.log")"
[[ -n ${cin_over:-} && -n ${cout_over:-} ]] || fail "the frame capture in the namespace gave no summary: $(tail -n 3 "$TMP/capture.log")"

# --- checks -----------------------------------------------------------------------------------
no_faults s
# Counters of the device against the TAP's, over both transfers (from b0 to s).
dev_rx=$(qdelta b0 s 0 packets) dev_tx=$(qdelta b0 s 1 packets) dev_rx_drops=$(qdelta b0 s 0 drops) dev_tx_drops=$(qdelta b0 s 1 drops)
tap_rx=$((t2_rxp - t0_rxp)) tap_tx=$((t2_txp - t0_txp))
counts="device RX $dev_rx (drops $dev_rx_drops) TX $dev_tx (drops $dev_tx_drops); TAP rx $tap_rx tx $tap_tx tx_dropped $((t2_txd - t0_txd))"
log "$counts"
for q in 0 1; do
    for r in badHeader badOffload; do
        (($(qdelta b0 s $q "drop_$r") == 0)) || fail "queue $q dropped $(qdelta b0 s $q "drop_$r") frames as $r: $(cat "$TMP/stats-s.log")"
    done
done
((dev_tx_drops == 0)) || fail "the device dropped TX frames: $(cat "$TMP/stats-s.log")"
((tap_rx == dev_tx)) || fail "TAP rx_packets != device TX packets (a frame the guest sent did not go into the TAP whole): $counts"
((tap_tx == dev_rx + dev_rx_drops)) || fail "TAP tx_packets != device RX packets + RX drops: $counts"

# Checksums: nothing dropped for a bad checksum on either end.
((ns_csum1 == ns_csum0)) || fail "the namespace counted $((ns_csum1 - ns_csum0)) checksum errors (InCsumErrors in /proc/net/snmp)"
((guest_csum1 == guest_csum0)) || fail "the guest counted $((guest_csum1 - guest_csum0)) checksum errors (InCsumErrors in /proc/net/snmp)"

# Frame sizes. Guest -> namespace (first transfer): TAP rx, guest tx, device TX.
up_tap_avg=$(avg $((t1_rxb - t0_rxb)) $((t1_rxp - t0_rxp)))
up_guest_avg=$(avg $((g1_txb - g0_txb)) $((g1_txp - g0_txp)))
up_dev_avg=$(avg "$(qdelta b0 m 1 bytes)" "$(qdelta b0 m 1 packets)")
# Namespace -> guest (second transfer): TAP tx, guest rx, device RX.
down_tap_avg=$(avg $((t2_txb - t1_txb)) $((t2_txp - t1_txp)))
down_guest_avg=$(avg $((g2_rxb - g1_rxb)) $((g2_rxp - g1_rxp)))
down_dev_avg=$(avg "$(qdelta m s 0 bytes)" "$(qdelta m s 0 packets)")
sizes="guest->ns: TAP rx avg $up_tap_avg B, guest eth0 tx avg $up_guest_avg B, device TX avg $up_dev_avg B, captured in: $cin_n TCP frames, max $cin_max B, $cin_over over 1514 B; ns->guest: TAP tx avg $down_tap_avg B, guest eth0 rx avg $down_guest_avg B, device RX avg $down_dev_avg B, captured out: $cout_n TCP frames, max $cout_max B, $cout_over over 1514 B"
log "$sizes"
((cin_n > 0 && cout_n > 0)) || fail "the capture saw no TCP frames on the TAP ($sizes)"
# Guest -> namespace: the guest sends from a file, the namespace reads at once, so with TSO
# most frames are large (QEMU's own TAP backend: about 11 KB per frame on average here).
((cin_over > 0)) || want "no TSO: no frame longer than 1514 B entered the TAP from the guest (largest $cin_max B)"
((up_tap_avg > 1514)) || want "no TSO: the TAP's rx average over the guest's upload is $up_tap_avg B (<= 1514)"
# Namespace -> guest: the guest's nc reads slowly (TCG), so the receive window keeps most
# frames at one MSS even with GSO (QEMU's backend: 46 of about 1000 frames were larger). The
# check is that large frames came out of the TAP and that the device delivered what it read
# whole: its RX bytes are the TAP's tx bytes (RX packets = TAP tx packets is checked above;
# segmenting them would have made more frames). The guest's rx average is reported only.
((cout_over > 0)) || want "no GSO towards the guest: the namespace handed the TAP no frame longer than 1514 B (largest $cout_max B; TUNSETOFFLOAD not in effect)"
if ((dev_rx_drops == 0)); then
    (($(qdelta b0 s 0 bytes) == t2_txb - t0_txb)) ||
        fail "device RX bytes $(qdelta b0 s 0 bytes) != TAP tx bytes $((t2_txb - t0_txb)) with no RX drops: $counts"
fi

stop_qemu vm1
wait_status 15 --port vdpa0 --connection listening
alive vdpad || fail "vdpad exited after QEMU quit"
summary="$((size / 1024)) KiB each way, md5 ok: guest->ns ${up_s}s (~$(kib_rate "$size" "$up_s") KiB/s), ns->guest ${down_s}s (~$(kib_rate "$size" "$down_s") KiB/s); $sizes; $counts; InCsumErrors +0 both ends"
offloads_verdict "$summary"
pass "acked [$acked_names]; $summary"
