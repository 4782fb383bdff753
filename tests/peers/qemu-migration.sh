#!/usr/bin/env bash
# Live migration of a QEMU 7.2 (TCG) guest between two vdpad daemons on this machine, while
# the source port's link streams frames into the guest: proves (or disproves) that the relay
# marks in QEMU's dirty log every page the SoftNIC writes (it cannot log, like the hardware).
#
# Each run: source vdpad (link=source, mac=the guest's, VDPAD_TEST_JOURNAL on) and
# destination vdpad (same link, own sockets); the source guest boots, receives, and pings a
# dummy neighbour (guest TX, eaten by the source link's TX sink); the destination QEMU waits
# with -incoming tcp:... -S; HMP `migrate -d` and `info migrate` until completed. Then, the
# source stopped and the destination not yet run, lib/migration-oracle.py compares the two
# RAM files (see its --help and /work/shared/TESTBED.md):
#   1. journal check (every run): every journal line says marked=1, every journaled range
#      whose bytes the source still holds is identical on the destination, and each ring's
#      used index in RAM equals the base its GET_VRING_BASE returned;
#   2. every differing 4 KiB page is reported and attributed by its differing bytes: used
#      ring or journaled device bytes the source still holds (either fails the run: the
#      backend's), or guest-CPU writes (a journaled range the guest wrote since, the driver's
#      desc/avail rings, anything else): QEMU 7.2's own losses under TCG, reported, never
#      hidden, not the backend's;
#   3. the source's RX ring went through the relay (switchovers >= 1, relayed > 0,
#      pagesMarked > 0, no faults; mode "relay" seen while migrating);
#   4. the destination is continued: its RX ring is "direct" without faults, and its packets
#      and the guest's rx_packets/tx_packets keep increasing, with no panic on its console.
#      Judged on runs without QEMU losses; on the others it is only reported.
# Then a negative run (VDPAD_TEST_SKIP_BUFFER_MARKING=1 on the source): the journal check
# must FAIL, with lines marked=0 and with journaled device ranges that differ on the
# destination (the data loss must show, or the RAM oracle could not have caught a missing mark
# in the positive runs either). Then a cancel run: a slow migration (max-bandwidth 2M) to
# `exec:cat >/dev/null`, migrate_cancel while the RX ring is relayed: the ring must be
# "direct" again (switchovers >= 2), frames keep flowing (vdpad RX packets, guest rx_packets,
# tx_packets), every journal line says marked=1, and the relay thread idles (CPU); then the
# same source migrates for real (cancel-retry: the ring goes to the relay a second time),
# judged like a run.

# Why 1400-byte frames and 100 frames/s for the sensitive runs: the guest (Linux 6.1
# virtio_net, mergeable 1536-byte buffers) builds the skb in place when a buffer has room for
# skb_shared_info after the frame, and that CPU write dirties the page after the device's
# write, hiding a missing mark; at 1400 bytes it copies instead. Its buffer pages are zeroed
# again when they are reused (init_on_alloc), which hides a missing mark too unless the ring
# holds frames for longer than the migration runs: 256 buffers at 100 frames/s last 2.5 s.
# Measured (negative run, default downtime-limit): 1024-byte frames at 2000-10000/s lost no
# device byte in most runs; 1400 bytes at 100-200/s lost 28-51 ranges in 7 of 7 runs. A
# lower downtime-limit (more dirty syncs) made QEMU's own TCG losses far more frequent.
#
# Environment: MIGRATION_RUNS (positive runs, default 2), MIGRATION_RATES (frames/s of the
# positive runs, cycled, default "100 5000": one sensitive run, one loaded run),
# MIGRATION_NEGATIVE_RATE (default 100), MIGRATION_CANCEL_RATE (default 5000),
# MIGRATION_FRAME_SIZE (default 1400), MIGRATION_MACHINES (pc | microvm, cycled, default pc),
# MIGRATION_NEGATIVE=0 / MIGRATION_CANCEL=0 (skip those runs), MIGRATION_NEGATIVE_DATA=0 (the
# negative run needs only marked=0 lines), MIGRATION_DOWNTIME_MS (migrate_set_parameter
# downtime-limit; default QEMU's), MIGRATION_RELAY_LOOP (vdpad --relay-loop),
# MIGRATION_PORT_OPTIONS (appended to both vdpads' --port, e.g. relay=avail+used),
# MIGRATION_STRICT_DEST=1 (fail when every run lost pages to QEMU, so that the destination
# check was judged on none), MIGRATION_KEEP_RAM=1 with VDPA_KEEP_TMP=1 (keep the RAM files in
# the temp dir). The vdpads log at trace level (SET_VRING_ADDR locates the rings for the
# attribution; "ring N stopped at B" gives the bases checked against the used indexes).
# MIGRATION_TEST_NAME: the name PASS/FAIL lines carry (default qemu-migration; set by wrappers).
#
# With MIGRATION_PORT_OPTIONS=migration=iommu-dirty (tests/peers/qemu-migration-iommu-dirty.sh)
# no relay runs: the rings stay direct and the SoftNIC's IOMMU dirty bits are folded into QEMU's
# log. The SoftNIC then writes the journal itself (each RX range it wrote while tracking, with
# marked=1: the dirty bit was set; the same format), and the relay's checks become the mode's:
#   3. the source RX ring stays "direct" until GET_VRING_BASE stops it (switchovers 0, relayed 0,
#      no "relay" or "held" seen while migrating), stats dirtyTracking.enabled seen true while migrating, folds > 0 and
#      pagesFolded > 0 after it, no faults;
#   negative run: VDPAD_TEST_SKIP_DIRTY_FOLD=1 on the source (the folds drop the bits instead of
#      logging them; the device still sets them, so every journal line honestly says marked=1):
#      the journal check must FAIL with journaled device ranges that differ on the destination
#      (always required in this mode: there is no marked=0 to show the loss otherwise), and
#      dirtyTracking.pagesDropped > 0;
#   cancel run: the slow migration is cancelled once tracking is on and folds ran; tracking must
#      be off again (dirtyTracking.enabled false), the ring direct with switchovers 0, frames keep
#      flowing, the journal stops growing (the device journals only while tracking), the folder
#      thread idles; then the same source migrates for real.
set -uo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

