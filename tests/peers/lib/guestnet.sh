# shellcheck shell=bash disable=SC2034
# Helpers for the QEMU data tests (qemu-tap, qemu-tap-offload, qemu-wire, qemu-wire-offload):
# TCP transfers to, from and between guests, a vdpad TAP in a namespace of the test, counter
# snapshots, and the offload checks. Source it after lib/common.sh.

TCP_PY=$PEERS_DIR/lib/tcp.py

# guests_no_ipv6 VM...: IPv6 off in each guest, so that only the test's own frames flow.
guests_no_ipv6() {
    local vm
    for vm in "$@"; do
        # shellcheck disable=SC2016  # expanded by the guest's shell
        guest_exec "$vm" 'for f in /proc/sys/net/ipv6/conf/*/disable_ipv6; do echo 1 > $f; done 2>/dev/null; true' >/dev/null
    done
}

# elapsed T0: seconds since T0 (a `date +%s.%N`), two decimals.
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }

# kib_rate BYTES SECONDS: KiB per second, rounded.
kib_rate() { awk -v n="$1" -v s="$2" 'BEGIN { printf "%.0f", n / 1024 / s }'; }

# avg BYTES PACKETS: bytes per packet, rounded down (0 with no packets).
avg() { (($2 > 0)) && echo $(($1 / $2)) || echo 0; }

# qdelta P0 P1 QUEUE FIELD: growth of a loaded counter (load_stats) from prefix P0 to P1.
qdelta() { echo $(($(qstat "$2" "$3" "$4") - $(qstat "$1" "$3" "$4"))); }

# --- TCP in the guests (busybox nc) ---------------------------------------------------------

# guest_listen VM PORT: nc -l on PORT in the guest, what it receives in /tmp/recv, its status in
# /tmp/nc.rc when it ends; returns once the port listens (fails the test otherwise). nc's stdin
# stays open (a sleep): at EOF on stdin nc shuts its sending side, which the sender would take
# as the end.
guest_listen() {
    guest_exec "$1" "rm -f /tmp/recv /tmp/nc.rc; (sleep 150 | (nc -l -p $2 > /tmp/recv 2>/tmp/nc.err; echo \$? > /tmp/nc.rc)) </dev/null >/dev/null 2>&1 &
        i=0; while ! netstat -ltn | grep -q \":$2 \" && [ \$i -lt 50 ]; do usleep 100000; i=\$((i+1)); done; netstat -ltn | grep -q \":$2 \"" >/dev/null ||
        fail "guest $1's listener on port $2 did not start"
}

# guest_received VM: "rc=N size=N md5=HEX" of what the guest's listener got, once nc ended.
guest_received() {
    # shellcheck disable=SC2016  # expanded by the guest's shell
    GUEST_EXEC_TIMEOUT=30 guest_exec "$1" 'i=0; while [ ! -e /tmp/nc.rc ] && [ $i -lt 100 ]; do usleep 100000; i=$((i+1)); done;
        echo "rc=$(cat /tmp/nc.rc 2>/dev/null) size=$(wc -c < /tmp/recv) md5=$(md5sum < /tmp/recv | cut -d" " -f1)";
        kill $(pidof sleep) 2>/dev/null; true'
}

# file_sum FILE: FILE_SIZE and FILE_MD5 of FILE.
FILE_SIZE='' FILE_MD5=''
file_sum() {
    FILE_SIZE=$(stat -c %s "$1") FILE_MD5=$(md5sum <"$1" | cut -d' ' -f1)
}

# XFER_S: how long the last transfer below took (seconds, two decimals).
XFER_S=

# tcp_guest_to_guest FROM TO PORT FILE TIMEOUT SEND-CMD: guest TO listens on PORT, guest FROM
# runs SEND-CMD (nc to TO's address and PORT) within TIMEOUT s; TO must have received FILE's
# bytes (length and md5). Messages name a guest by its name's last letter (vma: A).
tcp_guest_to_guest() {
    local from=$1 to=$2 port=$3 a=${1: -1} b=${2: -1} t out
    a=${a^^} b=${b^^}
    file_sum "$4"
    guest_listen "$to" "$port"
    t=$(date +%s.%N)
    out=$(GUEST_EXEC_TIMEOUT=$5 guest_exec "$from" "$6 && echo sent") || fail "$a -> $b TCP transfer failed: $out"
    XFER_S=$(elapsed "$t")
    out=$(guest_received "$to") || fail "cannot check what guest $b received: $out"
    [[ $out == *"rc=0 size=$FILE_SIZE md5=$FILE_MD5"* ]] ||
        fail "$a -> $b: expected rc=0 size=$FILE_SIZE md5=$FILE_MD5, guest $b says: $out"
}

# --- a vdpad TAP in a namespace of the test -------------------------------------------------

# start_tap_port SOCKET IFNAME: vdpad with one port vdpa0 on SOCKET (queues=1,
# link=tap:ifname=IFNAME), listening, its TAP created.
start_tap_port() {
    start_vdpad --port "socket=$1,id=vdpa0,queues=1,link=tap:ifname=$2"
    wait_for_socket "$1" 20 vdpad
    wait_status 10 --port vdpa0 --connection listening
    ip link show dev "$2" >/dev/null 2>&1 || fail "vdpad did not create the TAP interface $2 (ip link)"
}

