#!/usr/bin/env bash
# Live migration between two vdpad ports whose offered features were restricted differently to
# a common set before the VMs started, and a destination that offers too little.
#
# Needs the port options `features=NAME+NAME+...` (names as vdpad's describeFeatures prints
# them) and `offloads=on|off`. The test first asks this vdpad whether it accepts them (a
# --port with them on a control path that cannot exist: a parse error names the option) and
# fails with "features= not supported by this vdpad" if not: it never skips.
#
# One run:
#   1. before any VM: source vdpad, port src with `offloads=off` (link=source,
#      XMIG_FRAME_SIZE-byte frames at XMIG_RATE/s, journal on), which must offer no offload
#      bit; destination vdpad (a second daemon) with two ports: dst with `features=` listing
#      exactly the virtio features src offers (vhost-user's own bits left out: the same set
#      plus nothing else), and narrow with the same list minus EVENT_IDX; dst must offer
#      exactly that set (besides vhost-user's bits), narrow the same without EVENT_IDX;
#   2. the source guest boots on src, receives, and pings a neighbour (guest TX, eaten by the
#      link); it must have acked EVENT_IDX;
#   3. negative: a destination QEMU on narrow, `migrate` with the return-path capability on
#      (so the source learns that the destination failed): the destination QEMU must refuse
#      the device state with QEMU's own "Features 0x... unsupported. Allowed features: 0x..."
#      and exit, the refused bit being EVENT_IDX and nothing else; the source reports
#      "failed" and runs again; then the destination vdpad is still up, narrow listens
#      again, and the source port still serves the guest (its RX ring direct again, packets
#      and the guest's rx_packets/tx_packets grow, no fault);
#   4. positive: a destination QEMU on dst (return-path off again, QEMU's defaults as in
#      qemu-migration), migrate until completed; the RAM-file oracle as in qemu-migration
#      (journal check, no differing byte in a used ring or device range, no frame payload lost
#      outside the journal; rings and bases from QEMU's `info virtio-queue-status` on the
#      stopped source); the destination continues: dst connected with both rings started, no
#      fault, it acked what the guest acked on src (always judged); its RX packets and the
#      guest's counters grow, the guest answers (judged when QEMU lost no page of its own,
#      reported otherwise; see /work/shared/TESTBED.md).
#
# Environment: XMIG_RATE (default 100), XMIG_FRAME_SIZE (default 1400), XMIG_PING_INTERVAL
# (default 0.01), XMIG_PING_SIZE (default 512), XMIG_NARROW_DROP (the feature the narrow port
# leaves out, default EVENT_IDX), XMIG_STRICT_DEST=1 (fail when QEMU lost pages, so that the
# destination was not judged), MIGRATION_KEEP_RAM=1 with VDPA_KEEP_TMP=1.
set -uo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# shellcheck source=lib/xmig.sh
source "$PEERS_DIR/lib/xmig.sh"    # FSIZE, PING_INTERVAL

RATE=${XMIG_RATE:-100}
PING_SIZE=${XMIG_PING_SIZE:-512}
DROP=${XMIG_NARROW_DROP:-EVENT_IDX}
OFFLOAD_BITS=$((0x7f83))            # CSUM, GUEST_CSUM, GUEST_/HOST_ TSO4, TSO6, ECN, UFO
VHOST_BITS=$(((1 << 26) | (1 << 30)))  # LOG_ALL, PROTOCOL_FEATURES: vhost-user's own

xm_init qemu-migration-features 200

