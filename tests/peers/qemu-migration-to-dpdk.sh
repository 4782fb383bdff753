#!/usr/bin/env bash
# Cross-backend live migration, vdpad to DPDK: a QEMU 7.2 (TCG, thread=single) guest on a
# vdpad port (link=source streams frames into it; the journal of the relay's device writes
# is on) migrates to a QEMU whose netdev is DPDK 22.11's vhost PMD (testpmd --vdev
# net_vhost0, icmpecho mode: it answers the guest's pings).
#
# Each run:
#   1. source vdpad (link=source, XMIG_FRAME_SIZE-byte frames at XMIG_RATE/s, mac = the
#      guest's, VDPAD_TEST_JOURNAL on) and QEMU; the guest receives, and pings a neighbour
#      (static ARP entry) every XMIG_PING_INTERVAL s (guest TX, eaten by the link's sink);
#   2. the destination: testpmd (vhost PMD) and QEMU with -incoming ... -S;
#   3. HMP `migrate -d`, `info migrate` until completed (the source RX ring must go through
#      vdpad's relay); the destination QEMU must have loaded the state;
#   4. the RAM-file oracle, as in qemu-migration (vdpad is the source backend, so it applies
#      in full): every journal line marked, every journaled device range the source still
#      holds identical on the destination, used indexes equal to the bases GET_VRING_BASE
#      returned (from QEMU's `info virtio-queue-status` on the stopped source, which also
#      locates the rings), no differing byte in a used ring or a device range, no frame
#      payload lost outside the journal; every other differing page is QEMU 7.2's own loss
#      of guest-CPU writes under TCG (/work/shared/TESTBED.md): reported, never hidden;
#   5. the destination continues on DPDK: always judged: DPDK's vhost PMD starts the device
#      ("virtio is now ready for processing" in testpmd's log after cont); the features it
#      negotiated are printed;
#   6. judged on runs without QEMU's own losses (reported on the others): the guest's pings
#      come back (its running ping's replies raise rx_packets, and `ping -c` from the guest
#      gets replies: traffic out of the guest comes back), DPDK's port counters grow, the
#      guest answers on its command channel, no panic on its console.
#
# Environment: XMIG_RUNS (default 2), XMIG_DPDK_VDEV_ARGS (more net_vhost0 options, e.g.
# ",tso=1"), XMIG_VDPAD_PORT_OPTS (more options for the source vdpad port, e.g.
# ",features=..."), XMIG_RATE (default 100), XMIG_FRAME_SIZE (default
# 1400: 1400-byte frames at 100/s make a missing mark show in the RAM files, see
# qemu-migration.sh), XMIG_PING_INTERVAL (default 0.01), XMIG_PING_SIZE (default 512),
# XMIG_SOURCE_ENV (more VAR=VALUE words for the source vdpad, e.g.
# VDPAD_TEST_SKIP_BUFFER_MARKING=1: the run must then fail), XMIG_STRICT_DEST=1 (fail when
# QEMU lost pages in every run), MIGRATION_KEEP_RAM=1 with VDPA_KEEP_TMP=1 (keep the RAM files).
set -uo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# shellcheck source=lib/xmig.sh
source "$PEERS_DIR/lib/xmig.sh"    # FSIZE, PING_INTERVAL

RUNS=${XMIG_RUNS:-2}
RATE=${XMIG_RATE:-100}
PING_SIZE=${XMIG_PING_SIZE:-512}
read -r -a SOURCE_ENV <<<"${XMIG_SOURCE_ENV:-}"

xm_init qemu-migration-to-dpdk $((40 + 70 * RUNS)) testpmd
XM_LOAD_HINT="DPDK's vhost PMD offers HOST_TSO4/6 only with tso=1 (XMIG_DPDK_VDEV_ARGS=,tso=1); or restrict the vdpad port to what DPDK offers before the VM starts (XMIG_VDPAD_PORT_OPTS=,features=...)"

