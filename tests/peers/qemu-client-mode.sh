#!/usr/bin/env bash
# QEMU 7.2 is the vhost-user socket server (server=on,wait=off: it waits for a backend
# before starting the guest); vdpad connects to it (--port ...,client). Once the guest's
# virtio_net is up the port is connected with VERSION_1 acked, memory regions and both
# rings started. When QEMU quits, the port goes back to connecting (reconnect with backoff).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
peer_init qemu-client-mode 120
require_guest
resolve_bins

sock=$TMP/vdpa0.sock
start_qemu vm1 --socket "$sock" --listen --queues 1 --ip 10.0.2.15/24
wait_for_socket "$sock" 20 vm1
start_vdpad --port "socket=$sock,id=vdpa0,client,queues=1"
wait_guest vm1 60
wait_status 30 --port vdpa0 --connection connected --role client --socket "$sock" \
    --feature-bit 32 --min-regions 1 --ring 0 --ring 1
summary=$STATUS_SUMMARY

stop_qemu vm1
wait_status 15 --port vdpa0 --connection connecting
alive vdpad || fail "vdpad exited after QEMU quit"
pass "$summary"