RUNS=${MIGRATION_RUNS:-2}
read -r -a RATES <<<"${MIGRATION_RATES:-100 5000}"
read -r -a MACHINES <<<"${MIGRATION_MACHINES:-pc}"
NEG_RATE=${MIGRATION_NEGATIVE_RATE:-100}
CANCEL_RATE=${MIGRATION_CANCEL_RATE:-5000}
FSIZE=${MIGRATION_FRAME_SIZE:-1400}
NEGATIVE=${MIGRATION_NEGATIVE:-1}
CANCEL=${MIGRATION_CANCEL:-1}
RELAY_LOOP=${MIGRATION_RELAY_LOOP:-}
PORT_OPTIONS=${MIGRATION_PORT_OPTIONS:+,$MIGRATION_PORT_OPTIONS}
DOWNTIME_MS=${MIGRATION_DOWNTIME_MS-}
MAC=52:54:00:12:34:56
GUEST_IP=10.0.2.15/24
ORACLE=$PEERS_DIR/lib/migration-oracle.py
IOMMU_DIRTY=0
[[ $PORT_OPTIONS, == *,migration=iommu-dirty,* ]] && IOMMU_DIRTY=1

peer_init "${MIGRATION_TEST_NAME:-qemu-migration}" $((30 + 40 * (RUNS + NEGATIVE + 2 * CANCEL)))
require_guest
resolve_bins
command -v jq >/dev/null || fail "jq missing: run scripts/install-deps"

# --- helpers for two daemons --------------------------------------------------------------
# vd_start NAME CONTROL SOCKET RATE [ENV=VALUE...]: a vdpad (one port vdpa0, link=source at RATE
# frames/s) logging at trace level to $TMP/NAME.log; waits for its control and vhost-user sockets.
vd_start() {
    local name=$1 ctl=$2 sock=$3 rate=$4; shift 4
    local extra=()
    [[ -n $RELAY_LOOP ]] && extra=(--relay-loop "$RELAY_LOOP")
    spawn "$name" env "$@" "$VDPAD" --control "$ctl" --log-level trace "${extra[@]}" \
        --port "socket=$sock,id=vdpa0,link=source:size=$FSIZE:rate=$rate,mac=$MAC$PORT_OPTIONS"
    wait_for_socket "$ctl" 20 "$name"
    wait_for_socket "$sock" 20 "$name"
}

# vd_dt CONTROL [FIELD]: the port's stats `dirtyTracking` object (compact JSON), or one field of it
# (migration=iommu-dirty ports; "null" elsewhere).
vd_dt() {
    vd_json "$1" stats 2>/dev/null | jq -r -c ".ports[0].dirtyTracking${2:+.$2}" 2>/dev/null
}

