import DeviceFramework
import Logging
import Platform
import Relay
import VhostUser
import Virtio

/// Maps a vhost-user session's events to vDPA device operations, and hands everything that
/// depends on dirty logging to the port's `MigrationSwitch`. Lives on the port's thread; every
/// event finishes (the device and relay have applied the change) before the message that caused
/// it is answered, and a device or relay failure fails that message.
final class DeviceBinding: VhostUserDeviceHooks {
    let device: any VDPADevice
    let logger: Logger
    let migration: MigrationSwitch
    /// What the frontend configured, kept from the events.
    private(set) var state = FrontendState()

    init(device: any VDPADevice, portID: String, relayMode: RelayLoopMode, options: MigrationOptions = MigrationOptions(),
         migration: MigrationStatsTable, testSwitches: TestSwitches, logger: Logger) {
        self.device = device
        self.logger = logger
        self.migration = MigrationSwitch(device: device, portID: portID, relayMode: relayMode, options: options, stats: migration,
                                         testSwitches: testSwitches, logger: logger)
    }

    /// The relay thread, once a switch made one (tests and the session fuzz target look at it).
    var relay: RelayEngine? { migration.relay }

    func mode(ofRing index: Int) -> RingMode { migration.mode(ofRing: index) }

    /// The guest's memory as the device is given it.
    static func deviceMemory(_ table: GuestMemoryTable) -> DeviceMemory {
        DeviceMemory(regions: table.viewRegions, owner: table)
    }

    static func deviceConfig(_ r: RingSetup, enabled: Bool) -> VDPARingConfig {
        VDPARingConfig(index: r.index, size: r.size, descGPA: r.descGPA, availGPA: r.availGPA, usedGPA: r.usedGPA, base: r.base,
                       kick: r.kick, call: r.call, enabled: enabled)
    }

    func featuresChanged(_ features: UInt64, ringsEnabled: [Bool]) throws(VhostUserError) {
        state.features = features
        for (i, on) in ringsEnabled.enumerated() { state.rings[i]?.enabled = on }
        let request = "SET_FEATURES"
        try dev(logger, request) { () throws(DeviceError) in try device.setFeatures(features) }
        for i in state.started where migration.mode(ofRing: i) != .held {
            let on = state.rings[i]?.enabled ?? false
            try dev(logger, request) { () throws(DeviceError) in try device.setRingEnabled(i, on) }
        }
        try migration.featuresChanged(state)
    }

    func memoryTableChanged(_ table: GuestMemoryTable) throws(VhostUserError) {
        // The session refuses such regions when its port set the limit (Port does); a device must
        // never see guest memory over the daemon's own mappings, whoever made the session.
        guard table.guestPhysEnd <= reservedIOVABase else {
            throw VhostUserError(.semantics, "memory table", field: "guest_phys_addr",
                                 "guest memory ends at 0x\(String(table.guestPhysEnd, radix: 16)), above the IOVA base 0x\(String(reservedIOVABase, radix: 16)) the daemon keeps for its own mappings: no device is given it")
        }
        state.memory = table
        try dev(logger, "SET_MEM_TABLE") { () throws(DeviceError) in try device.setMemory(Self.deviceMemory(table)) }
        try migration.memoryChanged(table)
    }

    func vringStarted(_ ring: RingSetup) throws(VhostUserError) {
        let i = ring.index
        let request = "start ring \(i)"
        let memory = Self.deviceMemory(state.memory)
        try dev(logger, request) { () throws(DeviceError) in try device.setMemory(memory) }
        let mediated = migration.startsMediated(i, state)
        // A ring started while logging is on starts in relay mode: it is held disabled until its
        // used ring points at the mediated ring, so no completion escapes the relay.
        try dev(logger, request) { () throws(DeviceError) in
            try device.startRing(Self.deviceConfig(ring, enabled: mediated ? false : ring.enabled))
        }
        // Recorded once the device runs it (a ring it refused has nothing to stop).
        state.rings[i] = ring
        if mediated { try migration.takeOver(i, state) }
    }

    func vringStopping(_ index: Int) throws(VhostUserError) -> UInt32? {
        guard state.rings[index] != nil else { return nil }
        defer { state.rings[index] = nil }
        let base = try dev(logger, "GET_VRING_BASE") { () throws(DeviceError) in try device.stopRing(index) }
        // A ring under the avail relay: the device's index counts the mediated ring's slots; the
        // guest-side base is the relay's (MigrationSwitch.ringStopped).
        let relayBase = try migration.ringStopped(index, state)
        return UInt32(relayBase ?? base)
    }

    func vringEnableChanged(_ index: Int, enabled: Bool) throws(VhostUserError) {
        guard state.rings[index] != nil else { return }
        state.rings[index]?.enabled = enabled
        if try migration.enableChanged(index, enabled: enabled, state) { return }
        try dev(logger, "SET_VRING_ENABLE") { () throws(DeviceError) in try device.setRingEnabled(index, enabled) }
    }

    func vringCallChanged(_ index: Int, call: SharedFD?) throws(VhostUserError) {
        guard state.rings[index] != nil else { return }
        state.rings[index]?.call = call
        if try migration.callChanged(index, call) { return }
        try dev(logger, "SET_VRING_CALL") { () throws(DeviceError) in try device.setRingCall(index, call) }
    }

    func usedLogAddressChanged(_ index: Int, usedLogGPA: UInt64) throws(VhostUserError) {
        guard state.rings[index] != nil else { return }
        state.rings[index]?.usedLogGPA = usedLogGPA
        try migration.usedLogAddressChanged(index, usedLogGPA)
    }

    func logChanged(_ log: DirtyLog?) throws(VhostUserError) {
        state.log = log
        try migration.logChanged(state)
    }

    func sendRARP(mac: [UInt8]) -> Bool {
        // QEMU sends SEND_RARP on the destination once the migration has completed.
        device.migrationDone()
        return device.sendRARP(mac: mac)
    }

    func statusChanged(_ status: UInt8) {}

    /// Best effort (the connection is going or the device is reset): failures are logged.
    func reset() {
        migration.reset()
        state = FrontendState()
        // Stops every ring and drops every IOVA mapping, the mediated rings' included.
        device.reset()
    }
}
