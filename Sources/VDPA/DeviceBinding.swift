#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims
import Logging
import Platform
import Relay
import Synchronization
import VhostUser
import Virtio

/// Per-ring migration figures the port reports (stats JSON).
public struct RingMigrationStats: Sendable, Equatable {
    public var switchovers = 0
    public var lastSwitchoverGapMicros: UInt64 = 0
    public var counters: RelayCounters?
    public static func == (a: Self, b: Self) -> Bool {
        a.switchovers == b.switchovers && a.lastSwitchoverGapMicros == b.lastSwitchoverGapMicros && a.counters === b.counters
    }
}

/// The per-ring migration figures, shared between the port thread and the control thread.
public final class MigrationStatsTable: Sendable {
    let table = Mutex<[Int: RingMigrationStats]>([:])
    /// The port's relay thread, once one exists (for its CPU figures).
    public let relay = Mutex<RelayEngine?>(nil)
    public init() {}
    public func withLock<R>(_ body: (inout [Int: RingMigrationStats]) -> R) -> R { table.withLock { body(&$0) } }
    public var snapshot: [Int: RingMigrationStats] { table.withLock { $0 } }
}

/// Drives a vDPA device from a vhost-user session's events, and switches rings between the
/// direct path and the relay when dirty logging starts and stops. Lives on the port's thread;
/// every hook finishes (the device and relay have applied the change) before the message that
/// caused it is answered.
final class DeviceBinding: VhostUserDeviceHooks {
    let device: any VDPADevice
    let logger: Logger
    let relayMode: RelayLoopMode
    let portID: String
    let migration: MigrationStatsTable
    let testSwitches: TestSwitches
    private var started: Set<Int> = []
    private(set) var relay: RelayEngine?
    private var relayed: [Int: MediatedUsedRing] = [:]
    /// RX rings started, or running, while LOG_ALL is on but before the frontend has sent the log
    /// (QEMU's vhost_dev_start order: features with LOG_ALL, memory, rings, then SET_LOG_BASE).
    /// The device holds them disabled: none of their completions can be logged yet. They go to
    /// the relay when the log arrives.
    private var awaitingLog: Set<Int> = []
    /// The log in force when the last running ring stopped. QEMU frees its log when it stops the
    /// device (vhost_dev_stop) and sends a new one when it starts it again, after the rings; until
    /// then the old one must not be marked (the marks would be lost). Rings that start while
    /// LOG_ALL is on wait for a new log; a frontend that enables them without sending one keeps
    /// its old log, which is then used.
    private var staleLog: DirtyLog?

    /// Whether `session.log` may be marked now.
    func hasUsableLog(_ session: BackendSession) -> Bool { session.log != nil && session.log !== staleLog }

    init(device: any VDPADevice, portID: String, relayMode: RelayLoopMode, migration: MigrationStatsTable,
         testSwitches: TestSwitches, logger: Logger) {
        self.device = device
        self.portID = portID
        self.relayMode = relayMode
        self.migration = migration
        self.testSwitches = testSwitches
        self.logger = logger
    }

    deinit { relay?.stop() }

    /// A device operation for the frontend's message `request`: its failure fails the message.
    func dev<T>(_ request: String, _ body: () throws(DeviceError) -> T) throws(VhostUserError) -> T {
        do { return try body() } catch {
            logger.error("\(request): \(error)")
            throw VhostUserError(.device, request, field: "device", error.message)
        }
    }

    /// A relay operation for the frontend's message `request`: its failure fails the message.
    func rel(_ request: String, _ body: () throws(SystemError) -> Void) throws(VhostUserError) {
        do { try body() } catch {
            logger.error("\(request): \(error)")
            throw VhostUserError(.device, request, field: "relay", error.description)
        }
    }

    func memoryTableChanged(_ session: BackendSession) throws(VhostUserError) {
        try dev("SET_MEM_TABLE") { () throws(DeviceError) in try device.setMemoryTable(session.memory.current()) }
        if !relayed.isEmpty, let relay {
            try rel("SET_MEM_TABLE") { () throws(SystemError) in try relay.setMemory(session.memory.current()) }
        }
    }

    func ringConfig(_ session: BackendSession, _ index: Int, enabled: Bool) -> VDPARingConfig {
        let v = session.vrings[index]
        return VDPARingConfig(index: index, size: UInt16(truncatingIfNeeded: v.size), descGPA: v.descGPA, availGPA: v.availGPA,
                              usedGPA: v.usedGPA, base: UInt16(truncatingIfNeeded: v.base), kick: v.kick, call: v.call,
                              enabled: enabled)
    }

