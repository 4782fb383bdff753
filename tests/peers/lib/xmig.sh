# shellcheck shell=bash disable=SC2034
# Helpers for the cross-backend live-migration tests (qemu-migration-from-dpdk,
# qemu-migration-to-dpdk, qemu-migration-features). Source it after lib/common.sh, then call
# xm_init. One guest at a time migrates between two backends: a vdpad port or DPDK 22.11's
# vhost PMD (testpmd --vdev net_vhost0 in icmpecho mode: it answers the guest's ARP requests
# and pings, so traffic out of the guest comes back).

XM_MAC=52:54:00:12:34:56
XM_IP=10.0.2.15/24
XM_PEER_IP=10.0.2.2            # the guest pings it: icmpecho answers, a vdpad link eats it
XM_PEER_MAC=02:00:00:00:00:02  # static ARP entry in the guest (vdpad links do not answer ARP)
ORACLE=$PEERS_DIR/lib/migration-oracle.py
XM_STRICT_DEST=${XMIG_STRICT_DEST:-0}
FSIZE=${XMIG_FRAME_SIZE:-1400}          # frame size of a vdpad link=source
PING_INTERVAL=${XMIG_PING_INTERVAL:-0.01}  # seconds between the guest's pings (xm_guest_ping)

# xm_init NAME LIMIT [testpmd]: peer_init NAME LIMIT, then the guest, vdpad, jq (and testpmd)
# must be there. Empties SUMMARY and the run counters QEMU_LOSS_RUNS and DEST_JUDGED.
xm_init() {
    peer_init "$1" "$2"
    require_guest
    [[ ${3:-} == testpmd ]] && require_testpmd
    resolve_bins
    command -v jq >/dev/null || fail "jq missing: run scripts/install-deps"
    QEMU_LOSS_RUNS=0 DEST_JUDGED=0 SUMMARY=()
}

# xm_summary LOSS-WHAT NONE-JUDGED: after the runs, SUMMARY's lines, then "LOSS-WHAT:
# QEMU_LOSS_RUNS of RUNS; destination judged on DEST_JUDGED"; with XMIG_STRICT_DEST=1 the test
# fails "NONE-JUDGED: ..." when no run was judged.
xm_summary() {
    local s
    echo "--- $TEST_NAME: summary"
    for s in "${SUMMARY[@]}"; do say "$s"; done
    say "$1: $QEMU_LOSS_RUNS of $RUNS; destination judged on $DEST_JUDGED"
    if ((DEST_JUDGED == 0)) && [[ $XM_STRICT_DEST == 1 ]]; then
        fail "$2: the destination check was judged on none (XMIG_STRICT_DEST=1)"
    fi
}

# xm_names HEX: the feature bits of HEX by name ('+'-separated, names as vdpad's
# describeFeatures prints them; unknown bits as bitN).
xm_names() {
    python3 - "$1" <<'EOF'
import sys
names = {0: "CSUM", 1: "GUEST_CSUM", 2: "CTRL_GUEST_OFFLOADS", 3: "MTU", 5: "MAC", 6: "GSO",
         7: "GUEST_TSO4", 8: "GUEST_TSO6", 9: "GUEST_ECN", 10: "GUEST_UFO", 11: "HOST_TSO4",
         12: "HOST_TSO6", 13: "HOST_ECN", 14: "HOST_UFO", 15: "MRG_RXBUF", 16: "STATUS",
         17: "CTRL_VQ", 18: "CTRL_RX", 19: "CTRL_VLAN", 20: "CTRL_RX_EXTRA", 21: "GUEST_ANNOUNCE",
         22: "MQ", 23: "CTRL_MAC_ADDR", 24: "NOTIFY_ON_EMPTY", 26: "LOG_ALL", 27: "ANY_LAYOUT",
         28: "INDIRECT_DESC", 29: "EVENT_IDX", 30: "PROTOCOL_FEATURES", 32: "VERSION_1",
         33: "ACCESS_PLATFORM", 34: "RING_PACKED", 35: "IN_ORDER"}
v = int(sys.argv[1], 16)
print("+".join(names.get(b, f"bit{b}") for b in range(64) if v >> b & 1) or "none")
EOF
}

