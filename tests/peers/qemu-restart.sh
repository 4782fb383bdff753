#!/usr/bin/env bash
# A daemon restart does not end the guest's network (issue 7 class 9). For each socket
# direction:
#   client: vdpad is the socket client (`client`), QEMU listens (chardev server=on);
#   server: vdpad listens, QEMU connects with chardev reconnect=1;
# a guest (10.79.0.2/24) boots on a vdpad port whose link is a TAP in a network namespace
# of the test (10.79.0.1/24). vdpad runs inside that namespace and the TAP is persistent
# (made by the test with `ip tuntap add`), so it keeps its address while no vdpad holds it.
# lib/pinger.py in the namespace pings the guest every RESTART_PING_INTERVAL seconds
# (timestamped replies). Then,
# RESTART_ROUNDS times per direction, while the replies flow:
#   - a marker file is written in the guest and its uptime read;
#   - vdpad is killed with SIGKILL (no cleanup: its control socket, and in server mode its
#     port socket, stay behind as stale files; checked) and started again at once with the
#     same arguments;
#   - within RESTART_RESUME_MAX seconds a reply must arrive to a request sent after vdpad
#     died (so it went through the new daemon); the gap from the kill to that reply is
#     printed ("gap MODE round N: ... ms") and replies must keep coming afterwards;
#   - the new vdpad's port is connected with both rings started, the guest's own ping to
#     10.79.0.1 works, and it is the same guest: QEMU's PID unchanged, the marker is there,
#     the uptime grew, one boot on its console.
# At the end of each direction every echo request is accounted for: answered, or lost during
# one of the restarts; none may be lost at any other time. Duplicated replies are reported.
#
# Environment:
#   RESTART_ROUNDS       kills per direction (default 2; the watchdog allows 90 + 40 s a round)
#   RESTART_RESUME_MAX   seconds allowed from the kill to the first reply (default 10)
#   RESTART_MODES        directions to run (default "client server")
#   RESTART_PING_INTERVAL  seconds between echo requests (default 0.002: 500 a second)
#   RESTART_GUEST_ARP    "pin" (default): the guest's ARP entry for 10.79.0.1 is permanent;
#                        "dynamic": left as it is (see tests/peers/README.md: QEMU's link flap
#                        then adds the guest's 1 s ARP retry to some gaps, and replies the
#                        guest drops meanwhile are reported instead of failing the test)
#   RESTART_BREAK        for showing that the test fails: "no-restart" (vdpad is not started
#                        again) or "other-socket" (started again on another socket path)
set -uo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
rounds=${RESTART_ROUNDS:-2}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "FAIL qemu-restart: bad RESTART_ROUNDS=$rounds"; exit 1; }
peer_init qemu-restart $((90 + 40 * rounds))
require_guest
resolve_bins
[[ -c /dev/net/tun ]] || fail "no /dev/net/tun"
command -v ip >/dev/null || fail "no ip command (iproute2)"

PINGER_PY=$PEERS_DIR/lib/pinger.py
resume_max=${RESTART_RESUME_MAX:-10}
modes=${RESTART_MODES:-client server}
interval=${RESTART_PING_INTERVAL:-0.002}
per_second=$(awk -v i="$interval" 'BEGIN { printf "%d", 1 / i }')
((per_second >= 20)) || fail "RESTART_PING_INTERVAL=$interval: at least 20 requests a second are needed"
break_mode=${RESTART_BREAK:-}
case $break_mode in ''|no-restart|other-socket) ;; *) fail "unknown RESTART_BREAK=$break_mode" ;; esac
[[ -n $break_mode ]] && echo "... $TEST_NAME: RESTART_BREAK=$break_mode: this run must fail" >&2

ifname=vdpart$$
ifname=${ifname:0:15}
ns=vdpa-peer-restart-$$
host_ip=10.79.0.1 guest_ip=10.79.0.2 guest_mac=52:54:00:79:00:02
nsx() { ip netns exec "$ns" "$@"; }