# thread_ticks PID COMM: user+system clock ticks of PID's thread named COMM (empty if none).
thread_ticks() {
    local t s
    for t in /proc/"$1"/task/*; do
        [[ $(cat "$t/comm" 2>/dev/null) == "$2" ]] || continue
        s=$(cat "$t/stat" 2>/dev/null) || return 0
        s=${s##*) }
        # shellcheck disable=SC2086
        set -- $s
        echo $(( ${12} + ${13} ))
        return 0
    done
}

# boot_source TAG RATE MACHINE VDPAD-ENV...: source vdpad + source QEMU, guest up, RX flowing,
# guest TX started.
boot_source() {
    local tag=$1 rate=$2 machine=$3; shift 3
    vd_start "vsrc-$tag" "$TMP/$tag-src.ctl" "$TMP/$tag-src.sock" "$rate" "$@"
    start_qemu "src-$tag" --socket "$TMP/$tag-src.sock" --connect --mac "$MAC" --machine "$machine" --ip "$GUEST_IP"
    SRC_SHM=$SHM
    wait_guest "src-$tag" 90
    local q deadline=$((SECONDS + 30))
    local -a Q
    while :; do
        q=$(vd_q "$TMP/$tag-src.ctl" 0)
        read -r -a Q <<<"$q"
        [[ ${Q[0]:-} == direct && ${Q[1]:-0} -gt 0 ]] && break
        alive "vsrc-$tag" || fail "$tag: source vdpad exited"
        ((SECONDS < deadline)) || fail "$tag: source RX ring not direct with packets after 30 s: '$q'"
        sleep 0.2
    done
    # Guest TX: ping a neighbour that does not exist (static ARP entry), 100 frames a second.
    GUEST_EXEC_TIMEOUT=20 guest_exec "src-$tag" \
        'arp -s 10.0.2.99 02:00:00:00:00:99 &&
         (ping -q -i 0.01 -s 512 10.0.2.99 </dev/null >/dev/null 2>&1 &) && echo tx-started' \
        >"$TMP/$tag-txstart.log" 2>&1 || fail "$tag: could not start guest TX: $(cat "$TMP/$tag-txstart.log")"
}

# mig_poll TAG SRC-QEMU SRC-CONTROL LIMIT: poll `info migrate` until completed/failed/cancelled,
# watching the source RX ring's mode. Sets MIG_INFO (last output), MIG_STATUS, SAW_RELAY (and,
# migration=iommu-dirty: SAW_TRACKING when dirtyTracking.enabled was true, SAW_MODES the ring
# modes seen other than direct and stopped).
mig_poll() {
    local tag=$1 vm=$2 ctl=$3 deadline=$((SECONDS + $4)) q
    SAW_RELAY=0 MIG_STATUS= SAW_TRACKING=0 SAW_MODES=
    while :; do
        MIG_INFO=$(monitor "$vm" "info migrate" 2>&1)
        MIG_STATUS=$(info_field "$MIG_INFO" "Migration status")
        q=$(vd_q "$ctl" 0)
        [[ $q == relay* ]] && SAW_RELAY=1
        if ((IOMMU_DIRTY)); then
            # "stopped" is the end of every migration (GET_VRING_BASE), not a mode of the path.
            [[ -n $q && $q != direct* && $q != stopped* && " $SAW_MODES " != *" ${q%% *} "* ]] && SAW_MODES+=" ${q%% *}"
            [[ $(vd_dt "$ctl" enabled) == true ]] && SAW_TRACKING=1
        fi
        case $MIG_STATUS in completed|failed|cancelled) break ;; esac
        ((SECONDS < deadline)) || { MIG_STATUS="timeout ($MIG_STATUS)"; break; }
        sleep 0.2
    done
    printf '%s\n' "$MIG_INFO" >"$TMP/$tag-info-migrate.log"
}

# keep_ram TAG SRC DST: with MIGRATION_KEEP_RAM=1 and VDPA_KEEP_TMP=1, copy the RAM files as the
# oracle saw them into the temp dir (TAG-src.ram, TAG-dst.ram), for a look at the bytes.
keep_ram() {
    if [[ ${MIGRATION_KEEP_RAM:-0} == 1 && ${VDPA_KEEP_TMP:-0} == 1 ]]; then
        cp "$2" "$TMP/$1-src.ram"; cp "$3" "$TMP/$1-dst.ram"
    fi
}
drop_ram() { rm -f "$2" "$3"; }

# --- one migration ---------------------------------------------------------------------------
# migrate_and_judge TAG STAG NEGATIVE RATE MACHINE: migrate the running source of STAG (QEMU
# src-STAG, vdpad vsrc-STAG, journal STAG.journal) to a new destination (vdst-TAG, dst-TAG),
# compare the RAM files, judge, continue the destination and judge it; stop all four.
# Appends to SUMMARY; counts QEMU_LOSS_RUNS (runs with QEMU's own losses) and DEST_JUDGED.
QEMU_LOSS_RUNS=0 DEST_JUDGED=0 POSITIVE_RUNS=0 SUMMARY=()
migrate_and_judge() {
    local tag=$1 stag=$2 negative=$3 rate=$4 machine=$5 t0=$SECONDS
    local src_shm=${SRC_SHMS[$stag]} sctl=$TMP/$stag-src.ctl dctl=$TMP/$tag-dst.ctl port
    vd_start "vdst-$tag" "$dctl" "$TMP/$tag-dst.sock" "$rate"
    port=$(free_port)
    start_qemu "dst-$tag" --socket "$TMP/$tag-dst.sock" --connect --mac "$MAC" --machine "$machine" \
        --ip "$GUEST_IP" --incoming "tcp:127.0.0.1:$port"
    local dst_shm=$SHM
    wait_for_socket "$TMP/dst-$tag.mon" 20 "dst-$tag"
    local deadline=$((SECONDS + 20))
    until [[ $(vd_json "$dctl" status 2>/dev/null | jq -r '.ports[0].connection' 2>/dev/null) == connected ]]; do
        ((SECONDS < deadline)) || fail "$tag: destination QEMU did not connect to the destination vdpad"
        alive "dst-$tag" || fail "$tag: destination QEMU exited"
        sleep 0.2
    done
    vd_json "$sctl" status >"$TMP/$tag-src-status.json" || fail "$tag: vdpactl status failed"
    local before; before=$(vd_q "$sctl" 0)
    sleep 1  # some RX and TX before the migration starts

    if [[ -n $DOWNTIME_MS ]]; then
        local reply; reply=$(monitor "src-$stag" "migrate_set_parameter downtime-limit $DOWNTIME_MS" 2>&1)
        [[ -n ${reply//[[:space:]]/} ]] && say "$tag: migrate_set_parameter downtime-limit: $(head -c 200 <<<"$reply")"
    fi
    monitor "src-$stag" "migrate -d tcp:127.0.0.1:$port" >"$TMP/$tag-migrate-cmd.log" 2>&1
    mig_poll "$tag" "src-$stag" "$sctl" 60
    [[ $MIG_STATUS == completed ]] ||
        fail "$tag: migration did not complete: status '$MIG_STATUS': $(tr '\n' ' ' <<<"$MIG_INFO" | head -c 600)"
    local total downtime setup transferred syncs
    total=$(info_field "$MIG_INFO" "total time") downtime=$(info_field "$MIG_INFO" "downtime")
    setup=$(info_field "$MIG_INFO" "setup") transferred=$(info_field "$MIG_INFO" "transferred ram")
    syncs=$(info_field "$MIG_INFO" "dirty sync count")
    local after; after=$(vd_q "$sctl" 0)
    local -a A; read -r -a A <<<"$after"
    say "$tag: migration completed: total ${total} ms, downtime ${downtime} ms, setup ${setup} ms, transferred ${transferred} kB, dirty syncs ${syncs}"
    if ((IOMMU_DIRTY)); then
        say "$tag: source RX ring before: [$before]  after: [$after]  (mode packets relayed pagesMarked switchovers gapMicros faults); dirty tracking seen on while migrating: $SAW_TRACKING; modes other than direct seen:${SAW_MODES:- none}"
        say "$tag: source dirtyTracking: $(vd_dt "$sctl")"
    else
        say "$tag: source RX ring before: [$before]  after: [$after]  (mode packets relayed pagesMarked switchovers gapMicros faults); relay mode seen while migrating: $SAW_RELAY"
        say "$tag: source relay: $(vd_json "$sctl" stats 2>/dev/null | jq -c '.ports[0].relay' 2>/dev/null)"
    fi

    # The source is stopped, the destination has not run: compare.
    local orc=0
    python3 "$ORACLE" --src "$src_shm" --dst "$dst_shm" --journal "$TMP/$stag.journal" \
        --vdpad-log "$TMP/vsrc-$stag.log" --status "$TMP/$tag-src-status.json" --mac "$MAC" \
        --vars "$TMP/$tag.vars" >"$TMP/$tag-oracle.txt" 2>&1 || orc=$?
    sed 's/^/    '"$tag"': /' "$TMP/$tag-oracle.txt"
    keep_ram "$tag" "$src_shm" "$dst_shm"
    ((orc <= 1)) || fail "$tag: oracle error (status $orc)"
    local o_jlines=0 o_unmarked=0 o_verified=0 o_jbad_lines=0 o_pages=0 o_pages_used=0 o_pages_device=0 \
        o_pages_driver=0 o_pages_neither=0 o_pages_framelike=0 o_journal_ok=0 o_idx_bad=0 \
        o_pages_superseded=0
    # shellcheck disable=SC1090
    source "$TMP/$tag.vars"

    if ((negative && IOMMU_DIRTY)); then
        # The device set its bits (marked=1 is honest); the folds dropped them. The loss must show
        # in the data: journaled device ranges the destination lacks.
        local dropped; dropped=$(vd_dt "$sctl" pagesDropped)
        ((orc == 1 && o_journal_ok == 0)) ||
            fail "$tag: the journal check PASSED although the source dropped its dirty bits (lines $o_jlines, verified $o_verified, pages dropped ${dropped:-?})"
        ((o_jbad_lines > 0)) ||
            fail "$tag: no journaled device range differs on the destination although the source dropped its dirty bits: the RAM oracle was not sensitive in this run"
        [[ $dropped =~ ^[0-9]+$ ]] && ((dropped > 0)) || fail "$tag: dirtyTracking.pagesDropped is '${dropped:-?}' (the skip switch did not act?)"
        say "$tag: journal check failed as it must: $o_jbad_lines of $o_jlines lines ($o_verified verified) differ on the destination, $o_pages_device differing pages in device ranges, $o_pages_used in used rings; marked=0 $o_unmarked; pages dropped by the folds $dropped"
        SUMMARY+=("$tag: negative ok (device ranges lost $o_jbad_lines of $o_jlines lines, device pages $o_pages_device, used-ring pages $o_pages_used, pagesDropped $dropped)")
        stop_qemu "dst-$tag"; stop_qemu "src-$stag"; stop "vdst-$tag"; stop "vsrc-$stag"
        drop_ram "$tag" "$src_shm" "$dst_shm"
        return
    fi
    if ((negative)); then
        ((orc == 1 && o_journal_ok == 0)) ||
            fail "$tag: the journal check PASSED although the source skipped marking buffers (lines $o_jlines, marked=0 $o_unmarked)"
        ((o_unmarked > 0)) || fail "$tag: no journal line says marked=0 although the source skipped marking buffers"
        say "$tag: journal check failed as it must: $o_unmarked of $o_jlines lines marked=0, $o_jbad_lines verified ranges differ on the destination, $o_pages_device differing pages in device ranges"
        # The data must show it too, or the RAM comparison could not have caught a missing mark in
        # the positive runs either (see the header: frame size and rate make it sensitive).
        if ((o_jbad_lines == 0)) && [[ ${MIGRATION_NEGATIVE_DATA:-1} == 1 ]]; then
            fail "$tag: no device range lost on the destination although the source skipped marking buffers: the RAM oracle was not sensitive in this run (MIGRATION_NEGATIVE_DATA=0 accepts that)"
        fi
        SUMMARY+=("$tag: negative ok (marked=0 $o_unmarked/$o_jlines, device ranges lost $o_jbad_lines, device pages $o_pages_device)")
        stop_qemu "dst-$tag"; stop_qemu "src-$stag"; stop "vdst-$tag"; stop "vsrc-$stag"
        drop_ram "$tag" "$src_shm" "$dst_shm"
        return
    fi

    # Judge the source side.
    POSITIVE_RUNS=$((POSITIVE_RUNS + 1))
    ((orc == 0 && o_journal_ok == 1)) ||
        fail "$tag: JOURNAL CHECK FAILED: $o_unmarked of $o_jlines lines marked=0, $o_jbad_lines verified device ranges differ on the destination, $o_idx_bad used indexes off (see the report above)"
    ((o_pages_used == 0)) || fail "$tag: $o_pages_used differing pages in used rings (only the device side writes there)"
    ((o_pages_device == 0)) || fail "$tag: $o_pages_device differing pages hold device writes the destination lacks"
    local folds=0 folded=0
    if ((IOMMU_DIRTY)); then
        folds=$(vd_dt "$sctl" folds) folded=$(vd_dt "$sctl" pagesFolded)
        [[ ${A[0]:-} =~ ^(direct|stopped)$ && ${A[4]:-x} == 0 && ${A[2]:-x} == 0 && -z $SAW_MODES ]] ||
            fail "$tag: source RX ring left the direct path with migration=iommu-dirty: [$after], modes seen:${SAW_MODES:- none} (want direct until stopped, switchovers 0, relayed 0)"
        ((SAW_TRACKING)) || fail "$tag: dirtyTracking.enabled was never seen true while migrating"
        [[ $folds =~ ^[0-9]+$ && $folded =~ ^[0-9]+$ ]] && ((folds > 0 && folded > 0)) ||
            fail "$tag: the source folded nothing into QEMU's log: folds '${folds:-?}', pagesFolded '${folded:-?}' (want both > 0)"
    else
        [[ ${A[4]:-0} -ge 1 && ${A[2]:-0} -gt 0 && ${A[3]:-0} -gt 0 ]] ||
            fail "$tag: source RX ring did not go through the relay: [$after] (want switchovers >= 1, relayed > 0, pagesMarked > 0)"
        ((SAW_RELAY)) || say "$tag: note: mode \"relay\" was not caught by the stats poll (the figures above show the relay ran)"
    fi
    ((${A[6]:-0} == 0)) || fail "$tag: source RX ring has device faults: [$after]"
    # Pages the guest CPU wrote (kernel data, the driver's rings, buffers it reused): QEMU 7.2
    # under TCG lost those writes.
    local loss=0 qloss=$((o_pages_neither + o_pages_driver + o_pages_superseded))
    ((qloss > 0)) && { loss=1; QEMU_LOSS_RUNS=$((QEMU_LOSS_RUNS + 1)); }
    ((o_pages_framelike > 0)) && say "$tag: note: $o_pages_framelike 'neither' pages hold frame-like bytes outside every journaled range (the guest's copies of frame headers, or device writes the relay never exposed: look at them)"

    # The destination.
    monitor "dst-$tag" cont >/dev/null 2>&1
    local d1 d2 g1 g2
    DEST_WHY=()
    sleep 1
    d1=$(vd_q "$dctl" 0); g1=$(guest_ctr "$TMP/dst-$tag.cmd" 6)
    sleep 2
    d2=$(vd_q "$dctl" 0); g2=$(guest_ctr "$TMP/dst-$tag.cmd" 6)
    local -a D1 D2
    read -r -a D1 <<<"$d1"; read -r -a D2 <<<"$d2"
    [[ ${D2[0]:-} == direct ]] || DEST_WHY+=("RX ring mode '${D2[0]:-?}', not direct")
    [[ ${D2[1]:-0} -gt ${D1[1]:-0} ]] || DEST_WHY+=("vdpad RX packets did not increase (${D1[1]:-?} -> ${D2[1]:-?})")
    ((${D2[6]:-0} == 0)) || DEST_WHY+=("destination RX ring faults ${D2[6]}")
    dest_guest_check "dst-$tag" "$g1" "$g2"
    say "$tag: destination RX ring [$d1] -> [$d2]; guest rx tx [$g1] -> [$g2]"
    dest_judge "$tag" "$loss" "no QEMU losses" "QEMU lost guest-CPU writes in $qloss pages (not device writes)"
    SUMMARY+=("$tag: ${total} ms/${downtime} ms, journal $o_jlines lines ($o_verified verified), pages differing $o_pages (device $o_pages_device, used $o_pages_used; QEMU's: superseded $o_pages_superseded, driver-ring $o_pages_driver, neither $o_pages_neither), $( ((IOMMU_DIRTY)) && echo "direct, folds $folds, pagesFolded $folded" || echo "relayed ${A[2]}, pagesMarked ${A[3]}, switchovers ${A[4]}"), $( ((loss)) && echo "QEMU losses" || echo "dest ok")")
    say "$tag: run time $((SECONDS - t0)) s"
    stop_qemu "dst-$tag"; stop_qemu "src-$stag"; stop "vdst-$tag"; stop "vsrc-$stag"
    drop_ram "$tag" "$src_shm" "$dst_shm"
}

# migration_run TAG NEGATIVE RATE MACHINE: a fresh source, then migrate_and_judge.
declare -A SRC_SHMS=()
migration_run() {
    local tag=$1 negative=$2 rate=$3 machine=$4 envs=("VDPAD_TEST_JOURNAL=$TMP/$1.journal")
    local skip=VDPAD_TEST_SKIP_BUFFER_MARKING=1
    ((IOMMU_DIRTY)) && skip=VDPAD_TEST_SKIP_DIRTY_FOLD=1
    ((negative)) && envs+=("$skip")
    echo "--- $TEST_NAME: $tag ($([[ $negative == 1 ]] && echo "negative: $skip" || echo positive); $machine, source link $rate frames/s of $FSIZE B${PORT_OPTIONS:+, --port ...$PORT_OPTIONS})"
    boot_source "$tag" "$rate" "$machine" "${envs[@]}"
    SRC_SHMS[$tag]=$SRC_SHM
    migrate_and_judge "$tag" "$tag" "$negative" "$rate" "$machine"
}

# --- migrate_cancel ----------------------------------------------------------------------------
cancel_run() {
    local tag=cancel
    echo "--- $TEST_NAME: $tag (slow migration to exec:cat, then migrate_cancel)"
    local t0=$SECONDS
    boot_source "$tag" "$CANCEL_RATE" "${MACHINES[0]}" "VDPAD_TEST_JOURNAL=$TMP/$tag.journal"
    SRC_SHMS[$tag]=$SRC_SHM
    local ctl=$TMP/$tag-src.ctl vm=src-$tag bw
    bw=$(monitor "$vm" "info migrate_parameters" 2>&1 | sed -n 's/^max-bandwidth: *\([0-9]*\).*/\1/p')
    local reply; reply=$(monitor "$vm" "migrate_set_parameter max-bandwidth 2M" 2>&1)
    [[ -n ${reply//[[:space:]]/} ]] && say "$tag: migrate_set_parameter max-bandwidth: $(head -c 200 <<<"$reply")"
    monitor "$vm" 'migrate -d "exec:cat >/dev/null"' >"$TMP/$tag-migrate-cmd.log" 2>&1
    local q deadline=$((SECONDS + 30)) info st
    local -a Q
    local what=relayed dt
    ((IOMMU_DIRTY)) && what="dirty-tracked (enabled, folds > 0)"
    while :; do
        q=$(vd_q "$ctl" 0); read -r -a Q <<<"$q"
        if ((IOMMU_DIRTY)); then
            dt=$(vd_dt "$ctl")
            [[ $(jq -r '.enabled' <<<"$dt" 2>/dev/null) == true && $(jq -r '.folds' <<<"$dt" 2>/dev/null) -gt 0 ]] && break
        else
            [[ ${Q[0]:-} == relay && ${Q[2]:-0} -gt 0 ]] && break
        fi
        info=$(monitor "$vm" "info migrate" 2>&1); st=$(info_field "$info" "Migration status")
        [[ -z $st || $st == active || $st == setup ]] ||
            fail "$tag: migration ended ($st) before the RX ring was $what: $(tr '\n' ' ' <<<"$info" | head -c 400)"
        ((SECONDS < deadline)) || fail "$tag: RX ring not $what 30 s after migrate: [$q]"
        sleep 0.2
    done
    sleep 2
    info=$(monitor "$vm" "info migrate" 2>&1); st=$(info_field "$info" "Migration status")
    [[ $st == active ]] || fail "$tag: migration not active after 2 s of logging (status '$st'): too fast to cancel; lower max-bandwidth"
    local during; during=$(vd_q "$ctl" 0)
    if ((IOMMU_DIRTY)); then
        [[ $during == direct* ]] || fail "$tag: RX ring not direct while dirty tracking: [$during]"
        say "$tag: dirty tracking: [$during] (mode packets relayed pagesMarked switchovers gapMicros faults), dirtyTracking $(vd_dt "$ctl"); migration $st, transferred $(info_field "$info" "transferred ram") kB"
    else
        say "$tag: relaying: [$during] (mode packets relayed pagesMarked switchovers gapMicros faults); migration $st, transferred $(info_field "$info" "transferred ram") kB"
    fi
    monitor "$vm" migrate_cancel >/dev/null 2>&1
    mig_poll "$tag" "$vm" "$ctl" 20
    [[ $MIG_STATUS == cancelled ]] || fail "$tag: after migrate_cancel the status is '$MIG_STATUS'"
    deadline=$((SECONDS + 10))
    while :; do
        q=$(vd_q "$ctl" 0); read -r -a Q <<<"$q"
        if ((IOMMU_DIRTY)); then
            [[ ${Q[0]:-} == direct && $(vd_dt "$ctl" enabled) == false ]] && break
            ((SECONDS < deadline)) || fail "$tag: dirty tracking not off 10 s after migrate_cancel: [$q], dirtyTracking $(vd_dt "$ctl")"
        else
            [[ ${Q[0]:-} == direct ]] && break
            ((SECONDS < deadline)) || fail "$tag: RX ring not back to direct 10 s after migrate_cancel: [$q]"
        fi
        sleep 0.2
    done
    # The thread that idles once logging is over: the relay's, or the dirty folder's.
    local thread=relay-vdpa0 j1 j2
    ((IOMMU_DIRTY)) && thread=dirty-vdpa0
    local p1 p2 g1 g2 r1 r2 w1 w2 vpid=${PIDS[vsrc-$tag]}
    p1=$(vd_q "$ctl" 0); g1=$(guest_ctr "$TMP/$vm.cmd" 15)
    j1=$(wc -l <"$TMP/$tag.journal" 2>/dev/null || echo 0)
    r1=$(thread_ticks "$vpid" "$thread"); w1=$(date +%s%N)
    sleep 2
    r2=$(thread_ticks "$vpid" "$thread"); w2=$(date +%s%N)
    p2=$(vd_q "$ctl" 0); g2=$(guest_ctr "$TMP/$vm.cmd" 15)
    j2=$(wc -l <"$TMP/$tag.journal" 2>/dev/null || echo 0)
    local relay_cpu=unknown
    if [[ -n $r1 && -n $r2 ]]; then
        relay_cpu=$(( (r2 - r1) * 100 * 1000000000 / $(getconf CLK_TCK) / (w2 - w1) ))
    fi
    local -a P1 P2 G1 G2
    read -r -a P1 <<<"$p1"; read -r -a P2 <<<"$p2"; read -r -a G1 <<<"$g1"; read -r -a G2 <<<"$g2"
    say "$tag: after cancel: RX ring [$p1] -> [$p2]; guest rx tx [$g1] -> [$g2]; $thread thread CPU ${relay_cpu}% with nothing to $( ((IOMMU_DIRTY)) && echo fold || echo relay)$( ((IOMMU_DIRTY)) && echo "; dirtyTracking $(vd_dt "$ctl"); journal lines $j1 -> $j2")"
    if ((IOMMU_DIRTY)); then
        [[ $relay_cpu == unknown ]] || ((relay_cpu <= 50)) || fail "$tag: the dirty folder thread uses ${relay_cpu}% CPU after the cancel, with tracking off"
    elif [[ $relay_cpu != unknown ]] && ((relay_cpu > 50)); then
        if [[ ${RELAY_LOOP:-hybrid} == poll ]]; then
            say "$tag: NOTE: the poll-mode relay thread keeps spinning after the migration was cancelled"
        else
            fail "$tag: the relay thread uses ${relay_cpu}% CPU after the cancel, with no ring to relay (--relay-loop ${RELAY_LOOP:-default})"
        fi
    fi
    [[ ${P2[0]} == direct ]] || fail "$tag: RX ring left direct mode again: [$p2]"
    if ((IOMMU_DIRTY)); then
        [[ $(vd_dt "$ctl" enabled) == false ]] || fail "$tag: dirty tracking on again after the cancel: $(vd_dt "$ctl")"
        ((${P2[4]:-1} == 0)) || fail "$tag: switchovers ${P2[4]:-?} with migration=iommu-dirty (want 0: the ring never leaves the direct path)"
        ((j2 == j1)) || fail "$tag: the device still journals writes after the cancel ($j1 -> $j2 lines): tracking not off in the device"
    else
        ((${P2[4]:-0} >= 2)) || fail "$tag: switchovers ${P2[4]:-?} after cancel (want >= 2: to the relay and back)"
    fi
    ((${P2[1]:-0} > ${P1[1]:-0})) || fail "$tag: RX packets stopped after the cancel (${P1[1]} -> ${P2[1]})"
    ((${P2[2]:-0} == ${P1[2]:-0})) || fail "$tag: relayed still increasing in direct mode (${P1[2]} -> ${P2[2]})"
    [[ ${G1[0]:-x} =~ ^[0-9]+$ && ${G2[0]:-x} =~ ^[0-9]+$ && ${G2[0]} -gt ${G1[0]} ]] ||
        fail "$tag: guest rx_packets did not increase after the cancel ('$g1' -> '$g2')"
    [[ ${G2[1]:-x} =~ ^[0-9]+$ && ${G2[1]} -gt ${G1[1]:-0} ]] ||
        fail "$tag: guest tx_packets did not increase after the cancel ('$g1' -> '$g2')"
    ((${P2[6]:-0} == 0)) || fail "$tag: RX ring has device faults: [$p2]"
    local lines unmarked
    lines=$(wc -l <"$TMP/$tag.journal" 2>/dev/null || echo 0)
    unmarked=$(awk '$5 != 1' "$TMP/$tag.journal" 2>/dev/null | wc -l)
    ((lines > 0 && unmarked == 0)) || fail "$tag: journal while logging: $lines lines, $unmarked marked=0"
    say "$tag: journal $lines lines, all marked=1; run time $((SECONDS - t0)) s"
    if ((IOMMU_DIRTY)); then
        SUMMARY+=("cancel: tracking off again (enabled false, still direct, switchovers ${P2[4]}, journal stopped at $j2 lines), RX ${P1[1]}->${P2[1]}, guest rx ${G1[0]}->${G2[0]}, folder thread CPU afterwards ${relay_cpu}%")
    else
        SUMMARY+=("cancel: back to direct (switchovers ${P2[4]}, gap ${P2[5]} us), RX ${P1[1]}->${P2[1]}, guest rx ${G1[0]}->${G2[0]}, relay thread CPU afterwards ${relay_cpu}%")
    fi

    # The same source migrates for real now: the ring goes to the relay (or tracking on) a second time.
    echo "--- $TEST_NAME: cancel-retry (the cancelled source migrates again, max-bandwidth ${bw:-?} restored$( ((IOMMU_DIRTY)) && echo '; dirty tracking on a second time' || echo '; the ring goes to the relay a second time'))"
    [[ -n $bw ]] && monitor "$vm" "migrate_set_parameter max-bandwidth $bw" >/dev/null 2>&1
    migrate_and_judge cancel-retry "$tag" 0 "$CANCEL_RATE" "${MACHINES[0]}"
}

for ((run = 1; run <= RUNS; run++)); do
    migration_run "run$run" 0 "${RATES[(run - 1) % ${#RATES[@]}]}" "${MACHINES[(run - 1) % ${#MACHINES[@]}]}"
done
((NEGATIVE)) && migration_run negative 1 "$NEG_RATE" "${MACHINES[0]}"
((CANCEL)) && cancel_run

echo "--- $TEST_NAME: summary"
for s in "${SUMMARY[@]}"; do say "$s"; done
say "migrations with QEMU's own page losses: $QEMU_LOSS_RUNS of $POSITIVE_RUNS; destination check judged on $DEST_JUDGED"
if ((POSITIVE_RUNS > 0 && DEST_JUDGED == 0)) && [[ ${MIGRATION_STRICT_DEST:-0} == 1 ]]; then
    fail "every run lost pages to QEMU: the destination check was judged on none (MIGRATION_STRICT_DEST=1)"
fi
pass "$POSITIVE_RUNS migration(s)$( ((IOMMU_DIRTY)) && echo ' with migration=iommu-dirty (rings direct, dirty bits folded)'): journal check ok, no device or used-ring byte lost; QEMU losses in $QEMU_LOSS_RUNS; destination judged on $DEST_JUDGED$( ((NEGATIVE)) && echo '; negative run caught')$( ((CANCEL)) && { ((IOMMU_DIRTY)) && echo '; migrate_cancel turned tracking off, then migrated' || echo '; migrate_cancel back to direct, then migrated'; })"