# --- does this vdpad take features= and offloads=? -------------------------------------------
# A port on a path under a regular file: option parsing comes first (a usage error, status 64,
# naming the option), then vdpad fails to create its control socket.
probe_option() {
    local opt=$1 out rc=0
    : >"$TMP/not-a-dir"
    out=$(timeout 10 "$VDPAD" --control "$TMP/not-a-dir/control.sock" \
        --port "socket=$TMP/not-a-dir/probe.sock,$opt" 2>&1) || rc=$?
    if grep -q "option '${opt%%=*}=" <<<"$out" || grep -qi "unknown option '${opt%%=*}'" <<<"$out"; then
        fail "${opt%%=*}= not supported by this vdpad ($VDPAD): $(head -n 1 <<<"$out")"
    fi
    ((rc != 64)) || fail "this vdpad rejects --port ...,$opt: $(head -n 1 <<<"$out")"
    ((rc != 0 && rc != 124)) || fail "probe of $opt: vdpad did not fail on an impossible control path (status $rc): $(head -n 2 <<<"$out" | tr '\n' ' ')"
}
probe_option "features=VERSION_1+MRG_RXBUF"
probe_option "offloads=off"

SCTL=$TMP/src.ctl DCTL=$TMP/dst.ctl
t0=$SECONDS
# --- 1. both daemons, before any VM -----------------------------------------------------------
echo "--- $TEST_NAME: source port offloads=off (link=source $RATE frames/s of $FSIZE B)"
xm_vdpad vsrc "$SCTL" "VDPAD_TEST_JOURNAL=$TMP/src.journal" -- \
    "socket=$TMP/src.sock,id=src,link=source:size=$FSIZE:rate=$RATE,mac=$XM_MAC,offloads=off"
src_offered=$(xm_status "$SCTL" src .features.offered)
[[ $src_offered == 0x* ]] || fail "no offered features in the source port's status: '$src_offered'"
((src_offered & OFFLOAD_BITS)) && fail "the source port (offloads=off) offers offload bits: $(xm_names "$(printf '0x%x' $((src_offered & OFFLOAD_BITS)))")"
say "src offers $src_offered = $(xm_names "$src_offered")"
virtio_offered=$((src_offered & ~VHOST_BITS))
LIST=$(xm_names "$(printf '0x%x' "$virtio_offered")")
[[ +$LIST+ == *+$DROP+* ]] || fail "the source port does not offer $DROP, so a port without it is no negative test (XMIG_NARROW_DROP)"
NARROW=$(sed -E "s/(^|\+)$DROP(\+|$)/\1/; s/\+$//" <<<"$LIST")
echo "--- $TEST_NAME: destination ports dst features=$LIST, narrow features=$NARROW"
xm_vdpad vdst "$DCTL" -- \
    "socket=$TMP/dst.sock,id=dst,link=source:size=$FSIZE:rate=$RATE,mac=$XM_MAC,features=$LIST" \
    "socket=$TMP/narrow.sock,id=narrow,link=source:size=$FSIZE:rate=$RATE,mac=$XM_MAC,features=$NARROW"
dst_offered=$(xm_status "$DCTL" dst .features.offered)
narrow_offered=$(xm_status "$DCTL" narrow .features.offered)
say "dst offers $dst_offered = $(xm_names "$dst_offered"); narrow offers $narrow_offered = $(xm_names "$narrow_offered")"
(((dst_offered & ~VHOST_BITS) == virtio_offered)) ||
    fail "dst (features=$LIST) offers $(xm_names "$(printf '0x%x' $((dst_offered & ~VHOST_BITS)))"), not exactly the listed set"
drop_bit=$((virtio_offered & ~narrow_offered))
if (((narrow_offered & ~VHOST_BITS) != (virtio_offered & ~drop_bit))) || [[ $(xm_names "$(printf '0x%x' "$drop_bit")") != "$DROP" ]]; then
    fail "narrow (features=$NARROW) offers $(xm_names "$(printf '0x%x' $((narrow_offered & ~VHOST_BITS)))"), not the listed set"
fi

