#!/usr/bin/env bash
# qemu-migration.sh with `--port ...,relay=avail+used` on both vdpads: while QEMU migrates the
# guest, every ring of the source is fully mediated: the relay checks each chain the guest posts
# before the device sees it, publishes the accepted heads to a mediated avail ring, and relays and
# marks the completions as the used relay does. The same RAM-file oracle judges it (the relay's
# journal, the used indexes against GET_VRING_BASE's bases, the destination carrying on).
#
# Kept short for run-all (its default limit is 180 s a test): one positive run at the sensitive
# rate (100 frames/s of 1400 B), the negative run (VDPAD_TEST_SKIP_BUFFER_MARKING=1 on the
# source: the journal check must fail) and the cancel run (back to direct after migrate_cancel,
# traffic on; then migrated for real). Every MIGRATION_* variable of qemu-migration.sh still
# applies (MIGRATION_RUNS=2 for one more run).
export MIGRATION_PORT_OPTIONS="${MIGRATION_PORT_OPTIONS:+$MIGRATION_PORT_OPTIONS,}relay=avail+used"
export MIGRATION_RUNS=${MIGRATION_RUNS:-1}
export MIGRATION_TEST_NAME=qemu-migration-avail
exec "$(dirname "${BASH_SOURCE[0]}")/qemu-migration.sh"
