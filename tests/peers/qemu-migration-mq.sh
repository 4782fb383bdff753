#!/usr/bin/env bash
# Live migration of a multi-queue guest (vdpad port queues=2, QEMU vhost-user queues=2,
# virtio-net-pci mq=on with vectors=0: INTx serves several queues under TCG, no MSI-X needed)
# while the source link streams frames into it; during the migration QEMU (re)starts the
# vhost-user device and the guest enables its second queue pair (`ethtool -L eth0 combined 2`).
# It checks that vdpad logs every device write of both RX rings (0 and 2), including a ring
# that QEMU starts while dirty logging is already on, in its vhost_dev_start order:
# SET_FEATURES with LOG_ALL, SET_MEM_TABLE, the rings with the log flag, SET_LOG_BASE, then
# SET_VRING_ENABLE (vdpad must hold such a ring until the log arrives, then relay it).
#
# What QEMU 7.2 does (measured here, see the vdpad trace logs): `ethtool -L eth0 combined 2`
# alone restarts nothing. QEMU starts every queue pair's vhost device at DRIVER_OK (rings 2 and
# 3 too, disabled); the guest's MQ_VQ_PAIRS_SET only makes it send SET_VRING_ENABLE 1 for rings
# 2 and 3 (virtio_net_handle_mq: vhost is already started). QEMU starts the device with
# LOG_ALL before SET_LOG_BASE when it starts it during a migration that began while it was
# stopped (vhost_migration_log only records logging for a stopped vhost device, it sends
# nothing): here `set_link net0 off` before the migration and `set_link net0 on` during it
# (MQ_RESTART=link, the default: the guest keeps its posted RX buffers, so frames written
# during the migration land in buffers older than it, which makes a missing mark show in the
# RAM files), or the guest unbinding virtio_net before and binding it again during the
# migration (MQ_RESTART=rebind: fresh buffers; a missing mark then shows only with more dirty
# syncs, MQ_SETTLE_SECONDS=4, and those made QEMU lose guest pages in every run measured).
# QEMU starts queue pair 0's vhost device (rings 0, 1, SET_LOG_BASE), then queue pair 1's
# (SET_FEATURES with LOG_ALL again, rings 2, 3, SET_LOG_BASE): ring 0 is the one started before
# the log; ring 2 starts after it and goes to the relay at once.
#
# One run:
#   1. source vdpad (link=source, 1400-byte frames at MQ_RATE/s, journal on) and QEMU; the
#      guest (-smp 1, so Linux uses 1 of the 2 queue pairs) is up and ring 0 receives;
#      destination vdpad and QEMU (-incoming, -S) wait;
#   2. link: the guest runs `ethtool -L eth0 combined 2`, then `combined 1` (ring 2 gets
#      buffers, then is disabled again) and pings a dummy neighbour (guest TX); `set_link net0
#      off` on the source monitor: QEMU stops all four rings (rebind: the guest unbinds
#      virtio_net);
#   3. migration with max-bandwidth MQ_SLOW_BANDWIDTH (slow, so that what follows lands while
#      it runs);
#   4. `set_link net0 on` (rebind: the guest binds virtio_net again, brings eth0 up, pings).
#      vdpad must log, after "dirty logging (LOG_ALL) on", "ring 0: started while LOG_ALL is
#      on but before SET_LOG_BASE: held until the log arrives" before the first "dirty log
#      set", then switch ring 0 to the relay, and switch ring 2 to the relay when it starts
#      (after its SET_VRING_KICK);
#   5. the guest runs `ethtool -L eth0 combined 2`: SET_VRING_ENABLE 1 for ring 2 while it is
#      relayed, and frames flow on ring 2 through the relay (MQ_RING2_MIN relayed);
#   6. the migration must still be running (else the steps did not land during it); then
#      max-bandwidth is restored (with MQ_SETTLE_SECONDS > 0, QEMU first iterates for
#      MQ_SETTLE_SYNCS more dirty syncs at downtime-limit MQ_SETTLE_DOWNTIME_MS) and it
#      completes; rings 0 and 2 went through the relay (switchovers, relayed, pagesMarked, no
#      faults);
#   7. lib/migration-oracle.py on the two RAM files: journal check (every line marked, every
#      device range the source still holds identical on the destination, used indexes =
#      stop bases), journal lines on ring 0 and on ring 2, no differing page in a used ring or
#      a device range, and no frame payload lost outside the journal (an RX ring that ran
#      unlogged); pages QEMU itself lost (guest-CPU writes, see TESTBED.md) are reported;
#   8. the destination continues: rings 0 and 2 direct, both receive, guest counters grow
#      (judged only when QEMU lost no page).
# Every check is made and reported before the verdict, so a run against a daemon that gets
# this wrong still prints what the oracle found. MQ_QUEUES=1 runs the same restart on a
# single-queue guest (no ring 2, no ethtool): a control that shows the bug this guards against
# (a ring started with LOG_ALL before the log ran direct, unlogged) in the RAM files, since with
# one queue pair no second SET_FEATURES comes to move ring 0 to the relay; use MQ_RATE=30 there
# so that the guest's buffers outlive the slower failing run.
#
# Environment: MQ_RESTART (link | rebind), MQ_QUEUES (2 | 1), MQ_RATE (frames/s of the source
# link, default 100: see qemu-migration.sh for why 1400 bytes at a low rate make a lost mark
# show in the RAM), MQ_FRAME_SIZE (1400), MQ_SLOW_BANDWIDTH (max-bandwidth until the steps are
# done, default 1M), MQ_RING2_MIN (relayed frames wanted on ring 2, default 20),
# MQ_SETTLE_SECONDS (default 0: none), MQ_SETTLE_SYNCS (default 2), MQ_SETTLE_DOWNTIME_MS
# (default 1), MQ_SOURCE_ENV (more VAR=VALUE words for the source vdpad's environment, e.g.
# VDPAD_TEST_SKIP_BUFFER_MARKING=1 to see the test fail). MIGRATION_KEEP_RAM=1 with
# VDPA_KEEP_TMP=1 keeps the RAM files.
set -uo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