# --- 2. the source guest -----------------------------------------------------------------------
start_qemu src --socket "$TMP/src.sock" --connect --mac "$XM_MAC" --ip "$XM_IP"
SRC_SHM=$SHM
wait_guest src 90
wait_until 30 "the source RX ring to run direct with packets" eval "[[ \$(xm_rxq '$SCTL' src) =~ ^direct\ [1-9] ]]"
xm_guest_ping src "$PING_INTERVAL" "$PING_SIZE"
acked=$(xm_status "$SCTL" src .features.acked)
virtio_acked=$((acked & ~VHOST_BITS))
say "the guest acked on src: $(xm_status "$SCTL" src .features.ackedNames)"
((virtio_acked & drop_bit)) || fail "the guest did not ack $DROP on src, so narrow is no negative test (XMIG_NARROW_DROP)"

# --- 3. negative: the destination offers less than the guest acked ----------------------------
echo "--- $TEST_NAME: negative: migrate to a QEMU on narrow (no $DROP)"
port=$(free_port)
start_qemu dst-narrow --socket "$TMP/narrow.sock" --connect --mac "$XM_MAC" --ip "$XM_IP" --incoming "tcp:127.0.0.1:$port"
NARROW_SHM=$SHM
xm_wait_incoming dst-narrow
wait_until 20 "the narrow destination QEMU to connect to vdpad" eval "[[ \$(xm_status '$DCTL' narrow .connection) == connected ]]"
reply=$(monitor src "migrate_set_capability return-path on" 2>&1)
[[ -z ${reply//[[:space:]]/} ]] || fail "migrate_set_capability return-path on: $reply"
sleep 1
xm_migrate negative src dst-narrow "$port" 60
say "negative: source: $(grep -a '^Migration status' <<<"$MIG_INFO")"
[[ $MIG_STATUS == failed ]] || fail "negative: the migration to a destination without $DROP ended '$MIG_STATUS', not failed: $(tr '\n' ' ' <<<"$MIG_INFO" | head -c 400)"
wait_until 15 "the narrow destination QEMU to exit" eval '! alive dst-narrow'
err=$(xm_load_error dst-narrow)
say "negative: destination QEMU: $err"
why=$(xm_explain_features dst-narrow) || fail "negative: the destination QEMU did not say which features it refused: '$err'"
say "negative: $why"
[[ $why == *"missing: $DROP" ]] || fail "negative: QEMU refused other bits than $DROP: $why"
alive vdst || fail "negative: the destination vdpad exited when its QEMU refused the migration"
alive vsrc || fail "negative: the source vdpad exited"
wait_until 15 "narrow to listen again" eval "[[ \$(xm_status '$DCTL' narrow .connection) == listening ]]"
wait_until 20 "the source VM to run again" eval "[[ \$(monitor src 'info status' 2>/dev/null) == *running* ]]"
wait_until 20 "the source RX ring to be direct again" eval "[[ \$(xm_rxq '$SCTL' src) == direct* ]]"
p1=$(xm_rxq "$SCTL" src); g1=$(xm_guest_alive src)
sleep 2
p2=$(xm_rxq "$SCTL" src); g2=$(xm_guest_alive src)
read -r -a P1 <<<"$p1"; read -r -a P2 <<<"$p2"; read -r -a G1 <<<"$g1"; read -r -a G2 <<<"$g2"
say "negative: source RX ring [$p1] -> [$p2]; guest rx tx [$g1] -> [$g2]"
[[ ${P2[0]} == direct && ${P2[1]:-0} -gt ${P1[1]:-0} && ${P2[6]:-1} == 0 ]] ||
    fail "negative: the source port does not serve the guest after the failed migration: [$p1] -> [$p2]"
[[ ${G1[0]:-x} =~ ^[0-9]+$ && ${G2[0]:-x} =~ ^[0-9]+$ && ${G2[0]} -gt ${G1[0]} && ${G2[1]} -gt ${G1[1]} ]] ||
    fail "negative: the source guest's counters do not grow after the failed migration ('$g1' -> '$g2')"
[[ $(xm_faults "$DCTL" narrow) == 0 ]] || fail "negative: narrow has device faults"
rm -f "$NARROW_SHM"
reply=$(monitor src "migrate_set_capability return-path off" 2>&1)
[[ -z ${reply//[[:space:]]/} ]] || fail "migrate_set_capability return-path off: $reply"

# --- 4. positive: to dst ------------------------------------------------------------------------
echo "--- $TEST_NAME: positive: migrate to a QEMU on dst (features=$LIST)"
port=$(free_port)
start_qemu dst --socket "$TMP/dst.sock" --connect --mac "$XM_MAC" --ip "$XM_IP" --incoming "tcp:127.0.0.1:$port"
DST_SHM=$SHM
xm_wait_incoming dst
wait_until 20 "the destination QEMU to connect to dst" eval "[[ \$(xm_status '$DCTL' dst .connection) == connected ]]"
sleep 1
before=$(xm_rxq "$SCTL" src)
xm_migrate_ok positive src dst "$port" 60
after=$(xm_rxq "$SCTL" src)
read -r -a A <<<"$after"
say "positive: migration completed: total $MIG_TOTAL ms, downtime $MIG_DOWNTIME ms; source RX ring before [$before] after [$after] (mode packets relayed pagesMarked switchovers gapMicros faults)"
xm_dest_loaded positive dst
xm_rings positive src "$TMP/positive.rings"
xm_oracle positive "$SRC_SHM" "$DST_SHM" "$TMP/positive.rings" --journal "$TMP/src.journal"
xm_journal_checks positive
# Two migrations: to the relay and back after the failed one, to the relay again now.
[[ ${A[4]:-0} -ge 2 && ${A[2]:-0} -gt 0 && ${A[6]:-1} == 0 ]] ||
    fail "positive: the source RX ring did not go through the relay twice cleanly: [$after] (want switchovers >= 2, relayed > 0, faults 0)"
qloss=$((o_pages_neither + o_pages_driver + o_pages_superseded))

monitor dst cont >/dev/null 2>&1
wait_until 15 "dst to start both rings" eval "[[ \$(xm_status '$DCTL' dst '[.queues[] | select(.index < 2) | .started] | all') == true ]]"
dst_acked=$(xm_status "$DCTL" dst .features.acked)
say "positive: dst acked $(xm_status "$DCTL" dst .features.ackedNames)"
(((dst_acked & ~VHOST_BITS) == virtio_acked)) ||
    fail "positive: dst acked $(xm_names "$dst_acked"), src had $(xm_names "$acked")"
sleep 1
d1=$(xm_rxq "$DCTL" dst); g1=$(xm_guest_alive dst)
sleep 2
d2=$(xm_rxq "$DCTL" dst); g2=$(xm_guest_alive dst)
[[ $(xm_faults "$DCTL" dst) == 0 ]] || fail "positive: dst has device faults: [$d2]"
read -r -a D1 <<<"$d1"; read -r -a D2 <<<"$d2"
DEST_WHY=()
[[ ${D2[0]:-} == direct && ${D2[1]:-0} -gt ${D1[1]:-0} ]] || DEST_WHY+=("dst RX did not grow ([$d1] -> [$d2])")
dest_guest_check dst "$g1" "$g2"
say "positive: dst RX ring [$d1] -> [$d2]; guest rx tx [$g1] -> [$g2]"
dest_judge positive $((qloss > 0)) "no QEMU losses" "QEMU lost guest-CPU writes in $qloss pages (not device writes)"
if ((qloss > 0)); then
    [[ $XM_STRICT_DEST == 1 ]] && fail "QEMU lost pages: the destination was not judged (XMIG_STRICT_DEST=1)"
    judged="not judged (QEMU lost $qloss pages)"
else
    judged="judged: keeps working"
fi
stop_qemu dst; stop_qemu src
pass "src offloads=off -> dst features=$LIST: migrated ($MIG_TOTAL ms, journal ok, pages differing $o_pages), destination $judged; narrow (no $DROP): QEMU refused the load, vdpad up, source served again; $((SECONDS - t0)) s"