    /// What status shows for a ring: the device's mode, or "held" while it waits for the log.
    func mode(ofRing index: Int) -> String { awaitingLog.contains(index) ? "held" : device.mode(ofRing: index) }

    func vringStarted(_ session: BackendSession, index: Int) throws(VhostUserError) {
        let request = "start ring \(index)"
        try dev(request) { () throws(DeviceError) in try device.setMemoryTable(session.memory.current()) }
        if session.logAllEnabled && index % 2 == 0 {
            // A ring started while logging is on starts in relay mode: it is held disabled until
            // its used ring points at the mediated ring, so no completion escapes the relay. If the
            // log has not arrived yet, it stays held until it does.
            try dev(request) { () throws(DeviceError) in try device.startRing(ringConfig(session, index, enabled: false)) }
            started.insert(index)
            guard hasUsableLog(session) else {
                awaitingLog.insert(index)
                logger.info("ring \(index): started while LOG_ALL is on but before SET_LOG_BASE: held until the log arrives")
                return
            }
            try switchToRelay(session, index)
            try dev(request) { () throws(DeviceError) in try device.setRingEnabled(index, session.vrings[index].enabled) }
        } else {
            try dev(request) { () throws(DeviceError) in
                try device.startRing(ringConfig(session, index, enabled: session.vrings[index].enabled))
            }
            started.insert(index)
        }
    }

    func vringStopping(_ session: BackendSession, index: Int) throws(VhostUserError) -> UInt32? {
        guard started.remove(index) != nil else { return nil }
        awaitingLog.remove(index)
        let request = "GET_VRING_BASE"
        let base = try dev(request) { () throws(DeviceError) in try device.stopRing(index) }
        if relayed.removeValue(forKey: index) != nil {
            // The device completed what it took into the mediated ring: relay the rest, mark the
            // whole used ring, and stop touching this ring.
            if let relay { try rel(request) { () throws(SystemError) in try relay.detach(index) } }
            try dev(request) { () throws(DeviceError) in try device.unmapIOVA(MediatedUsedRing.iova(forRing: index)) }
            try releaseRelayStateIfIdle(request)
        } else if session.logAllEnabled, hasUsableLog(session), let log = session.log {
            // A ring kept direct while logging (TX: the device only writes its used ring there):
            // its whole used ring is marked now, so the final log is complete.
            log.mark(gpa: usedLogGPA(session, index), length: UInt64(6 + 8 * Int(session.vrings[index].size)))
        }
        if started.isEmpty, let log = session.log { staleLog = log }
        return UInt32(base)
    }

    func vringEnableChanged(_ session: BackendSession, index: Int, enabled: Bool) throws(VhostUserError) {
        if enabled && awaitingLog.contains(index) && session.logAllEnabled && session.log != nil && session.log === staleLog {
            // Enabled without a new SET_LOG_BASE since the device stopped: this frontend keeps its
            // log across a restart (QEMU sends a new one before enabling), so it is marked.
            staleLog = nil
            try relayRingsAwaitingLog(session)
            return
        }
        // A ring held for the log stays disabled; the enable takes effect once it is relayed.
        if started.contains(index) && !awaitingLog.contains(index) {
            try dev("SET_VRING_ENABLE") { () throws(DeviceError) in try device.setRingEnabled(index, enabled) }
        }
    }

    func vringCallChanged(_ session: BackendSession, index: Int) throws(VhostUserError) {
        guard started.contains(index) else { return }
        let call = session.vrings[index].call
        if relayed[index] != nil, let relay {
            try rel("SET_VRING_CALL") { () throws(SystemError) in try relay.setGuestCall(index, call) }
        } else {
            try dev("SET_VRING_CALL") { () throws(DeviceError) in try device.setRingCall(index, call) }
        }
    }

