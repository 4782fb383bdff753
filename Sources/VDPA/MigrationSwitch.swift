import DeviceFramework
import Logging
import Platform
import Relay
import Synchronization
import VhostUser
import Virtio

/// What the frontend has configured, as the device side keeps it from the session's events.
struct FrontendState {
    var features: UInt64 = 0
    var memory = GuestMemoryTable.empty
    var log: DirtyLog?
    /// Rings the device runs, as they started (their enable state and call kept current).
    var rings: [Int: RingSetup] = [:]

    var logAll: Bool { features & VirtioFeature.vhostLogAll != 0 }
    var started: [Int] { rings.keys.sorted() }
}

/// How the switch moves a ring between the direct path and the relay: it asks the device to
/// suspend the ring, point its used ring elsewhere and resume (`redirectUsedRing`). How the
/// device does that is its own: the SoftNIC per ring between two batches; a kernel device by
/// SUSPEND/RESUME, or, without them, by a reset and reprogramming from each ring's used index
/// (VhostVDPASwitchover).
public enum SwitchoverStrategy: String, Sendable {
    case suspendAndRedirect
}

/// Switches rings between the direct path and the relay when dirty logging starts and stops:
/// owns the relay, the mediated used rings and each ring's mode. Lives on the port's thread,
/// beside the `DeviceBinding` that maps session events to device operations and calls it for
/// everything that depends on logging.
final class MigrationSwitch {
    let device: any VDPADevice
    let logger: Logger
    let relayMode: RelayLoopMode
    /// `relay=`, `migration=`, `log=` of the port.
    let options: MigrationOptions
    let portID: String
    let stats: MigrationStatsTable
    let testSwitches: TestSwitches
    let strategy = SwitchoverStrategy.suspendAndRedirect
    private(set) var relay: RelayEngine?
    /// Each ring's mode; absent = direct. The mediated ring of a relayed ring lives here.
    private var modes: [Int: Mode] = [:]
    /// Rings whose avail ring is mediated too (`relay=avail+used`), with their mediated avail ring.
    private var mediatedAvail: [Int: MediatedAvailRing] = [:]
    private enum Mode { case held, relay(MediatedUsedRing) }
    /// The log in force when the last running ring stopped. QEMU frees its log when it stops the
    /// device (vhost_dev_stop) and sends a new one when it starts it again, after the rings; until
    /// then the old one must not be marked (the marks would be lost). Rings that start while
    /// LOG_ALL is on wait for a new log; a frontend that enables them without sending one keeps
    /// its old log, which is then used.
    var staleLog: DirtyLog?
    /// `migration=iommu-dirty`: folds the device's dirty bits into the log; the rings stay direct
    /// (MigrationSwitch+IOMMUDirty.swift). nil with `migration=relay`.
    let dirtyFolder: DirtyFolder?

    init(device: any VDPADevice, portID: String, relayMode: RelayLoopMode, options: MigrationOptions = MigrationOptions(),
         stats: MigrationStatsTable, testSwitches: TestSwitches, logger: Logger) {
        self.options = options
        self.device = device
        self.portID = portID
        self.relayMode = relayMode
        self.stats = stats
        self.testSwitches = testSwitches
        self.logger = logger
        dirtyFolder = Self.makeDirtyFolder(device: device, portID: portID, options: options, stats: stats,
                                           testSwitches: testSwitches, logger: logger)
        // No relay thread for a port that never relays.
        if options.method == .iommuDirty { return }
        // The relay thread starts with the port and sleeps until a ring is attached, so the
        // first LOG_ALL (which QEMU waits for, holding its main loop) does not wait for a thread
        // to start (issue 11, item 4). Should it fail to start here, the first switch tries again.
        do { _ = try relayEngine() } catch {
            logger.warning("relay thread not started with the port (\(error)); the first switchover will start it")
        }
    }

    deinit {
        relay?.stop()
        dirtyFolder?.close()
    }

    func mode(ofRing index: Int) -> RingMode {
        switch modes[index] {
        case nil: .direct
        case .held: .held
        case .relay: .relay
        }
    }

    private func setMode(_ index: Int, _ mode: Mode?) {
        modes[index] = mode
        let m = self.mode(ofRing: index)
        stats.withLock { $0[index, default: RingMigrationStats()].mode = m }
    }

