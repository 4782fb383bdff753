import DeviceFramework
import Logging
import Platform
import VhostUser

/// `migration=iommu-dirty`: the rings stay direct the whole time (no mediated ring, no relay);
/// while LOG_ALL is on the device's IOMMU records every page it writes (used rings included,
/// RX and TX), and the port's `DirtyFolder` folds those bits into the frontend's log,
/// periodically and before every reply that needs them (see DirtyFolder for why this is complete
/// with QEMU's order).
extension MigrationSwitch {
    static func makeDirtyFolder(device: any VDPADevice, portID: String, options: MigrationOptions, stats: MigrationStatsTable,
                                testSwitches: TestSwitches, logger: Logger) -> DirtyFolder? {
        guard options.method == .iommuDirty else { return nil }
        guard let tracker = device.dirtyTracking else {
            // The daemon refuses such a port when it is made (Daemon.checkMigrationSupport); a
            // switch made without a folder migrates through the relay, which logs correctly too.
            logger.error("migration=iommu-dirty: \(device.summary) has no dirty tracking; this port migrates through the relay instead")
            return nil
        }
        do {
            return try DirtyFolder(device: tracker, portID: portID,
                                   periodMillis: testSwitches.dirtyFoldPeriodMillis ?? DirtyFolder.defaultPeriodMillis,
                                   skipFold: testSwitches.skipDirtyFold,
                                   stats: stats, logger: logger)
        } catch {
            logger.error("migration=iommu-dirty: cannot make the dirty folder: \(error); this port migrates through the relay instead")
            return nil
        }
    }

    /// A device failure of the folder fails the frontend's message.
    func dirtyCall(_ request: String, _ body: () throws(DeviceError) -> Void) throws(VhostUserError) {
        do { try body() } catch {
            throw VhostUserError(.device, request, field: "dirty tracking", "\(error)")
        }
    }

    /// SET_FEATURES: LOG_ALL on starts tracking before the reply (every write after it is
    /// recorded, whenever the log comes); LOG_ALL off stops it, then folds a last time.
    func dirtyFeaturesChanged(_ s: FrontendState) throws(VhostUserError) {
        guard let folder = dirtyFolder else { return }
        let request = "SET_FEATURES"
        if s.logAll {
            try dirtyCall(request) { () throws(DeviceError) in try folder.enable() }
            try syncDirtyFolderLog(s, request)
        } else {
            // Into the log in force when logging stops (if usable), then no log.
            try syncDirtyFolderLog(s, request)
            try dirtyCall(request) { () throws(DeviceError) in try folder.disable(request) }
        }
    }

    /// GET_VRING_BASE: the device has stopped the ring (what it wrote set its bits); fold before
    /// the answer.
    func dirtyRingStopped(_ index: Int, _ s: FrontendState) throws(VhostUserError) {
        guard let folder = dirtyFolder else { return }
        try dirtyCall("GET_VRING_BASE") { () throws(DeviceError) in try folder.fold("GET_VRING_BASE ring \(index)") }
    }

    /// The folder folds into the usable log, or keeps the bits in the device while there is none
    /// (before SET_LOG_BASE, or after QEMU freed its log with the device stopped). A log that is
    /// replaced gets a last fold first (SET_LOG_BASE: QEMU syncs the old log after our reply).
    func syncDirtyFolderLog(_ s: FrontendState, _ request: String) throws(VhostUserError) {
        guard let folder = dirtyFolder else { return }
        let log = hasUsableLog(s) ? s.log : nil
        try dirtyCall(request) { () throws(DeviceError) in try folder.setLog(log, request) }
    }

    /// A ring enabled again without a new SET_LOG_BASE since the device stopped: this frontend
    /// keeps its log across a restart, so the bits go there (as the relay does, enableChanged).
    func dirtyEnableChanged(enabled: Bool, _ s: FrontendState) throws(VhostUserError) {
        guard enabled && s.logAll && s.log != nil && s.log === staleLog else { return }
        staleLog = nil
        try syncDirtyFolderLog(s, "SET_VRING_ENABLE")
    }
}
