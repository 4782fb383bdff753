#!/usr/bin/env bash
# vdpad --log-format json (issue 12, item 8): two ports (the first on a tap link, whose SoftNIC
# logs the interface it made), DPDK testpmd's virtio-user frontend connects to the second, negotiates and moves frames (loopback link), then leaves. Every line
# vdpad wrote must be one JSON object with time, level, label, source and message; every line
# from the modules that only ever speak of one port (the vhost-user session, the SoftNIC, the
# relay) must carry that port's id in `port`; both ports must appear. Then --log-format text is
# unchanged (`port=ID` in the line), and an unknown format is refused.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
peer_init log-format-json 120
resolve_bins
require_testpmd

ctl=$TMP/ctl.sock
spawn vdpad "$VDPAD" --log-format json --log-level debug --control "$ctl" \
    --port "socket=$TMP/a.sock,id=porta,link=tap:ifname=vdplf$$" --port "socket=$TMP/b.sock,id=portb,link=loopback"
wait_for_socket "$TMP/b.sock" 20 vdpad
start_testpmd_frontend testpmd "$TMP/b.sock" 1
wait_until 45 "testpmd connected to portb" bash -c "timeout 5 '$VDPACTL' --control '$ctl' status --json | grep -q '\"connection\":\"connected\"'"
sleep 2
stop testpmd INT 15 || true
sleep 1
kill -TERM "${PIDS[vdpad]}"
wait_until 15 "vdpad exits" bash -c "! kill -0 ${PIDS[vdpad]} 2>/dev/null"

result=$(python3 - "$TMP/vdpad.log" <<'PY'
import json, sys
lines = open(sys.argv[1], encoding="utf-8").read().splitlines()
bad, missing, ports = [], [], {}
for i, l in enumerate(lines, 1):
    try:
        o = json.loads(l)
    except ValueError:
        bad.append("line %d is not JSON: %s" % (i, l[:200])); continue
    if not isinstance(o, dict) or not all(isinstance(o.get(k), str) for k in ("time", "level", "label", "source", "message")):
        bad.append("line %d lacks time/level/label/source/message: %s" % (i, l[:200])); continue
    if "port" in o:
        ports[o["port"]] = ports.get(o["port"], 0) + 1
    elif o["source"] in ("VhostUser", "SoftNIC", "Relay"):
        missing.append("line %d (%s) has no port: %s" % (i, o["source"], o["message"][:160]))
print("lines=%d ports=%s" % (len(lines), json.dumps(ports, sort_keys=True)))
for m in bad + missing:
    print("ERR " + m)
PY
)
say "$(head -1 <<<"$result")"
grep -q "^ERR" <<<"$result" && fail "$(grep '^ERR' <<<"$result" | head -5 | tr '\n' ' ')"
grep -q '"porta"' <<<"$result" && grep -q '"portb"' <<<"$result" || fail "both ports' lines must carry their id: $(head -1 <<<"$result")"
grep -q '"source":"SoftNIC"' "$TMP/vdpad.log" || fail "no line from the SoftNIC (its tap link) to check for the port's id"
n=$(sed -n 's/.*"portb": \([0-9]*\).*/\1/p' <<<"$result")
((n >= 5)) || fail "portb (connected, negotiated) has only ${n:-0} lines with its id"

spawn vdpad-text "$VDPAD" --control "$TMP/t.ctl" --port "socket=$TMP/t.sock,id=textport"
wait_for_socket "$TMP/t.sock" 20 vdpad-text
grep -q "port=textport .*listening on" "$TMP/vdpad-text.log" || fail "text format: no 'port=textport ... listening on' line: $(head -3 "$TMP/vdpad-text.log")"
out=$("$VDPAD" --log-format xml --port "socket=$TMP/x.sock" 2>&1) && fail "--log-format xml accepted"
[[ $out == *"unknown --log-format 'xml'"* ]] || fail "--log-format xml: unclear error: $out"
pass "$(head -1 <<<"$result"); text format unchanged; --log-format xml refused"