    private var relayedRings: [Int] { modes.compactMap { if case .relay = $0.value { $0.key } else { nil } }.sorted() }
    private var heldRings: [Int] { modes.compactMap { if case .held = $0.value { $0.key } else { nil } }.sorted() }

    /// Whether `s.log` may be marked now.
    func hasUsableLog(_ s: FrontendState) -> Bool { s.log != nil && s.log !== staleLog }

    /// Whether ring `index` must start mediated: logging is on and it is an RX ring (TX rings stay
    /// direct: the device writes only their used ring, marked whole when they stop), or any ring
    /// with `relay=avail+used` (fully mediated: every chain the guest posts is checked).
    func startsMediated(_ index: Int, _ s: FrontendState) -> Bool { s.logAll && mediates(index) && dirtyFolder == nil }

    /// Whether logging moves ring `index` to the relay.
    private func mediates(_ index: Int) -> Bool { index % 2 == 0 || options.relay == .availUsed }

    /// A ring the binding started disabled because `startsMediated`: it goes to the relay and then
    /// takes its enable state, or is held until the log arrives.
    func takeOver(_ index: Int, _ s: FrontendState) throws(VhostUserError) {
        guard hasUsableLog(s) else {
            setMode(index, .held)
            logger.info("ring \(index): started while LOG_ALL is on but before SET_LOG_BASE: held until the log arrives")
            return
        }
        try switchToRelay(index, s)
        try dev(logger, "start ring \(index)") { () throws(DeviceError) in try device.setRingEnabled(index, s.rings[index]?.enabled ?? false) }
    }

    /// The device has stopped ring `index` (GET_VRING_BASE): a relayed ring's last completions are
    /// relayed and its used ring marked; a direct ring's used ring is marked whole while logging.
    /// Returns the base to answer when it is not the device's: a ring under the avail relay
    /// answers the relay's guest-side position (see `AvailRelayState`).
    func ringStopped(_ index: Int, _ s: FrontendState) throws(VhostUserError) -> UInt16? {
        let request = "GET_VRING_BASE"
        // iommu-dirty: the device stopped the ring; its bits are folded before the answer.
        if dirtyFolder != nil { try dirtyRingStopped(index, s) }
        let was = modes[index]
        setMode(index, nil)
        var base: UInt16?
        if case .relay = was {
            // The device completed what it took into the mediated ring: relay the rest, mark the
            // whole used ring, and stop touching this ring.
            if let relay { base = try rel(logger, request) { () throws(SystemError) in try relay.detach(index) }?.nextAvail }
            try dev(logger, request) { () throws(DeviceError) in try device.unmapIOVA(MediatedUsedRing.iova(forRing: index)) }
            if mediatedAvail.removeValue(forKey: index) != nil {
                try dev(logger, request) { () throws(DeviceError) in try device.unmapIOVA(MediatedAvailRing.iova(forRing: index)) }
            }
            try releaseRelayStateIfIdle(request)
        } else if s.logAll, hasUsableLog(s), let log = s.log, let ring = s.rings[index] {
            // A ring kept direct while logging (TX: the device only writes its used ring there):
            // its whole used ring is marked now, so the final log is complete.
            log.mark(gpa: ring.usedLogGPA, length: UInt64(SplitRingLayout.usedRingBytes(queueSize: ring.size)))
        }
        if s.rings.keys.allSatisfy({ $0 == index }), let log = s.log { staleLog = log }
        if dirtyFolder != nil { try syncDirtyFolderLog(s, request) }
        return base
    }

    /// SET_VRING_ENABLE: returns true when the switch took care of it (the binding then does not
    /// pass it to the device).
    func enableChanged(_ index: Int, enabled: Bool, _ s: FrontendState) throws(VhostUserError) -> Bool {
        if dirtyFolder != nil { try dirtyEnableChanged(enabled: enabled, s); return false }
        guard case .held = modes[index] else { return false }
        if enabled && s.logAll && s.log != nil && s.log === staleLog {
            // Enabled without a new SET_LOG_BASE since the device stopped: this frontend keeps its
            // log across a restart (QEMU sends a new one before enabling), so it is marked.
            staleLog = nil
            try relayRingsAwaitingLog(s)
        }
        // Otherwise a held ring stays disabled; the enable takes effect once it is relayed.
        return true
    }