# --- backends -------------------------------------------------------------------------------

# xm_vdpad NAME CONTROL [ENV=VALUE...] -- PORT-SPEC...: a vdpad (debug log in $TMP/NAME.log)
# with these --port options; waits for its control socket and every port's socket.
xm_vdpad() {
    local name=$1 ctl=$2 envs=() ports=() spec
    shift 2
    while (($#)) && [[ $1 != -- ]]; do envs+=("$1"); shift; done
    shift
    for spec in "$@"; do ports+=(--port "$spec"); done
    spawn "$name" env "${envs[@]}" "$VDPAD" --control "$ctl" --log-level "${VDPA_LOG_LEVEL:-debug}" "${ports[@]}"
    wait_for_socket "$ctl" 20 "$name"
    for spec in "$@"; do
        spec=${spec#socket=}
        wait_for_socket "${spec%%,*}" 20 "$name"
    done
}

# xm_port CONTROL PORT-ID FILTER: jq FILTER applied to that port's object in `vdpactl stats`.
xm_port() {
    vd_json "$1" stats 2>/dev/null | jq -r --arg p "$2" ".ports[] | select(.id == \$p) | $3" 2>/dev/null
}
# xm_rxq CONTROL PORT-ID: vd_q of the port's RX queue 0.
xm_rxq() { vd_q "$1" 0 "$2"; }
# xm_status CONTROL PORT-ID FILTER: jq FILTER on the port's object in `vdpactl status`.
xm_status() {
    vd_json "$1" status 2>/dev/null | jq -r --arg p "$2" ".ports[] | select(.id == \$p) | $3" 2>/dev/null
}
# xm_faults CONTROL PORT-ID: sum of the port's queue faults.
xm_faults() { xm_port "$1" "$2" '[.queues[].faults] | add'; }

# xm_dpdk NAME SOCKET: testpmd with DPDK's vhost PMD (net_vhost0, the socket server) in icmpecho
# mode, main lcore 0 (forwarding on lcore 1), statistics every second in $TMP/NAME.log.
# XMIG_DPDK_VDEV_ARGS adds net_vhost0 options (e.g. ",tso=1": the PMD then offers HOST_TSO4/6,
# which its default tso=0 leaves out).
xm_dpdk() {
    start_testpmd_vhost "$1" "$2" "" icmpecho "${XMIG_DPDK_VDEV_ARGS:-}"
    wait_for_socket "$2" 30 "$1"
}
# xm_dpdk_ctr NAME: "rx tx" packets of testpmd NAME's port 0, from its latest statistics screen.
xm_dpdk_ctr() {
    local t rx tx
    t=$(sed 's/\x1b\[[0-9;]*[A-Za-z]//g' "$TMP/$1.log" 2>/dev/null | grep -a -E '^ *(RX|TX)-packets: *[0-9]+ +(RX-missed|TX-errors)')
    rx=$(grep -a 'RX-packets' <<<"$t" | tail -n 1 | awk '{ print $2 }')
    tx=$(grep -a 'TX-packets' <<<"$t" | tail -n 1 | awk '{ print $2 }')
    echo "${rx:-?} ${tx:-?}"
}
# xm_dpdk_features NAME: the virtio features DPDK's vhost PMD negotiated last (hex), from its log.
xm_dpdk_features() {
    sed -n 's/.*negotiated Virtio features: \(0x[0-9a-fA-F]*\).*/\1/p' "$TMP/$1.log" | tail -n 1
}

# --- QEMU -----------------------------------------------------------------------------------

# xm_virtio_path VM: QOM path of the guest's virtio-net device (`info virtio`).
xm_virtio_path() { monitor "$1" "info virtio" 2>/dev/null | awk '/\[virtio-net\]/ { print $1; exit }'; }

# xm_qemu_features VM SECTION: the feature names QEMU lists under "SECTION features:" of
# `info virtio-status` (Guest: what the guest acked; Host: what this QEMU and its backend
# allow), short names ('+'-separated, QEMU's VIRTIO_NET_F_/VIRTIO_F_/... prefixes dropped).
# Only on a stopped VM or one whose device QEMU does not need to ask the backend about (it
# sends the backend nothing for this command).
xm_qemu_features() {
    local path
    path=$(xm_virtio_path "$1") || return 1
    [[ -n $path ]] || return 1
    monitor "$1" "info virtio-status $path" 2>/dev/null | awk -v want="$2 features:" '
        /^  [A-Za-z]+ features:/ { on = (index($0, want) > 0); next }
        /^  [A-Za-z]/ { on = 0 }
        on && /:/ { sub(/^[ \t]+/, ""); sub(/:.*/, "");
                    sub(/^(VIRTIO_NET_F_|VIRTIO_RING_F_|VIRTIO_F_|VHOST_USER_F_|VHOST_F_)/, "");
                    if ($0 != "") names = names (names == "" ? "" : "+") $0 }
        END { print names }'
}

# xm_rings TAG VM FILE: the oracle's --rings lines (index size desc avail used last_avail_idx) for
# rings 0 and 1, from QEMU's `info virtio-queue-status` on the stopped source (after the
# migration completed: QEMU has stopped the vhost device and recorded GET_VRING_BASE's answer
# as last_avail_idx); fails the test (naming TAG) without them. Never on a running vhost
# device: QEMU 7.2 would ask the backend for the ring base, which stops the ring. Also sets
# XM_RING_NOTE (used_idx against last_avail_idx).
XM_RING_NOTE=
xm_rings() {
    xm_read_rings "$2" "$3" ||
        fail "$1: no ring addresses from QEMU (info virtio-queue-status): $(tail -c 300 "$TMP/$2-queue-status.log" 2>/dev/null)"
}
xm_read_rings() {
    local vm=$1 out=$2 path q st
    path=$(xm_virtio_path "$vm")
    [[ -n $path ]] || return 1
    : >"$out"
    XM_RING_NOTE=
    for q in 0 1; do
        st=$(monitor "$vm" "info virtio-queue-status $path $q" 2>&1)
        printf '%s\n' "$st" >>"$TMP/$vm-queue-status.log"
        awk -v q="$q" '
            $1 == "num:" { n = $2 } $1 == "desc:" { d = $2 } $1 == "avail:" { a = $2 }
            $1 == "used:" { u = $2 } $1 == "last_avail_idx:" { l = $2 } $1 == "used_idx:" { x = $2 }
            END { if (n == "" || d == "" || u == "") exit 1; print q, n, d, a, u, l }' <<<"$st" >>"$out" || return 1
        XM_RING_NOTE+="ring $q: last_avail_idx $(awk '$1 == "last_avail_idx:" { print $2 }' <<<"$st") used_idx $(awk '$1 == "used_idx:" { print $2 }' <<<"$st"); "
    done
}

# xm_wait_guest_rx VM SECONDS: the guest's rx_packets grow within SECONDS.
xm_wait_guest_rx() {
    local vm=$1 deadline=$((SECONDS + $2)) c0 c
    c0=$(guest_ctr "$TMP/$vm.cmd" 10 | awk '{ print $1 }')
    while :; do
        sleep 0.5
        c=$(guest_ctr "$TMP/$vm.cmd" 10 | awk '{ print $1 }')
        [[ $c =~ ^[0-9]+$ && $c0 =~ ^[0-9]+$ ]] && ((c > c0)) && return 0
        ((SECONDS < deadline)) || return 1
    done
}

# xm_guest_ping VM INTERVAL SIZE: the guest pings XM_PEER_IP (static ARP entry) in the
# background for the rest of its life.
xm_guest_ping() {
    GUEST_EXEC_TIMEOUT=20 guest_exec "$1" \
        "arp -s $XM_PEER_IP $XM_PEER_MAC && (ping -q -i $2 -s $3 $XM_PEER_IP </dev/null >/dev/null 2>&1 &) && echo ping-started" \
        >"$TMP/$1-ping-start.log" 2>&1 || fail "$1: could not start the guest's ping: $(tail -c 300 "$TMP/$1-ping-start.log")"
}

# xm_wait_incoming VM: the destination QEMU is up and waiting (its monitor answers).
xm_wait_incoming() {
    wait_for_socket "$TMP/$1.mon" 20 "$1"
}

# xm_migrate TAG SRC-VM DST-VM PORT LIMIT [WATCH-CMD]: `migrate -d tcp:...` on SRC-VM, then
# `info migrate` every 0.2 s until completed/failed/cancelled; WATCH-CMD (eval'd each round) may watch the source backend. Sets MIG_STATUS, MIG_INFO,
# MIG_TOTAL, MIG_DOWNTIME; keeps the last `info migrate` in $TMP/TAG-info-migrate.log.
MIG_STATUS='' MIG_INFO='' MIG_TOTAL='' MIG_DOWNTIME=''
xm_migrate() {
    local tag=$1 src=$2 dst=$3 port=$4 deadline=$((SECONDS + $5)) watch=${6:-}
    monitor "$src" "migrate -d tcp:127.0.0.1:$port" >"$TMP/$tag-migrate-cmd.log" 2>&1
    [[ -n $(tr -d "[:space:]" <"$TMP/$tag-migrate-cmd.log") ]] && say "$tag: migrate: $(head -c 300 "$TMP/$tag-migrate-cmd.log")"
    MIG_STATUS=
    while :; do
        MIG_INFO=$(monitor "$src" "info migrate" 2>&1)
        MIG_STATUS=$(info_field "$MIG_INFO" "Migration status")
        [[ -n $watch ]] && eval "$watch"
        case $MIG_STATUS in completed|failed|cancelled) break ;; esac
        ((SECONDS < deadline)) || { MIG_STATUS="timeout ($MIG_STATUS)"; break; }
        sleep 0.2
    done
    printf '%s\n' "$MIG_INFO" >"$TMP/$tag-info-migrate.log"
    MIG_TOTAL=$(info_field "$MIG_INFO" "total time") MIG_DOWNTIME=$(info_field "$MIG_INFO" "downtime")
}

# xm_migrate_ok TAG SRC-VM DST-VM PORT LIMIT [WATCH-CMD]: xm_migrate, which must end
# "completed" (else the test fails with the source's `info migrate` and the destination's error).
xm_migrate_ok() {
    xm_migrate "$@"
    [[ $MIG_STATUS == completed ]] ||
        fail "$1: migration did not complete: status '$MIG_STATUS': $(tr '\n' ' ' <<<"$MIG_INFO" | head -c 500); destination: $(xm_load_error "$3")"
}

# xm_load_error VM: QEMU's own error lines from a destination that failed to load (its log).
xm_load_error() {
    grep -a -E 'qemu-system[^:]*: ' "$TMP/$1.log" 2>/dev/null | sed 's/^qemu-system[^:]*: //' | head -n 6 | tr '\n' ' '
}

# xm_explain_features VM: for a destination QEMU that refused the device state with
# "Features 0x... unsupported. Allowed features: 0x...", the bits it refused, by name.
xm_explain_features() {
    local line want allowed
    line=$(grep -a -o -E 'Features 0x[0-9a-fA-F]+ unsupported\. Allowed features: 0x[0-9a-fA-F]+' "$TMP/$1.log" | head -n 1)
    [[ -n $line ]] || return 1
    want=$(sed -E 's/Features (0x[0-9a-fA-F]+).*/\1/' <<<"$line")
    allowed=$(sed -E 's/.*Allowed features: (0x[0-9a-fA-F]+)/\1/' <<<"$line")
    echo "the guest acked $(xm_names "$want"); the destination allows $(xm_names "$allowed"); missing: $(xm_names "$(printf '0x%x' $((want & ~allowed)))")"
}

# xm_dest_loaded TAG DST-VM: fail unless the destination QEMU is alive and has loaded the state
# (paused, waiting for cont), with its own error and the refused features otherwise (and
# XM_LOAD_HINT, which a test may set, when QEMU refused features).
XM_LOAD_HINT=
xm_dest_loaded() {
    local tag=$1 vm=$2 st i
    for ((i = 0; i < 50; i++)); do
        alive "$vm" || break
        st=$(monitor "$vm" "info status" 2>/dev/null)
        [[ $st == *paused* && $st != *inmigrate* ]] && break
        sleep 0.1
    done
    if ! alive "$vm"; then
        local why; why=$(xm_explain_features "$vm" || true)
        fail "$tag: the destination QEMU refused the migration and exited: $(xm_load_error "$vm")${why:+ ($why${XM_LOAD_HINT:+; $XM_LOAD_HINT})}"
    fi
    [[ $st == *paused* && $st != *inmigrate* ]] || fail "$tag: destination QEMU not loaded and paused after the migration: '$st'"
}

# xm_oracle TAG SRC-RAM DST-RAM RINGS [--journal FILE]: run lib/migration-oracle.py, print its
# report (indented), source its o_* variables (defaults 0). Sets ORACLE_RC.
ORACLE_RC=0
xm_oracle() {
    local tag=$1 src=$2 dst=$3 rings=$4
    shift 4
    ORACLE_RC=0
    python3 "$ORACLE" --src "$src" --dst "$dst" --rings "$rings" --mac "$XM_MAC" --vars "$TMP/$tag.vars" "$@" \
        >"$TMP/$tag-oracle.txt" 2>&1 || ORACLE_RC=$?
    sed 's/^/    '"$tag"': /' "$TMP/$tag-oracle.txt"
    ((ORACLE_RC <= 1)) || fail "$tag: oracle error (status $ORACLE_RC)"
    o_jlines=0 o_unmarked=0 o_verified=0 o_jbad_lines=0 o_pages=0 o_pages_used=0 o_pages_device=0
    o_pages_driver=0 o_pages_neither=0 o_pages_framelike=0 o_journal_ok=0 o_idx_bad=0
    o_pages_superseded=0 o_pages_frame_lost=0 o_pages_icmp_lost=0 o_rings_located=0
    # shellcheck disable=SC1090
    source "$TMP/$tag.vars"
    ((o_rings_located)) || fail "$tag: the oracle could not locate the rings (see its report)"
    if [[ ${MIGRATION_KEEP_RAM:-0} == 1 && ${VDPA_KEEP_TMP:-0} == 1 ]]; then
        cp "$src" "$TMP/$tag-src.ram"; cp "$dst" "$TMP/$tag-dst.ram"
    fi
}

# xm_journal_checks TAG: after xm_oracle --journal with vdpad as the source backend, the checks
# that apply in full: the journal check, no differing byte in a used ring or a device range the
# destination lacks, no frame payload lost outside the journal.
xm_journal_checks() {
    ((ORACLE_RC == 0 && o_journal_ok == 1)) ||
        fail "$1: JOURNAL CHECK FAILED: $o_unmarked of $o_jlines lines marked=0, $o_jbad_lines verified device ranges differ on the destination, $o_idx_bad used indexes off the ring bases (see the report above)"
    ((o_pages_used == 0)) || fail "$1: $o_pages_used differing pages in used rings (only the device side writes there)"
    ((o_pages_device == 0)) || fail "$1: $o_pages_device differing pages hold device writes the destination lacks"
    ((o_pages_frame_lost == 0)) || fail "$1: $o_pages_frame_lost differing pages hold frame payload the device wrote outside every journaled range"
}

# xm_exec VM SECONDS COMMAND: run COMMAND in the guest without waiting for the console's
# "command channel ready" (a migrated guest's console log never says it again).
xm_exec() { "$GUEST_DIR/guest-exec" --timeout "$2" "$TMP/$1.cmd" "$3"; }

# xm_guest_alive VM: the guest answers on its command channel; prints "rx tx".
xm_guest_alive() { guest_ctr "$TMP/$1.cmd" 6; }