ip netns add "$ns" || fail "ip netns add $ns failed"
on_cleanup "ip netns del $ns"
nsx ip link set lo up
# Persistent: the interface and its address outlive the vdpad that has it open.
nsx ip tuntap add dev "$ifname" mode tap || fail "cannot create TAP $ifname in $ns"
nsx sysctl -qw "net.ipv6.conf.$ifname.disable_ipv6=1" 2>/dev/null || true
nsx ip addr add "$host_ip/24" dev "$ifname" || fail "cannot address $ifname"
nsx ip link set "$ifname" up || fail "cannot bring $ifname up"
tap_mac=$(nsx cat "/sys/class/net/$ifname/address") || fail "cannot read $ifname's MAC"
# A permanent neighbour entry: while vdpad is down, ARP for the guest would fail and add
# its own retry delay to the measured gap.
nsx ip neigh replace "$guest_ip" lladdr "$guest_mac" dev "$ifname" nud permanent ||
    fail "cannot add the guest's neighbour entry"

CONTROL=$TMP/control.sock
VDPAD_ARGS=()
# start_vdpad_ns: vdpad with VDPAD_ARGS inside the namespace (ip netns exec execs it: the
# PID is vdpad's), its log kept per start; waits until its control socket answers (after a
# SIGKILL the old control socket file is still there, so existing is not enough).
starts=0
start_vdpad_ns() {
    [[ -e $TMP/vdpad.log ]] && mv "$TMP/vdpad.log" "$TMP/vdpad-$starts.log"
    starts=$((starts + 1))
    spawn vdpad ip netns exec "$ns" "$VDPAD" --control "$CONTROL" --log-level "${VDPA_LOG_LEVEL:-debug}" "${VDPAD_ARGS[@]}"
    wait_until 20 "vdpad's control socket to answer" vdpa_status_quiet
}
# shellcheck disable=SC2317  # (called through wait_until)
vdpa_status_quiet() {
    alive vdpad || fail "vdpad exited at start: $(tail -n 3 "$TMP/vdpad.log" | tr '\n' ' ')"
    vdpa_status >/dev/null 2>&1
}

# pinger_replies_after T: the first reply line (SEQ SENT RECEIVED) to a request sent after T.
pinger_replies_after() {
    awk -v t="$1" '$1 == "reply" && $3 > t { print $2, $3, $4; exit }' "$TMP/pinger.log"
}
# replies_between A B: number of replies received in [A, B).
replies_between() {
    awk -v a="$1" -v b="$2" '$1 == "reply" && $4 >= a && $4 < b { n++ } END { print n + 0 }' "$TMP/pinger.log"
}
now() { date +%s.%N; }
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f", (b - a) * 1000 }'; }
# device_counts: the running vdpad's counters since it started, for failure messages.
device_counts() {
    vdpa_stats 2>/dev/null | python3 "$STATS_PY" --port vdpa0 --prefix c 2>/dev/null |
        awk -F= '/^c_q[01]_(packets|drops)=/ { printf "%s=%s ", substr($1, 3), $2 }'
}
guest_uptime() { guest_exec vm 'cut -d" " -f1 /proc/uptime' | tr -d '\r' | head -n 1; }

