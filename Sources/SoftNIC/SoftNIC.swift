import Logging
import Platform
import Synchronization
import DeviceFramework
import Virtio

/// The software vDPA NIC: a virtio-net device whose DMA engine serves the guest's split rings
/// directly through its IOMMU, takes doorbells from the guest's kick eventfds and raises the
/// guest's interrupts on its call eventfds. Like the hardware it stands for, it cannot log
/// dirty pages.
public final class SoftNIC: VDPADevice, @unchecked Sendable {
    // @unchecked Sendable: immutable configuration plus the engine, whose state is confined to
    // its own thread and reached only through `perform`.
    public let queuePairs: Int
    public let portID: String
    public let link: LinkSpec
    public let mac: UInt64
    public let guestMAC: UInt64?
    let engine: DMAEngine
    /// What the control side last applied to the engine: a call that would change nothing costs
    /// no round trip to the engine thread. QEMU turns dirty logging on and off with SET_FEATURES
    /// and waits for the reply holding its main loop; the engine thread may be busy, or waiting
    /// for a CPU, for milliseconds (issue 11, item 4). Only the port's thread calls the device.
    private let applied = Mutex<AppliedState>(AppliedState())
    private struct AppliedState {
        var features: UInt64?
        var enabled: [Int: Bool] = [:]
    }
    private let stats: [QueueCounterSet]

    /// The virtio-net features the device implements: exactly the set the relay can migrate.
    public static let deviceFeatures: UInt64 = VirtioNetFeatureSet.migratable

    public var virtioFeatures: UInt64 { Self.deviceFeatures }

    /// Nothing to restore: the SoftNIC keeps no state a migration would have to carry beyond
    /// the ring positions vhost-user already passes (SET_VRING_BASE).
    public func migrationDone() {}
    public var summary: String {
        "softnic link=\(link) mac=\(Frames.format(mac))" + (guestMAC.map { " guest-mac=\(Frames.format($0))" } ?? "")
    }

    /// `raiser` and `missResolver` are for a device the kernel drives (VDUSE): interrupts of rings
    /// without a call eventfd go to `raiser`, and IOMMU misses are offered to `missResolver`
    /// before a ring faults (see DeviceHooks.swift). A vhost-user port gives neither.
    /// `journal` (tests only, VDPAD_TEST_JOURNAL): while dirty tracking is on, the device journals
    /// every RX range it writes (DMAEngine+Dirty.swift, `journalRX`).
    public init(portID: String, queuePairs: Int, link: LinkSpec, guestMAC: [UInt8]?,
                raiser: (any InterruptRaiser)? = nil, missResolver: (any IOMMUMissResolver)? = nil,
                journal: (any DeviceWriteJournal)? = nil, logger: Logger) throws {
        self.queuePairs = queuePairs
        self.portID = portID
        self.link = link
        // A locally administered MAC derived from the port id (stable across restarts).
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in portID.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        mac = (0x02 << 40) | (h & 0xff_ffff_ffff)
        self.guestMAC = guestMAC.map(Frames.pack)
        stats = (0..<(queuePairs * 2)).map { QueueCounterSet(index: $0) }
        engine = try DMAEngine(portID: portID, link: link, ringCount: queuePairs * 2, macOwn: mac,
                               macGuest: self.guestMAC ?? Frames.broadcast, stats: stats, raiser: raiser,
                               missResolver: missResolver, journal: journal, logger: logger)
        engine.link.generator.epoch = UInt64(UInt16.random(in: 0...UInt16.max))
        try engine.start()
    }

    /// Runs a control operation on the engine and returns its value; throws if the engine has
    /// stopped or does not answer.
    func apply<R: Sendable>(_ what: String, _ body: @escaping @Sendable (DMAEngine) -> R) throws(DeviceError) -> R {
        do { return try engine.perform(body) } catch {
            throw DeviceError("\(what): the DMA engine of port \(portID): \(error)")
        }
    }

