#!/usr/bin/env bash
# vdpad listens (server, queues=1); QEMU 7.2 connects as the vhost-user frontend
# (chardev client) and boots the busybox guest, whose virtio_net driver starts the device:
# the port gets connected with VERSION_1 acked, memory regions and both rings started.
# When QEMU quits, the port listens again.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
peer_init qemu-server-mode 120
require_guest

sock=$TMP/vdpa0.sock
start_vdpad --port "socket=$sock,id=vdpa0,queues=1"
wait_for_socket "$sock" 20 vdpad
wait_status 10 --port vdpa0 --connection listening --role server --socket "$sock"

start_qemu vm1 --socket "$sock" --connect --queues 1 --ip 10.0.2.15/24
wait_guest vm1 60
wait_status 30 --port vdpa0 --connection connected --feature-bit 32 --min-regions 1 \
    --ring 0 --ring 1
summary=$STATUS_SUMMARY

stop_qemu vm1
wait_status 15 --port vdpa0 --connection listening
alive vdpad || fail "vdpad exited after QEMU quit"
pass "$summary"