RATE=${MQ_RATE:-100}
FSIZE=${MQ_FRAME_SIZE:-1400}
SLOW_BW=${MQ_SLOW_BANDWIDTH:-1M}
RING2_MIN=${MQ_RING2_MIN:-20}
Q=${MQ_QUEUES:-2}
[[ $Q == 1 || $Q == 2 ]] || { echo "MQ_QUEUES must be 1 or 2" >&2; exit 2; }
RESTART=${MQ_RESTART:-link}
[[ $RESTART == link || $RESTART == rebind ]] || { echo "MQ_RESTART must be link or rebind" >&2; exit 2; }
SETTLE=${MQ_SETTLE_SECONDS:-0}
SETTLE_DL=${MQ_SETTLE_DOWNTIME_MS:-1}
SETTLE_SYNCS=${MQ_SETTLE_SYNCS:-2}
MAC=52:54:00:12:34:56
GUEST_IP=10.0.2.15/24
ORACLE=$PEERS_DIR/lib/migration-oracle.py

peer_init qemu-migration-mq 170
require_guest
resolve_bins
command -v jq >/dev/null || fail "jq missing: run scripts/install-deps"

say() { echo "    $*"; }
PROBLEMS=()
problem() { PROBLEMS+=("$*"); say "PROBLEM: $*"; }

# vd_start NAME CONTROL SOCKET [ENV=VALUE...]: vdpad, one port vdpa0 with 2 queue pairs,
# link=source, trace log in $TMP/NAME.log.
vd_start() {
    local name=$1 ctl=$2 sock=$3; shift 3
    spawn "$name" env "$@" "$VDPAD" --control "$ctl" --log-level trace \
        --port "socket=$sock,id=vdpa0,queues=$Q,link=source:size=$FSIZE:rate=$RATE,mac=$MAC"
    wait_for_socket "$ctl" 20 "$name"
    wait_for_socket "$sock" 20 "$name"
}
mig_status() { info_field "$(monitor src "info migrate" 2>&1)" "Migration status"; }
# since FILE LINE: FILE's lines after line number LINE.
since() { tail -n "+$(($2 + 1))" "$1"; }
# line_no FILE LINE REGEX: number of the first line after LINE matching REGEX (0 if none).
line_no() { since "$1" "$2" | grep -naE "$3" | head -n 1 | awk -F: -v b="$2" '{ print $1 + b }' | grep . || echo 0; }

SLOG=$TMP/vsrc.log SCTL=$TMP/src.ctl DCTL=$TMP/dst.ctl