    public func setFeatures(_ features: UInt64) throws(DeviceError) {
        // LOG_ALL is vhost-user's, not the device's: the engine has nothing to do for it.
        let deviceBits = features & ~VirtioFeature.vhostLogAll
        if applied.withLock({ $0.features == deviceBits }) { return }
        applied.withLock { $0.features = nil }
        try apply("set features") { e in e.applyFeatures(deviceBits) }
        applied.withLock { $0.features = deviceBits }
    }

    public func setMemory(_ memory: DeviceMemory) throws(DeviceError) {
        try apply("set memory") { $0.setMemory(memory) }
    }

    public func startRing(_ config: VDPARingConfig) throws(DeviceError) {
        applied.withLock { $0.enabled[config.index] = nil }
        try apply("start ring \(config.index)") { e in
            e.rings[config.index].guestUsedGPA = config.usedGPA
            e.rings[config.index].guestAvailGPA = config.availGPA
            let r = e.rings[config.index]
            let continues = r.stoppedAt.map { $0.desc == config.descGPA && $0.avail == config.availGPA && $0.next == config.base } ?? false
            if config.index % 2 == 0 && e.link.kind == .source && !continues {
                // Each new run of the generator gets a new epoch: numbers never repeat. A ring
                // started again exactly where it stopped (a reset-based switchover) continues.
                e.link.generator.restart()
            }
            e.startRing(config)
        }
    }

    public func setRingEnabled(_ index: Int, _ enabled: Bool) throws(DeviceError) {
        if applied.withLock({ $0.enabled[index] == enabled }) { return }
        applied.withLock { $0.enabled[index] = nil }
        try apply("enable ring \(index)") { e in
            if !enabled { e.flush(e.rings[index]) }
            e.rings[index].enabled = enabled
            e.rebuildActive()
        }
        applied.withLock { $0.enabled[index] = enabled }
    }

    public func setRingCall(_ index: Int, _ call: SharedFD?) throws(DeviceError) {
        try apply("set ring \(index)'s call") { e in
            e.setCall(e.rings[index], call)
        }
    }

    public func stopRing(_ index: Int) throws(DeviceError) -> UInt16 {
        try apply("stop ring \(index)") { e in
            let r = e.rings[index]
            let at = r.lastAvail
            e.stopRingLocal(r)
            r.guestUsedGPA = 0
            return at
        }
    }

    public func sendRARP(mac: [UInt8]) -> Bool {
        let frame = Frames.rarp(mac: mac)
        // false when the engine refused (stopped, or not answering: `perform` logged why) or had no buffer.
        do {
            return try engine.perform { e -> Bool in
                frame.withUnsafeBytes { raw -> Bool in
                    guard let p = raw.baseAddress else { return false }
                    switch e.link.kind {
                    case .tap, .wire:
                        // Sent as if the guest had sent it on TX ring 1 (not before the tap has the
                        // negotiated header size).
                        if !e.tapReady { e.rings[1].stats.drop(.linkError); return false }
                        if !e.link.send(p, length: raw.count, header: VirtioNetHeader(), headerLength: e.headerLength) { e.rings[1].stats.drop(.linkError) }
                        e.link.notifyPeer()
                        return true
                    case .loopback:
                        guard let rx = e.nextRX(), e.deliver(p, length: raw.count, to: rx) else { return false }
                        e.flush(rx)
                        return true
                    case .sink, .source:
                        return true  // consumed by the link, like any frame sent there
                    }
                }
            }
        } catch { return false }
    }

    public func counters() -> [QueueCounters] { stats.map(\.snapshot) }

    /// Frames read from the tap straight into the guest's buffers, per RX queue (the rest went
    /// through the device's buffer).
    public func tapDirectFrames() -> [UInt64] { stride(from: 0, to: stats.count, by: 2).map { stats[$0].tapDirect.load(ordering: .relaxed) } }