results=()
for mode in $modes; do
    windows=
    log "=== mode $mode"
    sock=$TMP/vdpa0-$mode.sock
    port="socket=$sock,id=vdpa0,queues=1,link=tap:ifname=$ifname"
    if [[ $mode == client ]]; then
        start_qemu vm --socket "$sock" --listen --queues 1 --mac "$guest_mac" --ip "$guest_ip/24"
        wait_for_socket "$sock" 20 vm
        VDPAD_ARGS=(--port "$port,client")
        start_vdpad_ns
    elif [[ $mode == server ]]; then
        VDPAD_ARGS=(--port "$port")
        start_vdpad_ns
        wait_for_socket "$sock" 20 vdpad
        start_qemu vm --socket "$sock" --connect --reconnect 1 --queues 1 --mac "$guest_mac" --ip "$guest_ip/24"
    else
        fail "unknown mode $mode in RESTART_MODES (client or server)"
    fi
    grep -q "tap link on interface $ifname" "$TMP/vdpad.log" || fail "vdpad did not attach to the TAP $ifname"
    wait_guest vm 90
    wait_status 30 --port vdpa0 --connection connected --feature-bit 32 --ring 0 --ring 1
    qemu_pid=${PIDS[vm]}
    # shellcheck disable=SC2016  # ($f is the guest's)
    guest_exec vm 'for f in /proc/sys/net/ipv6/conf/*/disable_ipv6; do echo 1 > $f; done 2>/dev/null; true' >/dev/null
    if [[ ${RESTART_GUEST_ARP:-pin} == pin ]]; then
        out=$(guest_exec vm "arp -s $host_ip $tap_mac && arp -n") || fail "cannot pin the guest's ARP entry: $out"
    fi

    spawn pinger ip netns exec "$ns" python3 "$PINGER_PY" "$guest_ip" --interval "$interval" --duration $((60 + 40 * rounds))
    wait_until 30 "the first echo replies from the guest ($mode)" grep -qs '^reply' "$TMP/pinger.log"

    for ((round = 1; round <= rounds; round++)); do
        token=$mode-$round-$RANDOM$RANDOM
        guest_exec vm "echo $token > /tmp/restart-marker" >/dev/null || fail "cannot write the marker in the guest"
        up0=$(guest_uptime)
        [[ $up0 =~ ^[0-9]+(\.[0-9]+)?$ ]] || fail "cannot read the guest's uptime: '$up0'"
        # Mid-traffic: replies arrived during the last half second.
        sleep 0.5
        t=$(now)
        recent=$(replies_between "$(awk -v t="$t" 'BEGIN { printf "%.6f", t - 0.5 }')" "$t")
        ((recent >= per_second / 4)) || fail "$mode round $round: only $recent replies in the 0.5 s before the kill: no steady traffic to interrupt"
        vpid=${PIDS[vdpad]}
        [[ $(readlink "/proc/$vpid/exe") == "$(readlink -f "$VDPAD")" ]] || fail "PID $vpid is not vdpad"
        t_kill=$(now)
        kill -KILL "$vpid"
        wait "$vpid" 2>/dev/null
        t_dead=$(now)
        unset "PIDS[vdpad]"
        # SIGKILL leaves vdpad's sockets behind: the new vdpad must replace the stale files.
        [[ -S $CONTROL ]] || fail "$mode round $round: no stale control socket after SIGKILL (did vdpad really die uncleanly?)"
        if [[ $mode == server && ! -S $sock ]]; then fail "$mode round $round: no stale port socket after SIGKILL"; fi
        log "$mode round $round: vdpad $vpid killed ($(ms "$t_kill" "$t_dead") ms to reap)"
        read -r last_before last_seq_before < <(awk -v t="$t_kill" '$1 == "reply" && $4 <= t { r = $4; q = $2 } END { print r, q }' "$TMP/pinger.log")

        t_restart=$(now)
        case $break_mode in
            no-restart) ;;
            other-socket) VDPAD_ARGS=(--port "${VDPAD_ARGS[1]/$sock/$TMP/other.sock}"); start_vdpad_ns ;;
            *) start_vdpad_ns ;;
        esac

        # First reply to a request sent after vdpad died: it went through the new vdpad.
        deadline=$(awk -v t="$t_kill" -v m="$resume_max" 'BEGIN { printf "%.6f", t + m }')
        first=
        while :; do
            first=$(pinger_replies_after "$t_dead")
            [[ -n $first ]] && break
            alive vm || fail "$mode round $round: QEMU exited after the kill"
            alive pinger || fail "$mode round $round: the pinger exited"
            awk -v d="$deadline" -v n="$(now)" 'BEGIN { exit !(n > d) }' &&
                fail "$mode round $round: no echo reply from the guest within ${resume_max}s of killing vdpad (restart: ${break_mode:-normal})"
            sleep 0.02
        done
        read -r first_seq _ first_recv <<<"$first"
        gap=$(ms "$t_kill" "$first_recv")
        outage=$(ms "${last_before:-$t_kill}" "$first_recv")
        # A reply received between the kill and the restart would not have gone through vdpad.
        stray=$(replies_between "$t_dead" "$t_restart")
        ((stray == 0)) || fail "$mode round $round: $stray replies arrived while no vdpad was running"

        # The traffic keeps flowing: at least half the requests of the next second answered.
        sleep 1.2
        t=$(now)
        after=$(replies_between "$(awk -v t="$t" 'BEGIN { printf "%.6f", t - 1 }')" "$t")
        ((after >= per_second / 2)) || fail "$mode round $round: only $after replies in the second after traffic resumed ($per_second requests; vdpad: $(device_counts))"

        # The new vdpad has the device running again.
        wait_status 15 --port vdpa0 --connection connected --feature-bit 32 --ring 0 --ring 1
        log "$mode round $round: new vdpad's counters: $(device_counts)"
        # The guest's own traffic: its ping gets replies. The pinger pauses meanwhile: busybox
        # ping's raw socket has a 14 KB receive buffer that also gets a copy of every echo
        # request the pinger sends, and at 500 a second its own reply can be dropped there.
        kill -STOP "${PIDS[pinger]}"
        out=$(guest_exec vm "ping -c 3 -W 3 $host_ip")
        rc=$?
        kill -CONT "${PIDS[pinger]}"
        ((rc == 0)) || fail "$mode round $round: guest ping $host_ip failed after the restart: $out"
        grep -q ' 3 packets received' <<<"$out" || fail "$mode round $round: guest ping lost packets after the restart (vdpad: $(device_counts)): $out"
        # The same guest, not rebooted.
        if [[ ${PIDS[vm]} != "$qemu_pid" ]] || ! alive vm; then fail "$mode round $round: QEMU $qemu_pid is gone"; fi
        marker=$(guest_exec vm 'cat /tmp/restart-marker' | tr -d '\r' | head -n 1)
        [[ $marker == "$token" ]] || fail "$mode round $round: the guest's marker is '$marker', expected '$token' (guest rebooted?)"
        up1=$(guest_uptime)
        awk -v a="$up0" -v b="$up1" 'BEGIN { exit !(b > a) }' || fail "$mode round $round: guest uptime went from $up0 to $up1 s"
        boots=$(grep -ac '^VDPA-GUEST: init start' "$TMP/vm.serial.log")
        ((boots == 1)) || fail "$mode round $round: the guest console shows $boots boots"

        line="gap $mode round $round: ${gap} ms from SIGKILL to the first echo reply through the restarted vdpad (traffic outage ${outage} ms; vdpad started again $(ms "$t_kill" "$t_restart") ms after the kill; guest uptime $up0 -> $up1 s, marker kept)"
        echo "$line"
        results+=("$mode#$round ${gap} ms")
        windows+=" $last_seq_before $first_seq"
    done

    stop pinger TERM 5 || true
    end=$(grep '^end ' "$TMP/pinger.log") || fail "$mode: the pinger did not finish"
    log "$mode pinger: $end"
    read -r _ _ sent _ replied _ dups _ <<<"$end"
    # Every request is accounted for: answered, or sent during one of the outages (after the
    # last reply before a kill and before the first reply after it), or still in flight when
    # the pinger stopped (after the last reply). None may be lost at any other time.
    read -r lost_outage lost_other < <(awk -v windows="$windows" '
        $1 == "reply" { got[$2] = 1; if ($2 > max) max = $2 }
        END {
            n = split(windows, w, " ")
            for (s = 0; s <= max; s++) if (!(s in got)) {
                inside = 0
                for (i = 1; i < n; i += 2) if (s > w[i] + 0 && s < w[i + 1] + 0) inside = 1
                if (inside) outage++; else other++
            }
            print outage + 0, other + 0
        }' "$TMP/pinger.log")
    mv "$TMP/pinger.log" "$TMP/pinger-$mode.log"
    if [[ ${RESTART_GUEST_ARP:-pin} == pin ]]; then
        ((lost_other == 0)) || fail "$mode: $lost_other echo requests unanswered outside the restarts ($lost_outage during them; $end; last vdpad: $(device_counts))"
        other="none outside"
    else
        # Dynamic ARP: after the link flap the guest queues its replies while it resolves
        # 10.79.0.1 again and drops what overflows its neighbour queue, also after the first
        # reply came back. Reported only.
        other="$lost_other outside (guest ARP dynamic)"
    fi
    # Duplicates are allowed (frames the killed vdpad sent but did not mark used are sent
    # again by the new one, as vhost-user restarts from the used index), and reported.
    results+=("$mode: $replied of $sent answered, $lost_outage lost during the restarts, $other, $dups duplicated")
    stop_qemu vm
    wait_status 15 --port vdpa0 --connection "$([[ $mode == client ]] && echo connecting || echo listening)"
    stop vdpad TERM 10 || fail "vdpad did not exit cleanly on SIGTERM after the $mode rounds"
done

summary=$(printf '%s; ' "${results[@]}")
pass "${summary%; }"