    /// SET_VRING_CALL on a running ring: a relayed ring's guest interrupt is the relay's to raise.
    /// Returns true when the switch took care of it.
    func callChanged(_ index: Int, _ call: SharedFD?) throws(VhostUserError) -> Bool {
        guard case .relay = modes[index], let relay else { return false }
        try rel(logger, "SET_VRING_CALL") { () throws(SystemError) in try relay.setGuestCall(index, call) }
        return true
    }

    /// SET_FEATURES, after the device took the features: logging on switches every running RX
    /// ring to the relay (or holds it until the log arrives), logging off switches them back.
    func featuresChanged(_ s: FrontendState) throws(VhostUserError) {
        let request = "SET_FEATURES"
        if dirtyFolder != nil { try dirtyFeaturesChanged(s); return }
        if s.logAll {
            guard hasUsableLog(s) else {
                // Logging on before the log exists: hold every running RX ring (what it completed
                // so far is published) until SET_LOG_BASE, then relay it.
                for i in s.started where mediates(i) && modes[i] == nil {
                    try dev(logger, request) { () throws(DeviceError) in try device.setRingEnabled(i, false) }
                    setMode(i, .held)
                }
                let held = heldRings
                if !held.isEmpty { logger.info("LOG_ALL set before SET_LOG_BASE: ring(s) \(held) held until the log arrives") }
                return
            }
            try relayRingsAwaitingLog(s)
            for i in s.started where mediates(i) && modes[i] == nil { try switchToRelay(i, s) }
        } else {
            for i in relayedRings { try switchToDirect(i, s) }
            // Logging was turned off before the log came: the held rings go back to work, direct.
            for i in heldRings {
                try dev(logger, request) { () throws(DeviceError) in try device.setRingEnabled(i, s.rings[i]?.enabled ?? false) }
                setMode(i, nil)
            }
            try releaseRelayStateIfIdle(request)
        }
    }

    /// SET_LOG_BASE (or logging ended): a new log takes over all marking before this returns
    /// (QEMU resizes it when memory grows, then frees the old one right after our reply).
    func logChanged(_ s: FrontendState) throws(VhostUserError) {
        let request = "SET_LOG_BASE"
        let relayed = relayedRings
        if !relayed.isEmpty, let relay {
            let log = s.log
            try rel(logger, request) { () throws(SystemError) in try relay.setLog(log) }
            for i in relayed {
                guard let gpa = s.rings[i]?.usedLogGPA else { continue }
                try rel(logger, request) { () throws(SystemError) in try relay.setUsedLogAddress(i, gpa) }
            }
        }
        if s.log !== staleLog { staleLog = nil }
        if dirtyFolder != nil { try syncDirtyFolderLog(s, request) }
        if s.logAll && hasUsableLog(s) { try relayRingsAwaitingLog(s) }
    }

    /// SET_VRING_ADDR toggled the log flag of a running ring.
    func usedLogAddressChanged(_ index: Int, _ gpa: UInt64) throws(VhostUserError) {
        guard case .relay = modes[index], let relay else { return }
        try rel(logger, "SET_VRING_ADDR") { () throws(SystemError) in try relay.setUsedLogAddress(index, gpa) }
    }

    func memoryChanged(_ table: GuestMemoryTable) throws(VhostUserError) {
        if let dirtyFolder { try dirtyCall("SET_MEM_TABLE") { () throws(DeviceError) in try dirtyFolder.setRegions(table.viewRegions, "SET_MEM_TABLE") } }
        guard !relayedRings.isEmpty, let relay else { return }
        try rel(logger, "SET_MEM_TABLE") { () throws(SystemError) in try relay.setMemory(table) }
    }

    /// The log has arrived while LOG_ALL is on: rings held for it switch to the relay, then take
    /// the enable state the frontend gave them.
    private func relayRingsAwaitingLog(_ s: FrontendState) throws(VhostUserError) {
        for i in heldRings {
            try switchToRelay(i, s)
            try dev(logger, "SET_LOG_BASE") { () throws(DeviceError) in try device.setRingEnabled(i, s.rings[i]?.enabled ?? false) }
        }
    }