# tap_into_ns IFNAME NS ADDRESS/LEN: a network namespace NS (deleted at the end) with lo up and
# the TAP IFNAME moved into it, ADDRESS on it, up, without IPv6 (its router solicitations and
# MLD reports would only add noise). nsx CMD... runs CMD in it; TAP_ADDR is ADDRESS.
TAP_NS='' TAP_ADDR=''
nsx() { ip netns exec "$TAP_NS" "$@"; }
tap_into_ns() {
    TAP_NS=$2 TAP_ADDR=${3%/*}
    ip netns add "$2" || fail "ip netns add $2 failed"
    on_cleanup "ip netns del $2"
    ip link set "$1" netns "$2" || fail "cannot move $1 into namespace $2"
    nsx sysctl -qw "net.ipv6.conf.$1.disable_ipv6=1" 2>/dev/null || true
    nsx ip link set lo up
    nsx ip addr add "$3" dev "$1" || fail "cannot address $1"
    nsx ip link set "$1" up || fail "cannot bring $1 up"
}

# tcp_guest_to_ns VM PORT FILE TIMEOUT SEND-CMD: lib/tcp.py listens in the namespace on
# TAP_ADDR:PORT, guest VM runs SEND-CMD (nc to it) within TIMEOUT s; the namespace must have
# received FILE's bytes (length, md5, cmp).
tcp_guest_to_ns() {
    local vm=$1 port=$2 file=$3 secs=$4 t out got
    file_sum "$file"
    spawn ns-listener ip netns exec "$TAP_NS" python3 "$TCP_PY" listen "$TAP_ADDR" "$port" "$TMP/recv-ns.bin" --timeout "$secs"
    wait_for_log "$TMP/ns-listener.log" '^listening' 10 ns-listener
    t=$(date +%s.%N)
    out=$(GUEST_EXEC_TIMEOUT=$secs guest_exec "$vm" "$5 && echo sent") ||
        fail "guest -> namespace TCP transfer failed: $out"
    wait_for_log "$TMP/ns-listener.log" '^received' 30 ns-listener
    XFER_S=$(elapsed "$t")
    got=$(grep '^received' "$TMP/ns-listener.log")
    [[ $got == "received $FILE_SIZE bytes md5 $FILE_MD5 "* ]] ||
        fail "guest -> namespace: expected $FILE_SIZE bytes md5 $FILE_MD5, got: $got"
    cmp -s "$TMP/recv-ns.bin" "$file" || fail "guest -> namespace: bytes differ"
    stop ns-listener TERM 5 || true
}

# tcp_ns_to_guest VM GUEST-ADDR PORT FILE TIMEOUT: guest VM listens on PORT, lib/tcp.py in the
# namespace sends FILE to GUEST-ADDR:PORT within TIMEOUT s; the guest must have received FILE's
# bytes (length and md5).
tcp_ns_to_guest() {
    local vm=$1 t out
    file_sum "$4"
    guest_listen "$vm" "$3"
    t=$(date +%s.%N)
    out=$(nsx python3 "$TCP_PY" send "$2" "$3" "$4" --timeout "$5" 2>&1) ||
        fail "namespace -> guest TCP transfer failed: $out"
    XFER_S=$(elapsed "$t")
    out=$(guest_received "$vm") || fail "cannot check what the guest received: $out"
    [[ $out == *"rc=0 size=$FILE_SIZE md5=$FILE_MD5"* ]] ||
        fail "namespace -> guest: expected rc=0 size=$FILE_SIZE md5=$FILE_MD5, guest says: $out"
}

# --- two wired ports (qemu-wire, qemu-wire-offload) -----------------------------------------

# start_wire_guests SOCK-A SOCK-B MAC-A MAC-B IP-A IP-B: waits for vdpad's ports vdpa0 (SOCK-A)
# and vdpa1 (SOCK-B) to listen, then guest vma on A and vmb on B (IP-x/24), both up with both
# rings started, no IPv6. BOOT_S: seconds until both guests' eth0 was up.
BOOT_S=
start_wire_guests() {
    local t0
    wait_for_socket "$1" 20 vdpad
    wait_for_socket "$2" 20 vdpad
    wait_status 10 --port vdpa0 --connection listening
    wait_status 10 --port vdpa1 --connection listening
    t0=$SECONDS
    start_qemu vma --socket "$1" --connect --queues 1 --mac "$3" --ip "$5/24"
    start_qemu vmb --socket "$2" --connect --queues 1 --mac "$4" --ip "$6/24"
    wait_guest vma 90
    wait_guest vmb 90
    BOOT_S=$((SECONDS - t0))
    wait_status 30 --port vdpa0 --connection connected --feature-bit 32 --ring 0 --ring 1
    wait_status 30 --port vdpa1 --connection connected --feature-bit 32 --ring 0 --ring 1
    guests_no_ipv6 vma vmb
}

# stop_wire_guests: both guests quit; both ports listen again and vdpad is still up.
stop_wire_guests() {
    stop_qemu vma
    stop_qemu vmb
    wait_status 15 --port vdpa0 --connection listening
    wait_status 15 --port vdpa1 --connection listening
    alive vdpad || fail "vdpad exited after QEMU quit"
}

# snapshot_wire PA PB: ports vdpa0's and vdpa1's counters into PA and PB (load_stats), retried
# until two reads in a row agree (nothing in flight).
snapshot_wire() {
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

# --- offloads (qemu-tap-offload, qemu-wire-offload) -----------------------------------------

# The offload feature bits (virtio 1.2, 5.1.3) a port offers by default and the 6.1 guest acks.
declare -A OFFLOAD_BIT=([CSUM]=0 [GUEST_CSUM]=1 [GUEST_TSO4]=7 [GUEST_TSO6]=8 [GUEST_ECN]=9 [GUEST_UFO]=10
                        [HOST_TSO4]=11 [HOST_TSO6]=12 [HOST_ECN]=13 [HOST_UFO]=14)
OFFLOAD_NAMES=(CSUM GUEST_CSUM GUEST_TSO4 GUEST_TSO6 GUEST_ECN GUEST_UFO HOST_TSO4 HOST_TSO6 HOST_ECN HOST_UFO)

# port_features PORT: "acked offered ackedNames" of PORT from vdpactl status.
port_features() {
    vdpa_status | jq -r --arg p "$1" '.ports[] | select(.id == $p) | "\(.features.acked) \(.features.offered) \(.features.ackedNames)"'
}

# Offload checks that fail are collected (want) and reported together at the end
# (offloads_verdict), after the transfers have shown that the data path itself works.
MISSING=()
want() { MISSING+=("$*"); log "offload check failed: $*"; }

# want_ethtool_on TEXT WHAT FEATURE...: each FEATURE is on in TEXT (`ethtool -k` output);
# otherwise want "WHAT: FEATURE: its state".
want_ethtool_on() {
    local text=$1 what=$2 f
    shift 2
    for f in "$@"; do
        grep -q "^$f: on" <<<"$text" || want "$what: $(grep "^$f:" <<<"$text" || echo "$f: (absent)")"
    done
}

# offloads_verdict SUMMARY: fail with the list of the offload checks that failed, if any.
offloads_verdict() {
    ((${#MISSING[@]})) || return 0
    local msg
    msg=$(printf '%s; ' "${MISSING[@]}")
    fail "offloads not in effect (${#MISSING[@]} checks): ${msg%; } | the transfers themselves passed: $1"
}

# InCsumErrors summed over /proc/net/snmp's lines (Tcp, Udp, Icmp, ...); awk runs in busybox too.
# shellcheck disable=SC2016
CSUM_AWK='{ if (seen[$1]++) { for (i = 2; i <= NF; i++) if (h[$1 "," i] == "InCsumErrors") s += $i }
           else for (i = 2; i <= NF; i++) h[$1 "," i] = $i } END { print s + 0 }'
# guest_csum VM: the guest's InCsumErrors.
guest_csum() { guest_exec "$1" "awk '$CSUM_AWK' /proc/net/snmp" | tail -n 1; }

# Two payloads of known text (numbers, one a line), about 5 MiB each at most.
PAYLOAD_SEQ=("1 900000" "900001 1800000")
# payloads SIZE FILE1 FILE2: the first SIZE bytes of payload 1 and 2 into FILE1 and FILE2, their
# md5s in MD5_1 and MD5_2 (fails if SIZE is more than a payload makes: TCP_BYTES).
MD5_1='' MD5_2=''
payloads() {
    # shellcheck disable=SC2086  # two numbers
    seq ${PAYLOAD_SEQ[0]} | head -c "$1" >"$2"
    # shellcheck disable=SC2086
    seq ${PAYLOAD_SEQ[1]} | head -c "$1" >"$3"
    [[ $(stat -c %s "$2") == "$1" && $(stat -c %s "$3") == "$1" ]] ||
        fail "TCP_BYTES=$1 is more than the payload generator makes (about 5 MiB)"
    MD5_1=$(md5sum <"$2" | cut -d' ' -f1) MD5_2=$(md5sum <"$3" | cut -d' ' -f1)
}

# guest_payload VM N SIZE MD5: the first SIZE bytes of payload N (1 or 2) into /tmp/send.bin in
# the guest's tmpfs, their md5 checked against MD5. (A guest that sends a file rather than
# generating the bytes on the fly sends at TCP's pace, in large writes, not at its CPU's.)
guest_payload() {
    local out
    out=$(GUEST_EXEC_TIMEOUT=60 guest_exec "$1" "seq ${PAYLOAD_SEQ[$2 - 1]} | head -c $3 > /tmp/send.bin && md5sum < /tmp/send.bin") ||
        fail "cannot write the payload in guest $1: $out"
    [[ $out == *"$4"* ]] || fail "the payload in guest $1 is not the expected one (md5 $4): $out"
}