    public func redirectUsedRing(_ index: Int, usedIOVA: UInt64?, mapping: IOVAMapping?, call: SharedFD?,
                                 interruptEveryBatch: Bool) throws(DeviceError) -> UInt16 {
        try apply("redirect ring \(index)'s used ring") { e in
            let r = e.rings[index]
            let at = e.suspend(r)
            if let mapping {
                e.extraMappings[mapping.iova] = mapping
                e.setMemory(e.memory)
            }
            let target = usedIOVA ?? r.guestUsedGPA
            e.redirect(r, usedGPA: target, call: call, interruptEveryBatch: interruptEveryBatch)
            e.resume(r)
            return at
        }
    }

    /// The avail relay's seam: the used ring, and with `redirect.avail` the avail ring and the
    /// doorbell, moved between two batches of the ring (see `DMAEngine.redirect`).
    public var canRedirectAvailRing: Bool { true }

    public func redirectRing(_ index: Int, _ redirect: RingRedirect) throws(DeviceError) -> RingPosition {
        try apply("redirect ring \(index)") { e in
            let r = e.rings[index]
            let used = e.suspend(r)
            let position = RingPosition(nextAvail: r.lastAvail, usedIndex: used)
            if !redirect.mappings.isEmpty {
                for m in redirect.mappings { e.extraMappings[m.iova] = m }
                e.setMemory(e.memory)
            }
            e.redirect(r, usedGPA: redirect.usedIOVA ?? r.guestUsedGPA, call: redirect.call,
                       interruptEveryBatch: redirect.interruptEveryBatch, avail: redirect.avail)
            if !redirect.unmaps.isEmpty {
                // The ring no longer points into them (redirect translated it again above).
                var removed = false
                for iova in redirect.unmaps where e.extraMappings.removeValue(forKey: iova) != nil { removed = true }
                if removed { e.setMemory(e.memory) }
            }
            e.resume(r)
            return position
        }
    }

    public func suspendRing(_ index: Int) throws(DeviceError) -> UInt16 {
        try apply("suspend ring \(index)") { e in e.suspend(e.rings[index]) }
    }

    public func unmapIOVA(_ iova: UInt64) throws(DeviceError) {
        try apply("unmap IOVA 0x\(String(iova, radix: 16))") { e in
            if e.extraMappings.removeValue(forKey: iova) != nil { e.setMemory(e.memory) }
        }
    }

    public func reset() {
        applied.withLock { $0 = AppliedState() }
        // The protocol's reset cannot fail: an engine that has stopped serves nothing and holds
        // no ring, so there is nothing left to reset; `perform` has logged why it refused.
        do {
            try engine.perform { e in
                for r in e.rings where r.config != nil { e.stopRingLocal(r) }
                for r in e.rings { r.enabled = false; r.failure = nil }
                e.extraMappings.removeAll()
                e.setMemory(.empty)
            }
        } catch {}
    }

    public func close() {
        engine.stop()
    }

    /// Runs the DMA engine's work on its own thread, between two batches, until a pass finds
    /// nothing to do or `maxPasses` passes ran; returns the chains and frames moved. The engine
    /// keeps running on its own afterwards. For tests and the session fuzz target
    /// (Fuzz/session-engine): after it returns, everything the rings held when it was called has
    /// been served (or has faulted the ring), so a check that follows sees a settled device
    /// without sleeping. With a `source` link there is always work: it stops at `maxPasses`.
    public func serviceUntilIdle(maxPasses: Int = 1024) -> Int {
        // 0 when the engine refused (stopped, or not answering: `perform` logged why).
        do {
            return try engine.perform { e in
            var total = 0
            var passes = 0
            while passes < maxPasses {
                let n = e.serviceOnce()
                passes += 1
                if n == 0 { break }
                total += n
            }
            return total
            }
        } catch { return 0 }
    }
}
