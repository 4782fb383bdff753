#!/usr/bin/env bash
# vdpad --config and --check-config (issue 12, item 1): dist/vdpad.toml checks out; a file with
# a bad value is refused naming the file, line and key; vdpad started with a file serves its
# [[port]] tables, takes its options, lets the command line override them (--control) and adds
# the command line's --port to the file's ports.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
peer_init config-file 60
resolve_bins

out=$("$VDPAD" --check-config "$REPO_ROOT/dist/vdpad.toml" 2>&1) || fail "dist/vdpad.toml does not check out: $out"
[[ $out == *"port vm1:"* && $out == *"port vm2:"* ]] || fail "--check-config dist/vdpad.toml does not list its ports: $out"

printf 'control = "%s/ctl.sock"\n\n[[port]]\nsocket = "%s/a.sock"\nid = "a"\nqueues = 65\n' "$TMP" "$TMP" >"$TMP/bad.toml"
out=$("$VDPAD" --check-config "$TMP/bad.toml" 2>&1) && fail "a port with queues = 65 checked out"
[[ $out == *"$TMP/bad.toml:6: queues:"* ]] || fail "the error does not name file:line: key: $out"
out=$("$VDPAD" --config "$TMP/bad.toml" 2>&1) && fail "vdpad started with queues = 65"
[[ $out == *"$TMP/bad.toml:6: queues:"* ]] || fail "vdpad --config: the error does not name file:line: key: $out"

cat >"$TMP/good.toml" <<TOML
control = "$TMP/file-ctl.sock"
control-max-clients = 3
log-format = "json"

[[port]]
id = "fa"
socket = "$TMP/fa.sock"
queues = 2

[[port]]
id = "fb"
socket = "$TMP/fb.sock"
link = "sink"
TOML
spawn vdpad "$VDPAD" --config "$TMP/good.toml" --control "$TMP/cli-ctl.sock" --port "socket=$TMP/cli.sock,id=cli"
for s in fa fb cli; do wait_for_socket "$TMP/$s.sock" 20 vdpad; done
wait_for_socket "$TMP/cli-ctl.sock" 20 vdpad
[[ -e $TMP/file-ctl.sock ]] && fail "the file's control socket was made although --control overrides it"
st=$(timeout 5 "$VDPACTL" --control "$TMP/cli-ctl.sock" status --json) || fail "no status on the command line's control socket"
ids=$(jq -r '[.ports[].id] | join(" ")' <<<"$st")
[[ $ids == "fa fb cli" ]] || fail "ports: '$ids', want 'fa fb cli'"
[[ $(jq -r '.ports[0].queues | length' <<<"$st") == 4 ]] || fail "port fa does not have queues = 2 (4 rings)"
grep -q '"message":"control socket at .*at most 3 clients' "$TMP/vdpad.log" || fail "the file's control-max-clients = 3 / log-format = json not applied: $(head -2 "$TMP/vdpad.log")"
pass "dist/vdpad.toml checks out; file:line: key named; ports fa fb from the file, cli from the command line; --control overrides, control-max-clients and log-format taken"