    func featuresChanged(_ session: BackendSession) throws(VhostUserError) {
        let request = "SET_FEATURES"
        try dev(request) { () throws(DeviceError) in try device.setFeatures(session.ackedFeatures) }
        for i in started where !awaitingLog.contains(i) {
            try dev(request) { () throws(DeviceError) in try device.setRingEnabled(i, session.vrings[i].enabled) }
        }
        if session.logAllEnabled {
            guard hasUsableLog(session) else {
                // Logging on before the log exists: hold every running RX ring (what it completed
                // so far is published) until SET_LOG_BASE, then relay it.
                for i in started.sorted() where i % 2 == 0 && relayed[i] == nil && !awaitingLog.contains(i) {
                    try dev(request) { () throws(DeviceError) in try device.setRingEnabled(i, false) }
                    awaitingLog.insert(i)
                }
                if !awaitingLog.isEmpty {
                    logger.info("LOG_ALL set before SET_LOG_BASE: ring(s) \(awaitingLog.sorted()) held until the log arrives")
                }
                return
            }
            try relayRingsAwaitingLog(session)
            for i in started.sorted() where i % 2 == 0 && relayed[i] == nil { try switchToRelay(session, i) }
        } else {
            for i in relayed.keys.sorted() { try switchToDirect(session, i) }
            // Logging was turned off before the log came: the held rings go back to work, direct.
            for i in awaitingLog.sorted() {
                try dev(request) { () throws(DeviceError) in try device.setRingEnabled(i, session.vrings[i].enabled) }
                awaitingLog.remove(i)
            }
            try releaseRelayStateIfIdle(request)
        }
    }

    func logChanged(_ session: BackendSession) throws(VhostUserError) {
        // A new log (QEMU resizes it when memory grows, then frees the old one right after our
        // reply) takes over all marking before this returns.
        let request = "SET_LOG_BASE"
        if !relayed.isEmpty, let relay {
            let log = session.log
            try rel(request) { () throws(SystemError) in try relay.setLog(log) }
            for i in relayed.keys {
                let gpa = usedLogGPA(session, i)
                try rel(request) { () throws(SystemError) in try relay.setUsedLogAddress(i, gpa) }
            }
        }
        if session.log !== staleLog { staleLog = nil }
        if session.logAllEnabled && hasUsableLog(session) { try relayRingsAwaitingLog(session) }
    }

    /// The log has arrived while LOG_ALL is on: rings held for it switch to the relay, then take
    /// the enable state the frontend gave them.
    func relayRingsAwaitingLog(_ session: BackendSession) throws(VhostUserError) {
        for i in awaitingLog.sorted() {
            try switchToRelay(session, i)
            awaitingLog.remove(i)
            try dev("SET_LOG_BASE") { () throws(DeviceError) in try device.setRingEnabled(i, session.vrings[i].enabled) }
        }
    }

    /// When no ring is relayed, the relay keeps no reference to the frontend's memory or log, so
    /// neither stays mapped after the migration or the connection ends.
    func releaseRelayStateIfIdle(_ request: String) throws(VhostUserError) {
        guard relayed.isEmpty, let relay else { return }
        try rel(request) { () throws(SystemError) in
            try relay.setLog(nil)
            try relay.setMemory(.empty)
        }
    }

    func sendRARP(_ session: BackendSession, mac: [UInt8]) -> Bool {
        // QEMU sends SEND_RARP on the destination once the migration has completed.
        device.migrationDone()
        return device.sendRARP(mac: mac)
    }

    func statusChanged(_ session: BackendSession) {}

    /// Best effort (the connection is going or the device is reset): failures are logged.
    func reset(_ session: BackendSession) {
        for i in relayed.keys.sorted() {
            do throws(SystemError) { try relay?.detach(i) } catch { logger.error("reset: \(error)") }
        }
        relayed.removeAll()
        started.removeAll()
        awaitingLog.removeAll()
        staleLog = nil
        do throws(VhostUserError) { try releaseRelayStateIfIdle("reset") } catch { logger.error("reset: \(error)") }
        // Stops every ring and drops every IOVA mapping, the mediated rings' included.
        device.reset()
    }

    // MARK: switchover

    func usedLogGPA(_ session: BackendSession, _ i: Int) -> UInt64 {
        let v = session.vrings[i]
        if let a = v.address, a.flags & VringAddress.logFlag != 0 { return a.logGuestAddr }
        return v.usedGPA
    }