# --- 1. source and destination ----------------------------------------------------------------
T0=$SECONDS
echo "--- $TEST_NAME: source link $RATE frames/s of $FSIZE B, $Q queue pair(s), pc (virtio-net-pci$( ((Q > 1)) && echo ' mq=on'), INTx), restart: $RESTART"
read -r -a SRC_ENV <<<"${MQ_SOURCE_ENV:-}"
vd_start vsrc "$SCTL" "$TMP/src.sock" "VDPAD_TEST_JOURNAL=$TMP/src.journal" "${SRC_ENV[@]}"
start_qemu src --socket "$TMP/src.sock" --connect --mac "$MAC" --queues "$Q" --ip "$GUEST_IP"
SRC_SHM=$SHM
wait_guest src 90
deadline=$((SECONDS + 30))
until [[ $(vd_q "$SCTL" 0) =~ ^direct\ [1-9] ]]; do
    alive vsrc || fail "source vdpad exited"
    ((SECONDS < deadline)) || fail "source RX ring 0 not direct with packets after 30 s: [$(vd_q "$SCTL" 0)]"
    sleep 0.2
done
if ((Q == 2)); then
    chan=$(GUEST_EXEC_TIMEOUT=20 guest_exec src 'ethtool -l eth0' 2>&1) ||
        fail "ethtool does not run in the guest (scripts/install-deps installs the ethtool package and build-initramfs copies it): $(tail -n 3 <<<"$chan")"
    chan_max=$(awk '/^Pre-set/ { p = 1 } /^Current/ { p = 2 } /^Combined:/ { if (p == 1) m = $2; else c = $2 } END { print m, c }' <<<"$chan")
    [[ $chan_max == "2 1" ]] || fail "guest channels (maximum, current) are '$chan_max', want '2 1': $(tr '\n' ' ' <<<"$chan")"
    say "guest eth0: 2 combined channels, 1 in use; source rings: 0 [$(vd_q "$SCTL" 0)] 2 [$(vd_q "$SCTL" 2)]"
fi

vd_start vdst "$DCTL" "$TMP/dst.sock"
port=$(free_port)
start_qemu dst --socket "$TMP/dst.sock" --connect --mac "$MAC" --queues "$Q" --ip "$GUEST_IP" --incoming "tcp:127.0.0.1:$port"
DST_SHM=$SHM
wait_for_socket "$TMP/dst.mon" 20 dst
deadline=$((SECONDS + 20))
until [[ $(vd_json "$DCTL" status 2>/dev/null | jq -r '.ports[0].connection' 2>/dev/null) == connected ]]; do
    ((SECONDS < deadline)) || fail "destination QEMU did not connect to the destination vdpad"
    alive dst || fail "destination QEMU exited"
    sleep 0.2
done
vd_json "$SCTL" status >"$TMP/src-status.json" || fail "vdpactl status failed"

