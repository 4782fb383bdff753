#!/usr/bin/env bash
# vdpad under systemd's notification protocol (issue 12, item 6), without systemd: a datagram
# socket stands in for NOTIFY_SOCKET, once at a path and once in the abstract namespace
# (`@name`, as systemd gives it). vdpad must send READY=1 (with MAINPID) only once its
# vhost-user and control sockets exist, and STOPPING=1 when SIGTERM makes it close its ports.
# Then dist/vdpad.service passes `systemd-analyze verify` (its ExecStart pointed at this build),
# with no warning either.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
peer_init systemd-notify 60
resolve_bins

# listen NOTIFY-ADDRESS OUT SOCKETS...: receives datagrams on NOTIFY-ADDRESS (a path, or @name)
# for up to 20 s; for each, writes to OUT one line: the message's lines joined by '|', then
# whether each of SOCKETS existed at that moment (1/0). Ends after STOPPING=1.
listen() {
    python3 - "$@" <<'PY' &
import os, socket, sys, time
addr, out, socks = sys.argv[1], sys.argv[2], sys.argv[3:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("\0" + addr[1:] if addr.startswith("@") else addr)
open(out + ".bound", "w").close()
s.settimeout(20)
with open(out, "w") as f:
    while True:
        try:
            data = s.recv(4096).decode()
        except socket.timeout:
            f.write("TIMEOUT\n"); break
        exists = "".join("1" if os.path.exists(p) else "0" for p in socks)
        f.write(data.replace("\n", "|") + " " + exists + "\n"); f.flush()
        if "STOPPING=1" in data:
            break
PY
    LISTENER=$!
    wait_until 5 "notify listener bound" test -e "$2.bound"
}

for kind in path abstract; do
    sock=$TMP/$kind.sock ctl=$TMP/$kind.ctl out=$TMP/$kind.notify
    if [[ $kind == path ]]; then addr=$TMP/notify.sock; else addr=@vdpad-notify-$$; fi
    listen "$addr" "$out" "$sock" "$ctl"
    spawn "vdpad-$kind" env NOTIFY_SOCKET="$addr" "$VDPAD" --control "$ctl" --port "socket=$sock,id=vdpa0"
    wait_until 15 "READY=1 from vdpad ($kind)" grep -q "READY=1" "$out"
    line=$(grep -m1 "READY=1" "$out")
    say "$kind: $line"
    [[ ${line##* } == 11 ]] || fail "$kind: READY=1 came before the sockets existed (vhost-user, control: ${line##* }): $line"
    pid=${PIDS[vdpad-$kind]}
    [[ $line == *"MAINPID=$pid"* ]] || fail "$kind: READY=1 without MAINPID=$pid: $line"
    kill -TERM "$pid"
    wait_until 15 "STOPPING=1 from vdpad ($kind)" grep -q "STOPPING=1" "$out"
    wait "$LISTENER" 2>/dev/null
    wait_until 15 "vdpad ($kind) exits after SIGTERM" bash -c "! kill -0 $pid 2>/dev/null"
    say "$kind: $(grep -m1 STOPPING=1 "$out")"
done

# Without NOTIFY_SOCKET vdpad sends nothing and still starts.
spawn vdpad-plain "$VDPAD" --control "$TMP/plain.ctl" --port "socket=$TMP/plain.sock,id=vdpa0"
wait_for_socket "$TMP/plain.sock" 15 vdpad-plain
grep -q "told systemd\|tell systemd" "$TMP/vdpad-plain.log" && fail "vdpad without NOTIFY_SOCKET spoke to systemd: $(grep "systemd" "$TMP/vdpad-plain.log" | head -2)"

command -v systemd-analyze >/dev/null || fail "systemd-analyze missing: run scripts/install-deps"
sed "s#/usr/local/bin/vdpad#$VDPAD#" "$REPO_ROOT/dist/vdpad.service" >"$TMP/vdpad.service"
verify=$(cd "$TMP" && systemd-analyze verify "$TMP/vdpad.service" 2>&1); rc=$?
[[ $rc == 0 && -z $verify ]] || fail "systemd-analyze verify dist/vdpad.service: rc $rc: $verify"
pass "READY=1 after both sockets existed, with MAINPID, at a path and an abstract address; STOPPING=1 on SIGTERM; dist/vdpad.service verifies"
