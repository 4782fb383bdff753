#!/usr/bin/env bash
# vdpad as the socket client reconnects: QEMU (socket server) quits and a new QEMU listens
# on the same path; vdpad, retrying with backoff, connects to it and the new guest's
# virtio_net starts the device again (connected, VERSION_1, regions, both rings started).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
peer_init qemu-client-reconnect 120
require_guest
resolve_bins

sock=$TMP/vdpa0.sock
start_qemu vm1 --socket "$sock" --listen --queues 1 --ip 10.0.2.15/24
wait_for_socket "$sock" 20 vm1
start_vdpad --port "socket=$sock,id=vdpa0,client,queues=1"
wait_guest vm1 60
wait_status 30 --port vdpa0 --connection connected --role client \
    --feature-bit 32 --min-regions 1 --ring 0 --ring 1

stop_qemu vm1
wait_status 15 --port vdpa0 --connection connecting
rm -f "$sock"

start_qemu vm2 --socket "$sock" --listen --queues 1 --ip 10.0.2.16/24
wait_guest vm2 60
wait_status 30 --port vdpa0 --connection connected --role client \
    --feature-bit 32 --min-regions 1 --ring 0 --ring 1
summary=$STATUS_SUMMARY
stop_qemu vm2
alive vdpad || fail "vdpad exited"
pass "$summary"