    /// Direct → relay, without a reset: suspend the ring, point its used ring at a mediated ring
    /// in the reserved IOVA range and its interrupt at the relay, resume; then the relay takes
    /// over from the index the device had reached. If that cannot be done, the ring is held
    /// disabled (its writes could not be logged) and the error fails the frontend's message.
    func switchToRelay(_ session: BackendSession, _ i: Int) throws(VhostUserError) {
        let v = session.vrings[i]
        let t0 = cvdpa_monotonic_ns()
        let iova = MediatedUsedRing.iova(forRing: i)
        var redirected = false
        do {
            if relay == nil {
                let r = try RelayEngine(mode: relayMode, name: portID, logger: logger)
                relay = r
                migration.relay.withLock { $0 = r }
                try r.setTestSwitches(skipBufferMarking: testSwitches.skipBufferMarking, journal: testSwitches.journal)
            }
            guard let relay else { throw SystemError("relay", errno: ENODEV) }
            try relay.setLog(session.log)
            try relay.setMemory(session.memory.current())
            let size = UInt16(truncatingIfNeeded: v.size)
            let mediated = try MediatedUsedRing(size: size)
            if let table = session.memory.current().hostPointer(gpa: v.usedGPA, length: UInt64(6 + 8 * Int(size))) {
                // Seed the device's notification state (flags, avail_event) from the guest's ring.
                mediated.base.copyMemory(from: table, byteCount: 6 + 8 * Int(size))
            }
            let deviceCall = SharedFD(try EventFD.make())
            let counters = RelayCounters()
            // The gap: from suspending the ring until the relay has taken it over.
            let held = cvdpa_monotonic_ns()
            let at = try device.redirectUsedRing(i, usedIOVA: iova,
                                                 mapping: IOVAMapping(iova: iova, size: UInt64(mediated.byteCount), host: mediated.base, owner: mediated),
                                                 call: deviceCall, interruptEveryBatch: true)
            redirected = true
            let features = session.ackedFeatures
            try relay.attach(RelayRingConfig(index: i, size: size, descGPA: v.descGPA, availGPA: v.availGPA, usedGPA: v.usedGPA,
                                             usedLogGPA: usedLogGPA(session, i), deviceWritesBuffers: true,
                                             eventIdx: features & VirtioFeature.ringEventIdx != 0,
                                             indirect: features & VirtioFeature.ringIndirectDesc != 0, guestCall: v.call,
                                             deviceKick: v.kick),
                             mediated: mediated, startIndex: at, deviceCall: deviceCall, counters: counters)
            relayed[i] = mediated
            let gap = (cvdpa_monotonic_ns() - held) / 1000
            let setup = (held - t0) / 1000
            migration.withLock {
                var m = $0[i] ?? RingMigrationStats()
                m.switchovers += 1
                m.lastSwitchoverGapMicros = gap
                m.counters = counters
                $0[i] = m
            }
            logger.info("ring \(i): switched to the relay (\(relayMode.rawValue) loop) at used index \(at): ring held \(gap) µs (after \(setup) µs of preparation)")
        } catch {
            // Hold the ring: nothing it completes could be logged. Best effort, the message fails
            // either way and the port closes the connection (reset then stops every ring).
            do throws(DeviceError) {
                try device.setRingEnabled(i, false)
                if redirected { try device.unmapIOVA(iova) }
            } catch { logger.error("ring \(i): \(error)") }
            logger.error("ring \(i): cannot switch to the relay: \(error); the ring is held disabled")
            throw VhostUserError(.device, "switch to the relay", field: "ring \(i)", "\(error)")
        }
    }

    /// Relay → direct: suspend, relay what remains, point the used ring back at the guest's, resume.
    func switchToDirect(_ session: BackendSession, _ i: Int) throws(VhostUserError) {
        guard relayed.removeValue(forKey: i) != nil else { return }
        let request = "switch to the direct path"
        let t0 = cvdpa_monotonic_ns()
        _ = try dev(request) { () throws(DeviceError) in try device.suspendRing(i) }
        if let relay { try rel(request) { () throws(SystemError) in try relay.detach(i) } }
        let call = session.vrings[i].call
        let at = try dev(request) { () throws(DeviceError) in
            try device.redirectUsedRing(i, usedIOVA: nil, mapping: nil, call: call, interruptEveryBatch: false)
        }
        try dev(request) { () throws(DeviceError) in try device.unmapIOVA(MediatedUsedRing.iova(forRing: i)) }
        let gap = (cvdpa_monotonic_ns() - t0) / 1000
        migration.withLock {
            var m = $0[i] ?? RingMigrationStats()
            m.switchovers += 1
            m.lastSwitchoverGapMicros = gap
            $0[i] = m
        }
        logger.info("ring \(i): back on the direct path at used index \(at) in \(gap) µs")
    }
}

/// Test-only switches, from VDPAD_TEST_* environment variables (docs/TESTING.md).
public struct TestSwitches: Sendable {
    public var skipBufferMarking = false
    public var journal: (any RelayJournal)?
    public init(skipBufferMarking: Bool = false, journal: (any RelayJournal)? = nil) {
        self.skipBufferMarking = skipBufferMarking
        self.journal = journal
    }
}