    /// When no ring is relayed, the relay keeps no reference to the frontend's memory or log, so
    /// neither stays mapped after the migration or the connection ends.
    private func releaseRelayStateIfIdle(_ request: String) throws(VhostUserError) {
        guard relayedRings.isEmpty, let relay else { return }
        try rel(logger, request) { () throws(SystemError) in
            try relay.setLogAndMemory(nil, .empty)
        }
    }

    /// Best effort (the connection is going or the device is reset): failures are logged. The
    /// device's reset, which follows, drops the mediated rings' IOVA mappings.
    func reset() {
        for i in relayedRings {
            do throws(SystemError) { try relay?.detach(i) } catch { logger.error("reset: \(error)") }
        }
        for i in Array(modes.keys) { setMode(i, nil) }
        dirtyFolder?.reset()
        mediatedAvail.removeAll()
        staleLog = nil
        do throws(VhostUserError) { try releaseRelayStateIfIdle("reset") } catch { logger.error("reset: \(error)") }
    }

    // MARK: switchover

    /// Direct → relay, without a reset: suspend the ring, point its used ring at a mediated ring
    /// in the reserved IOVA range and its interrupt at the relay, resume; then the relay takes
    /// over from the index the device had reached. If that cannot be done, the ring is held
    /// disabled (its writes could not be logged) and the error fails the frontend's message.
    private func switchToRelay(_ i: Int, _ s: FrontendState) throws(VhostUserError) {
        guard let ring = s.rings[i] else { return }
        let t0 = MonotonicClock.nanoseconds
        let iova = MediatedUsedRing.iova(forRing: i)
        var redirected = false
        do {
            let relay = try relayEngine()
            try relay.setLogAndMemory(s.log, s.memory)
            let mediated = try MediatedUsedRing(size: ring.size)
            let usedBytes = SplitRingLayout.usedRingBytes(queueSize: ring.size)
            if let table = s.memory.hostPointer(gpa: ring.usedGPA, length: UInt64(usedBytes)) {
                // Seed the device's notification state (flags, avail_event) from the guest's ring.
                // Safety: the mediated ring holds at least usedBytes (its size rounded up to a
                // page), and `table` was translated for usedBytes inside guest memory.
                mediated.base.copyMemory(from: table, byteCount: usedBytes)
            }
            let deviceCall = SharedFD(try EventFD.make())
            let counters = RelayCounters()
            // The gap: from suspending the ring until the relay has taken it over.
            let held = MonotonicClock.nanoseconds
            let usedMapping = IOVAMapping(iova: iova, size: UInt64(mediated.byteCount), host: mediated.base, owner: mediated)
            var config = RelayRingConfig(ring: ring, deviceWritesBuffers: i % 2 == 0,
                                         eventIdx: s.features & VirtioFeature.ringEventIdx != 0)
            config.deviceMayNotInterrupt = !device.interruptsEveryBatch
            config.log = options.log
            let at: UInt16
            if options.relay == .availUsed {
                // The avail relay: the device reads a mediated avail ring (its idx seeded by the
                // device with its next avail index, so positions carry over) and is kicked by the
                // relay, which now sleeps on the guest's kick.
                let availRing = try MediatedAvailRing(size: ring.size)
                let availIOVA = MediatedAvailRing.iova(forRing: i)
                let deviceKick = SharedFD(try EventFD.make())
                let position = try device.redirectRing(i, RingRedirect(
                    usedIOVA: iova, avail: AvailRedirect(availIOVA: availIOVA, kick: deviceKick), call: deviceCall,
                    mappings: [usedMapping, IOVAMapping(iova: availIOVA, size: UInt64(availRing.byteCount), host: availRing.base, owner: availRing)],
                    interruptEveryBatch: true))
                redirected = true
                mediatedAvail[i] = availRing
                config.indirect = s.features & VirtioFeature.ringIndirectDesc != 0
                try relay.attach(config, mediated: mediated, mediatedAvail: availRing, position: position, deviceCall: deviceCall,
                                 deviceKick: deviceKick, counters: counters)
                at = position.usedIndex
            } else {
                at = try device.redirectUsedRing(i, usedIOVA: iova, mapping: usedMapping, call: deviceCall, interruptEveryBatch: true)
                redirected = true
                try relay.attach(config,
                                 mediated: mediated, startIndex: at, deviceCall: deviceCall, counters: counters)
            }
            setMode(i, .relay(mediated))
            let gap = (MonotonicClock.nanoseconds - held) / 1000
            let setup = (held - t0) / 1000
            recordSwitch(i, gapMicros: gap, counters: counters)
            logger.info("ring \(i): switched to the relay (\(relayMode.rawValue) loop) at used index \(at): ring held \(gap) µs (after \(setup) µs of preparation)")
        } catch {
            // Hold the ring: nothing it completes could be logged. Best effort, the message fails
            // either way and the port closes the connection (reset then stops every ring).
            do throws(DeviceError) {
                try device.setRingEnabled(i, false)
                if redirected { try device.unmapIOVA(iova) }
                if mediatedAvail.removeValue(forKey: i) != nil { try device.unmapIOVA(MediatedAvailRing.iova(forRing: i)) }
            } catch { logger.error("ring \(i): \(error)") }
            logger.error("ring \(i): cannot switch to the relay: \(error); the ring is held disabled")
            throw VhostUserError(.device, "switch to the relay", field: "ring \(i)", "\(error)")
        }
    }