run() {
    local tag=$1 t0=$SECONDS
    echo "--- $TEST_NAME: $tag (vdpad link=source $RATE frames/s of $FSIZE B, guest pings every ${PING_INTERVAL}s -> DPDK vhost PMD icmpecho)"
    local sctl=$TMP/$tag-src.ctl ssock=$TMP/$tag-src.sock src=src-$tag dst=dst-$tag dpdk=dpdk-$tag
    xm_vdpad "vsrc-$tag" "$sctl" "VDPAD_TEST_JOURNAL=$TMP/$tag.journal" "${SOURCE_ENV[@]}" -- \
        "socket=$ssock,id=src,link=source:size=$FSIZE:rate=$RATE,mac=$XM_MAC${XMIG_VDPAD_PORT_OPTS:-}"
    start_qemu "$src" --socket "$ssock" --connect --mac "$XM_MAC" --ip "$XM_IP"
    local src_shm=$SHM
    wait_guest "$src" 90
    wait_until 30 "the source RX ring to run direct with packets" \
        eval "[[ \$(xm_rxq '$sctl' src) =~ ^direct\ [1-9] ]]"
    xm_guest_ping "$src" "$PING_INTERVAL" "$PING_SIZE"
    say "$tag: the source vdpad port acked: $(xm_status "$sctl" src .features.ackedNames)"

    local dsock=$TMP/$tag-dpdk.sock
    xm_dpdk "$dpdk" "$dsock"
    local port; port=$(free_port)
    start_qemu "$dst" --socket "$dsock" --connect --mac "$XM_MAC" --ip "$XM_IP" --incoming "tcp:127.0.0.1:$port"
    local dst_shm=$SHM
    xm_wait_incoming "$dst"
    wait_for_log "$TMP/$dpdk.log" 'new vhost user connection' 20 "$dpdk"
    local gfeat hfeat missing=() f
    gfeat=$(xm_qemu_features "$src" Guest) hfeat=$(xm_qemu_features "$dst" Host)
    for f in ${gfeat//+/ }; do [[ +$hfeat+ == *+$f+* ]] || missing+=("$f"); done
    ((${#missing[@]})) && say "$tag: acked by the guest but not allowed by the destination (DPDK): ${missing[*]}"

    sleep 1
    local before; before=$(xm_rxq "$sctl" src)
    local saw_relay=0
    # shellcheck disable=SC2016  # eval'd by xm_migrate
    xm_migrate_ok "$tag" "$src" "$dst" "$port" 60 '[[ $(xm_rxq "'"$sctl"'" src) == relay* ]] && saw_relay=1'
    local after; after=$(xm_rxq "$sctl" src)
    local -a A; read -r -a A <<<"$after"
    say "$tag: migration completed: total $MIG_TOTAL ms, downtime $MIG_DOWNTIME ms; source RX ring before [$before] after [$after] (mode packets relayed pagesMarked switchovers gapMicros faults)"
    xm_dest_loaded "$tag" "$dst"

    xm_rings "$tag" "$src" "$TMP/$tag.rings"
    xm_oracle "$tag" "$src_shm" "$dst_shm" "$TMP/$tag.rings" --journal "$TMP/$tag.journal"
    xm_journal_checks "$tag"
    [[ ${A[4]:-0} -ge 1 && ${A[2]:-0} -gt 0 && ${A[3]:-0} -gt 0 && ${A[6]:-1} == 0 ]] ||
        fail "$tag: the source RX ring did not go through the relay cleanly: [$after] (want switchovers >= 1, relayed > 0, pagesMarked > 0, faults 0)"
    ((saw_relay)) || say "$tag: note: mode \"relay\" was not caught by the poll (the counters show the relay ran)"
    local loss=0 qloss=$((o_pages_neither + o_pages_driver + o_pages_superseded))
    ((qloss > 0)) && { loss=1; QEMU_LOSS_RUNS=$((QEMU_LOSS_RUNS + 1)); }

    # The destination runs on DPDK.
    local mark; mark=$(wc -l <"$TMP/$dpdk.log")
    local dc0; dc0=$(xm_dpdk_ctr "$dpdk")
    monitor "$dst" cont >/dev/null 2>&1
    local deadline=$((SECONDS + 15))
    until tail -n "+$((mark + 1))" "$TMP/$dpdk.log" | grep -aq 'virtio is now ready for processing'; do
        alive "$dpdk" || fail "$tag: testpmd (destination) exited after cont"
        alive "$dst" || fail "$tag: destination QEMU exited after cont: $(xm_load_error "$dst")"
        ((SECONDS < deadline)) || fail "$tag: DPDK's vhost PMD did not start the device within 15 s of cont"
        sleep 0.2
    done
    local dfeat; dfeat=$(xm_dpdk_features "$dpdk")
    say "$tag: DPDK (destination) negotiated ${dfeat:-?} = $(xm_names "${dfeat:-0}")"
    local g1 g2 dc1 dc2 pingout
    DEST_WHY=()
    sleep 1
    g1=$(xm_guest_alive "$dst"); dc1=$(xm_dpdk_ctr "$dpdk")
    sleep 2
    g2=$(xm_guest_alive "$dst"); dc2=$(xm_dpdk_ctr "$dpdk")
    pingout=$(xm_exec "$dst" 15 "ping -c 3 -W 3 $XM_PEER_IP 2>&1 | grep -E 'transmitted|round-trip'" 2>&1)
    local -a C1 C2
    read -r -a C1 <<<"$dc1"; read -r -a C2 <<<"$dc2"
    dest_guest_check "$dst" "$g1" "$g2"
    [[ ${C1[0]:-x} =~ ^[0-9]+$ && ${C2[0]:-x} =~ ^[0-9]+$ && ${C2[0]} -gt ${C1[0]} && ${C2[1]} -gt ${C1[1]} ]] ||
        DEST_WHY+=("DPDK port counters did not grow ([$dc1] -> [$dc2])")
    [[ $pingout =~ ([1-9][0-9]*)\ packets\ received ]] || DEST_WHY+=("ping from the guest got no reply: '$(tr '\n' ' ' <<<"$pingout")'")
    say "$tag: destination guest rx tx [$g1] -> [$g2]; DPDK port rx tx [$dc0] at cont, [$dc1] -> [$dc2]; guest ping: $(tr '\n' ' ' <<<"$pingout")"
    dest_judge "$tag" "$loss" "no QEMU losses" "QEMU lost guest-CPU writes in $qloss pages (not device writes)"
    SUMMARY+=("$tag: ${MIG_TOTAL} ms/${MIG_DOWNTIME} ms, journal $o_jlines lines ($o_verified verified), pages differing $o_pages (device $o_pages_device, used $o_pages_used; QEMU's: superseded $o_pages_superseded, driver-ring $o_pages_driver, neither $o_pages_neither), relayed ${A[2]}, $( ((loss)) && echo "QEMU losses: $DEST_VERDICT, not judged" || echo "dest ok"); run time $((SECONDS - t0)) s")
    stop_qemu "$dst"; stop_qemu "$src"; stop "$dpdk" INT 10 || true; stop "vsrc-$tag"
    rm -f "$src_shm" "$dst_shm"
}

# vdpad offers HOST_TSO4/6, which DPDK's vhost PMD offers only with tso=1: the two sides need a
# common feature set before the guest starts (README, "Migrating between ports with different
# devices"). Unless the environment chooses, the runs take turns between the operator's two
# ways to get one: the vdpad port restricted to what DPDK offers by default (features=), and
# DPDK given tso=1 with the vdpad port as it is.
DPDK_DEFAULT_SET=CSUM+GUEST_CSUM+GUEST_TSO4+GUEST_TSO6+GUEST_ECN+GUEST_UFO+HOST_ECN+HOST_UFO+MRG_RXBUF+GUEST_ANNOUNCE+INDIRECT_DESC+EVENT_IDX+VERSION_1+MTU+MQ
chosen_port_opts=${XMIG_VDPAD_PORT_OPTS-unset} chosen_vdev_args=${XMIG_DPDK_VDEV_ARGS-unset}
for ((r = 1; r <= RUNS; r++)); do
    if [[ $chosen_port_opts == unset && $chosen_vdev_args == unset ]]; then
        if ((r % 2)); then
            XMIG_VDPAD_PORT_OPTS=",features=$DPDK_DEFAULT_SET" XMIG_DPDK_VDEV_ARGS=""
        else
            XMIG_VDPAD_PORT_OPTS="" XMIG_DPDK_VDEV_ARGS=",tso=1"
        fi
        say "run$r: vdpad port options '${XMIG_VDPAD_PORT_OPTS}', DPDK net_vhost0 options '${XMIG_DPDK_VDEV_ARGS}'"
    fi
    run "run$r"
done

xm_summary "runs with QEMU's own page losses" "every run lost pages to QEMU"
pass "$RUNS migration(s) vdpad -> DPDK: journal check ok, no device or used-ring byte lost; QEMU losses in $QEMU_LOSS_RUNS; destination judged on $DEST_JUDGED"