# --- 2. the device stops -------------------------------------------------------------------------
mark=$(wc -l <"$SLOG")
if [[ $RESTART == link ]]; then
    # Ring 2 gets its buffers now (the second queue pair on, then off again: the guest leaves them
    # posted), so that both RX rings hold buffers from before the migration, as ring 0 does.
    # shellcheck disable=SC2016  # expanded by the guest's shell
    prefill='ethtool -L eth0 combined 2 && sleep 1 && ethtool -L eth0 combined 1 &&'
    ((Q == 1)) && prefill=
    GUEST_EXEC_TIMEOUT=30 guest_exec src "$prefill"'
        arp -s 10.0.2.99 02:00:00:00:00:99 && (ping -q -i 0.01 -s 512 10.0.2.99 </dev/null >/dev/null 2>&1 &) && echo ok' \
        >"$TMP/prefill.log" 2>&1 || fail "guest: ethtool -L 2 then 1, or starting TX, failed: $(tail -n 3 "$TMP/prefill.log")"
    ((Q == 2)) && say "ring 2 got its buffers (combined 2, then 1): [$(vd_q "$SCTL" 2)]"
    mark=$(wc -l <"$SLOG")
    reply=$(monitor src "set_link net0 off" 2>&1)
    [[ -n ${reply//[[:space:]]/} ]] && fail "set_link net0 off: $reply"
    what="set_link net0 off on the source monitor"
else
    # shellcheck disable=SC2016  # expanded by the guest's shell
    dev=$(GUEST_EXEC_TIMEOUT=20 guest_exec src 'basename "$(readlink /sys/class/net/eth0/device)"' 2>&1 | tail -n 1)
    [[ $dev =~ ^virtio[0-9]+$ ]] || fail "cannot find eth0's virtio device in the guest: '$dev'"
    GUEST_EXEC_TIMEOUT=20 guest_exec src "echo $dev > /sys/bus/virtio/drivers/virtio_net/unbind" >"$TMP/unbind.log" 2>&1 ||
        fail "unbinding virtio_net failed: $(cat "$TMP/unbind.log")"
    what="the guest unbound virtio_net from $dev"
fi
deadline=$((SECONDS + 20))
until since "$SLOG" "$mark" | grep -qaE "\\] ring $((2 * Q - 1)) stopped at"; do
    ((SECONDS < deadline)) || fail "QEMU did not stop ring $((2 * Q - 1)) within 20 s after $what"
    sleep 0.1
done
since "$SLOG" "$mark" | grep -qaE '\] ring 0 stopped at' || fail "ring 0 did not stop after $what"
say "$what: QEMU stopped the rings"

# --- 3. slow migration --------------------------------------------------------------------------
bw=$(monitor src "info migrate_parameters" 2>&1 | sed -n 's/^max-bandwidth: *\([0-9]*\).*/\1/p')
reply=$(monitor src "migrate_set_parameter max-bandwidth $SLOW_BW" 2>&1)
[[ -n ${reply//[[:space:]]/} ]] && say "migrate_set_parameter max-bandwidth: $(head -c 200 <<<"$reply")"
mark=$(wc -l <"$SLOG")
t_mig=$SECONDS
monitor src "migrate -d tcp:127.0.0.1:$port" >"$TMP/migrate-cmd.log" 2>&1
deadline=$((SECONDS + 20))
until [[ $(mig_status) == active ]]; do
    ((SECONDS < deadline)) || fail "migration not active 20 s after migrate: status '$(mig_status)'"
    sleep 0.2
done
say "migration active (max-bandwidth $SLOW_BW)"

# --- 4. the device starts again, while the migration runs ---------------------------------------
if [[ $RESTART == link ]]; then
    reply=$(monitor src "set_link net0 on" 2>&1)
    [[ -n ${reply//[[:space:]]/} ]] && fail "set_link net0 on: $reply"
else
    # shellcheck disable=SC2016  # expanded by the guest's shell
    GUEST_EXEC_TIMEOUT=40 guest_exec src "echo $dev > /sys/bus/virtio/drivers/virtio_net/bind"'
        i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do usleep 100000; i=$((i + 1)); done
        ip link set eth0 up && ip addr add '"$GUEST_IP"' dev eth0 && arp -s 10.0.2.99 02:00:00:00:00:99 &&
        (ping -q -i 0.01 -s 512 10.0.2.99 </dev/null >/dev/null 2>&1 &) && echo rebound' >"$TMP/bind.log" 2>&1 ||
        fail "rebinding virtio_net in the guest failed: $(tail -n 5 "$TMP/bind.log")"
fi
# Ring 0 receives through the relay (judged after the migration from its counters; this short
# wait does not fail: a daemon that leaves it direct must still meet the oracle, and a long wait
# would let the guest recycle the buffers whose loss would show in the RAM files).
deadline=$((SECONDS + 3))
until [[ $(vd_q "$SCTL" 0) =~ ^relay\ [0-9]+\ [1-9] ]]; do
    ((SECONDS < deadline)) || break
    sleep 0.1
done
say "device started again during the migration: ring 0 [$(vd_q "$SCTL" 0)] (mode packets relayed pagesMarked switchovers gapMicros faults)"

# --- 5. the second queue pair ------------------------------------------------------------------
mark_eth=$(wc -l <"$SLOG")
if ((Q == 2)); then
    chan=$(GUEST_EXEC_TIMEOUT=20 guest_exec src 'ethtool -L eth0 combined 2 && ethtool -l eth0' 2>&1) ||
        fail "ethtool -L eth0 combined 2 failed in the guest: $(tail -n 3 <<<"$chan")"
    cur=$(awk '/^Current/ { p = 1 } p && /^Combined:/ { print $2 }' <<<"$chan")
    [[ $cur == 2 ]] || fail "after ethtool -L the guest uses '$cur' channels, not 2"
    deadline=$((SECONDS + 25))
    while :; do
        read -r -a R2 <<<"$(vd_q "$SCTL" 2)"
        [[ ${R2[0]:-} == relay && ${R2[2]:-0} -ge $RING2_MIN ]] && break
        ((SECONDS < deadline)) || { problem "ring 2 did not relay $RING2_MIN frames within 25 s of ethtool -L: [${R2[*]:-}]"; break; }
        sleep 0.3
    done
fi
((Q == 1)) && sleep 1  # frames on ring 0 while the migration runs
st=$(mig_status)
((Q == 2)) && say "after ethtool -L: ring 2 [$(vd_q "$SCTL" 2)]; migration $st after $((SECONDS - t_mig)) s"
[[ $st == active ]] || fail "the migration ended ($st) before the guest's steps were done: lower MQ_SLOW_BANDWIDTH"

# --- 6. completion ---------------------------------------------------------------------------------
# Full bandwidth again, but first MQ_SETTLE_SECONDS with a tiny downtime-limit, so that QEMU keeps
# iterating (dirty syncs) while both RX rings receive: pages it has already sent then get the
# device's frames, and only the marks make it send them again (without this the migration
# converges right after its first pass and a missing mark rarely shows in the RAM files).
dl=$(monitor src "info migrate_parameters" 2>&1 | sed -n 's/^downtime-limit: *\([0-9]*\).*/\1/p')
# (downtime-limit first: at full bandwidth QEMU would converge at once)
if ((SETTLE > 0)); then
    monitor src "migrate_set_parameter downtime-limit $SETTLE_DL" >/dev/null 2>&1
    monitor src "migrate_set_parameter max-bandwidth ${bw:-134217728}" >/dev/null 2>&1
    s0=$(info_field "$(monitor src "info migrate" 2>&1)" "dirty sync count")
    deadline=$((SECONDS + SETTLE))
    while ((SECONDS < deadline)); do
        info=$(monitor src "info migrate" 2>&1)
        [[ $(info_field "$info" "Migration status") == active ]] || break
        (($(info_field "$info" "dirty sync count") >= ${s0:-0} + SETTLE_SYNCS)) && break
        sleep 0.2
    done
    info=$(monitor src "info migrate" 2>&1)
    say "settle: up to ${SETTLE} s or $SETTLE_SYNCS dirty syncs at downtime-limit $SETTLE_DL ms: dirty syncs ${s0:-?} -> $(info_field "$info" "dirty sync count"), status $(info_field "$info" "Migration status"); ring 0 [$(vd_q "$SCTL" 0)] ring 2 [$(vd_q "$SCTL" 2)]"
    monitor src "migrate_set_parameter downtime-limit ${dl:-300}" >/dev/null 2>&1
else
    monitor src "migrate_set_parameter max-bandwidth ${bw:-134217728}" >/dev/null 2>&1
fi
deadline=$((SECONDS + 60))
while :; do
    info=$(monitor src "info migrate" 2>&1); st=$(info_field "$info" "Migration status")
    case $st in completed|failed|cancelled) break ;; esac
    ((SECONDS < deadline)) || { st="timeout ($st)"; break; }
    sleep 0.2
done
printf '%s\n' "$info" >"$TMP/info-migrate.log"
[[ $st == completed ]] || fail "migration did not complete: '$st': $(tr '\n' ' ' <<<"$info" | head -c 600)"
total=$(info_field "$info" "total time") downtime=$(info_field "$info" "downtime")
transferred=$(info_field "$info" "transferred ram") syncs=$(info_field "$info" "dirty sync count")
say "migration completed: total $total ms, downtime $downtime ms, transferred $transferred kB, dirty syncs $syncs"
A0=$(vd_q "$SCTL" 0) A2=$(vd_q "$SCTL" 2)
say "source rings after: 0 [$A0] 2 [$A2]; relay: $(vd_json "$SCTL" stats 2>/dev/null | jq -c '.ports[0].relay' 2>/dev/null)"
read -r -a RA0 <<<"$A0"
[[ ${RA0[4]:-0} -ge 1 && ${RA0[2]:-0} -gt 0 && ${RA0[3]:-0} -gt 0 && ${RA0[6]:-1} == 0 ]] ||
    problem "source ring 0 did not go through the relay without faults: [$A0] (want switchovers >= 1, relayed > 0, pagesMarked > 0, faults 0)"
if ((Q == 2)); then
    read -r -a RA2 <<<"$A2"
    [[ ${RA2[4]:-0} -ge 1 && ${RA2[2]:-0} -ge $RING2_MIN && ${RA2[3]:-0} -gt 0 && ${RA2[6]:-1} == 0 ]] ||
        problem "source ring 2 did not go through the relay without faults: [$A2] (want switchovers >= 1, relayed >= $RING2_MIN, pagesMarked > 0, faults 0)"
fi

# --- the path taken (vdpad's log, from the migrate command on) ----------------------------------
L_ON=$(line_no "$SLOG" "$mark" 'dirty logging \(LOG_ALL\) on')
L_HELD0=$(line_no "$SLOG" "$mark" 'ring 0: started while LOG_ALL is on but before SET_LOG_BASE: held until the log arrives')
L_LOG=$(line_no "$SLOG" "$mark" 'dirty log set:')
L_RELAY0=$(line_no "$SLOG" "$mark" 'ring 0: switched to the relay')
L_KICK2=$(line_no "$SLOG" "$mark" 'SET_VRING_KICK vringFile\(index: 2,')
L_RELAY2=$(line_no "$SLOG" "$mark" 'ring 2: switched to the relay')
L_EN2=$(line_no "$SLOG" "$mark_eth" 'SET_VRING_ENABLE .*index: 2, num: 1\)')
say "vdpad log lines: LOG_ALL on $L_ON, ring 0 held $L_HELD0, first log $L_LOG, ring 0 relayed $L_RELAY0, ring 2 kick $L_KICK2, ring 2 relayed $L_RELAY2, ring 2 enabled (ethtool) $L_EN2"
since "$SLOG" "$mark" | grep -aE 'LOG_ALL|held until|dirty log set|switched to the relay|back on the direct|stopped at' |
    sed 's/^[^ ]* //' | head -n 30 >"$TMP/path.txt"
sed 's/^/      /' "$TMP/path.txt"
((L_ON > 0)) || problem "no 'dirty logging (LOG_ALL) on' after the migrate command"
if ((L_HELD0 > 0 && L_LOG > L_HELD0 && L_ON <= L_HELD0)); then
    say "path taken: ring 0 started with LOG_ALL on before SET_LOG_BASE and was held"
else
    problem "ring 0 was not held for the log (LOG_ALL on at line $L_ON, held at $L_HELD0, log at $L_LOG): the path under test was not taken"
fi
((L_RELAY0 > L_LOG && L_LOG > 0)) || problem "ring 0 not switched to the relay once the log arrived (log at $L_LOG, switch at $L_RELAY0)"
if ((Q == 2)); then
    ((L_RELAY2 > L_KICK2 && L_KICK2 > L_ON && L_ON > 0)) ||
        problem "ring 2 was not started with LOG_ALL on and switched to the relay (LOG_ALL on $L_ON, kick $L_KICK2, switch $L_RELAY2)"
    ((L_EN2 > L_RELAY2)) || problem "ring 2 was not enabled (ethtool -L) after it was relayed (enable at $L_EN2, relay at $L_RELAY2)"
fi

# --- 7. the oracle -------------------------------------------------------------------------------
orc=0
python3 "$ORACLE" --src "$SRC_SHM" --dst "$DST_SHM" --journal "$TMP/src.journal" --vdpad-log "$SLOG" \
    --status "$TMP/src-status.json" --mac "$MAC" --vars "$TMP/oracle.vars" >"$TMP/oracle.txt" 2>&1 || orc=$?
sed 's/^/    oracle: /' "$TMP/oracle.txt"
if [[ ${MIGRATION_KEEP_RAM:-0} == 1 && ${VDPA_KEEP_TMP:-0} == 1 ]]; then
    cp "$SRC_SHM" "$TMP/src.ram"; cp "$DST_SHM" "$TMP/dst.ram"
fi
((orc <= 1)) || fail "oracle error (status $orc)"
o_jlines=0 o_unmarked=0 o_jbad_lines=0 o_idx_bad=0 o_pages=0 o_pages_used=0 o_pages_device=0 o_pages_driver=0
o_pages_neither=0 o_pages_superseded=0 o_pages_framelike=0 o_pages_frame_lost=0 o_journal_ok=0
o_jlines_ring0=0 o_jlines_ring2=0 o_verified_ring0=0 o_verified_ring2=0 o_jbad_ring2=0
# shellcheck disable=SC1091
source "$TMP/oracle.vars"
((orc == 0 && o_journal_ok == 1)) ||
    problem "JOURNAL CHECK FAILED: $o_unmarked of $o_jlines lines marked=0, $o_jbad_lines verified device ranges differ on the destination, $o_idx_bad used indexes off"
((o_jlines_ring0 > 0)) || problem "no journal line for ring 0: its frames were not relayed while logging"
((Q == 1 || o_jlines_ring2 > 0)) || problem "no journal line for ring 2: the second queue pair's frames were not relayed while logging"
((o_pages_used == 0)) || problem "$o_pages_used differing pages in used rings"
((o_pages_device == 0)) || problem "$o_pages_device differing pages hold device writes the destination lacks"
((o_pages_frame_lost == 0)) || problem "$o_pages_frame_lost differing pages hold frame payload that no journal line covers (an RX ring ran unlogged)"
qloss=$((o_pages_neither + o_pages_driver + o_pages_superseded - o_pages_frame_lost))
say "journal: ring 0 $o_jlines_ring0 lines ($o_verified_ring0 verified), ring 2 $o_jlines_ring2 lines ($o_verified_ring2 verified, $o_jbad_ring2 different); pages differing $o_pages (device $o_pages_device, used $o_pages_used, frame payload lost $o_pages_frame_lost, other frame-like $o_pages_framelike; QEMU's: $qloss)"

# --- 8. the destination ------------------------------------------------------------------------------
monitor dst cont >/dev/null 2>&1
sleep 1
d0a=$(vd_q "$DCTL" 0) d2a=$(vd_q "$DCTL" 2) g1=$(guest_ctr "$TMP/dst.cmd" 6)
sleep 2
d0b=$(vd_q "$DCTL" 0) d2b=$(vd_q "$DCTL" 2) g2=$(guest_ctr "$TMP/dst.cmd" 6)
say "destination: ring 0 [$d0a] -> [$d0b]; ring 2 [$d2a] -> [$d2b]; guest rx tx [$g1] -> [$g2]"
dest_why=()
read -r -a X0 <<<"$d0a"; read -r -a Y0 <<<"$d0b"; read -r -a X2 <<<"$d2a"; read -r -a Y2 <<<"$d2b"
read -r -a G1 <<<"$g1"; read -r -a G2 <<<"$g2"
[[ ${Y0[0]:-} == direct ]] || dest_why+=("ring 0 not direct (${Y0[0]:-?})")
((${Y0[1]:-0} > ${X0[1]:-0})) || dest_why+=("ring 0 packets did not increase")
((${Y0[6]:-0} == 0)) || dest_why+=("ring 0 device faults")
if ((Q == 2)); then
    [[ ${Y2[0]:-} == direct ]] || dest_why+=("ring 2 not direct (${Y2[0]:-?})")
    ((${Y2[1]:-0} > ${X2[1]:-0})) || dest_why+=("ring 2 packets did not increase")
    ((${Y2[6]:-0} == 0)) || dest_why+=("ring 2 device faults")
fi
[[ ${G1[0]:-x} =~ ^[0-9]+$ && ${G2[0]:-x} =~ ^[0-9]+$ && ${G2[0]} -gt ${G1[0]} ]] || dest_why+=("guest rx_packets did not increase")
grep -aqE 'Kernel panic|BUG:|Oops' "$TMP/dst.serial.log" 2>/dev/null && dest_why+=("guest console: $(grep -aE 'Kernel panic|BUG:|Oops' "$TMP/dst.serial.log" | head -n 1)")
if ((${#dest_why[@]} == 0)); then
    dest="destination keeps working ($Q queue pair(s))"
elif ((qloss > 0)); then
    dest="destination NOT working (${dest_why[*]}), not judged: QEMU lost $qloss pages of guest-CPU writes"
else
    dest="destination NOT working: ${dest_why[*]}"
    problem "clean migration but the $dest"
fi
say "$dest"

stop_qemu dst; stop_qemu src
say "run time $((SECONDS - T0)) s"
if ((${#PROBLEMS[@]})); then
    fail "${#PROBLEMS[@]} problem(s): $(printf '%s; ' "${PROBLEMS[@]}")"
fi
pass "ring 0 held for the log then relayed$( ((Q == 2)) && echo ', ring 2 relayed and enabled during the migration'); ${total} ms, downtime ${downtime} ms; journal ring 0 $o_jlines_ring0 / ring 2 $o_jlines_ring2 lines, no device byte lost; QEMU losses: $qloss pages"