    /// Relay → direct: suspend, relay what remains, point the used ring back at the guest's, resume.
    private func switchToDirect(_ i: Int, _ s: FrontendState) throws(VhostUserError) {
        guard case .relay = modes[i] else { return }
        setMode(i, nil)
        let request = "switch to the direct path"
        let t0 = MonotonicClock.nanoseconds
        _ = try dev(logger, request) { () throws(DeviceError) in try device.suspendRing(i) }
        var guestPosition: RingPosition?
        if let relay { guestPosition = try rel(logger, request) { () throws(SystemError) in try relay.detach(i) } }
        let call = s.rings[i]?.call
        let at: UInt16
        if mediatedAvail.removeValue(forKey: i) != nil {
            // Back from the avail relay. Invariant: every chain the guest posted before the relay's
            // guest base B has been completed to the guest exactly once (accepted ones by the
            // device, relayed; rejected ones by the relay) and none at or after B has, so the
            // guest's used index is B too (AvailRelayState). The device, suspended having completed
            // every slot it took, goes back to the guest's avail ring and kick at next avail = B
            // with used index = B: chains the relay had accepted but the device had not taken are
            // read again from the guest's ring (nothing lost or repeated), and rejected chains
            // after B meet the device's own walker there, as any chain posted on the direct path.
            guard let p = guestPosition else {
                throw VhostUserError(.device, request, field: "relay", "ring \(i): the relay gave no guest position")
            }
            let kick = s.rings[i]?.kick
            _ = try dev(logger, request) { () throws(DeviceError) in
                try device.redirectRing(i, RingRedirect(usedIOVA: nil, avail: AvailRedirect(availIOVA: nil, kick: kick, position: p),
                                                        call: call, interruptEveryBatch: false,
                                                        unmaps: [MediatedUsedRing.iova(forRing: i), MediatedAvailRing.iova(forRing: i)]))
            }
            at = p.usedIndex
        } else {
            at = try dev(logger, request) { () throws(DeviceError) in
                try device.redirectRing(i, RingRedirect(usedIOVA: nil, call: call, interruptEveryBatch: false,
                                                        unmaps: [MediatedUsedRing.iova(forRing: i)])).usedIndex
            }
        }
        let gap = (MonotonicClock.nanoseconds - t0) / 1000
        recordSwitch(i, gapMicros: gap, counters: nil)
        logger.info("ring \(i): back on the direct path at used index \(at) in \(gap) µs")
    }

    private func recordSwitch(_ i: Int, gapMicros: UInt64, counters: RelayCounters?) {
        stats.withLock {
            var m = $0[i] ?? RingMigrationStats()
            m.switchovers += 1
            m.lastSwitchoverGapMicros = gapMicros
            if let counters { m.counters = counters }
            $0[i] = m
        }
    }

    /// The port's relay thread: made with the port (see init), or on the first switch if that failed.
    private func relayEngine() throws -> RelayEngine {
        if let relay { return relay }
        let r = try RelayEngine(mode: relayMode, name: portID, logger: logger)
        relay = r
        stats.relay.withLock { $0 = r }
        try r.setTestSwitches(skipBufferMarking: testSwitches.skipBufferMarking, journal: testSwitches.journal)
        return r
    }
}
