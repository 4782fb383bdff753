#!/usr/bin/env bash
# qemu-migration.sh with `--port ...,migration=iommu-dirty` on both vdpads: the source's rings stay
# direct while QEMU migrates the guest, the SoftNIC sets a dirty bit per 4 KiB page it writes and
# the port's DirtyFolder folds them into QEMU's log; the SoftNIC journals its own RX writes
# (VDPAD_TEST_JOURNAL) for the RAM-file oracle. See qemu-migration.sh's header for the checks
# and how they differ in this mode.
#
# Kept short for run-all (its default limit is 180 s a test): one positive run at the sensitive
# rate (100 frames/s of 1400 B), the negative run (VDPAD_TEST_SKIP_DIRTY_FOLD=1 on the source:
# the journal check must fail with device bytes lost on the destination) and the cancel run
# (tracking off again after migrate_cancel, traffic on; then migrated for real). Every
# MIGRATION_* variable of qemu-migration.sh still applies (MIGRATION_RUNS=2 for one more run).
export MIGRATION_PORT_OPTIONS="${MIGRATION_PORT_OPTIONS:+$MIGRATION_PORT_OPTIONS,}migration=iommu-dirty"
export MIGRATION_RUNS=${MIGRATION_RUNS:-1}
export MIGRATION_TEST_NAME=qemu-migration-iommu-dirty
exec "$(dirname "${BASH_SOURCE[0]}")/qemu-migration.sh"
