import DeviceFramework
import Logging
import Platform
import Synchronization
import Virtio

/// How a kernel vDPA device is moved between states it cannot reach while running (a ring
/// added, removed, enabled or disabled, a used ring pointed elsewhere).
public enum VhostVDPASwitchover: String, Sendable, Codable {
    /// SUSPEND, change the rings, RESUME: the device keeps its ring positions (vhost-vdpa's
    /// VHOST_BACKEND_F_SUSPEND and _RESUME).
    case suspend
    /// Reset the device (every completion it made is then in a used ring), read each ring's used
    /// index from memory, program the rings again from those indices, DRIVER_OK. For devices
    /// without SUSPEND/RESUME (VDUSE in Linux 6.12). Chains the device had taken but not
    /// completed are taken again after the reset: RX buffers are refilled, an unfinished TX
    /// frame may be sent twice. This assumes the device completes chains in the order it took
    /// them (as virtio-net devices do in practice, and the SoftNIC does): then nothing completed
    /// is lost or repeated. A device that completes out of order (allowed without IN_ORDER)
    /// could have a chain before the used index still in flight, which would be taken again.
    case reset
}

/// A kernel vDPA network device (`/dev/vhost-vdpa-N`) behind a vhost-user port. The frontend's
/// memory is mapped into the device's IOTLB at IOVA = guest-physical address; the frontend's
/// kick and call eventfds are handed to the kernel, which connects them to the device's doorbell
/// and interrupt: no daemon thread is in the data path. Calls come from the port's thread (the
/// `VDPADevice` contract); `info` and `counters` may come from any thread.
public final class VhostVDPADevice: VDPADevice, @unchecked Sendable {
    // @unchecked Sendable: the mutable driver state is touched only from the port's thread (the
    // protocol's contract); what other threads read is the `snapshot`, behind its mutex.
    private let kernel: any VhostVDPAKernel
    private let logger: Logger
    public let path: String
    public let queuePairs: Int
    /// Virtio features the device offers (VHOST_GET_FEATURES).
    public let deviceFeatures: UInt64
    /// Backend features acked (VHOST_SET_BACKEND_FEATURES).
    public let backendFeatures: UInt64
    public let switchover: VhostVDPASwitchover
    private let queueCount: UInt32
    private let maxQueueSize: UInt16

    private struct Ring {
        var size: UInt16
        var desc: UInt64, avail: UInt64, guestUsed: UInt64
        /// Where the device writes completions now (guest used ring, or a mediated ring).
        var used: UInt64
        /// The avail index the device (re)starts from when the ring is programmed.
        var base: UInt16
        var kick: SharedFD?
        var call: SharedFD?
        var enabled: Bool
    }
    private var rings: [Int: Ring] = [:]
    private var negotiated: UInt64?
    private var memory = DeviceMemory.empty
    private var extra: [UInt64: IOVAMapping] = [:]
    /// What the device's IOTLB holds, by IOVA: (size, host address).
    private var mapped: [UInt64: (size: UInt64, uaddr: UInt64)] = [:]
    /// DRIVER_OK is set and the rings in `rings` that are enabled run.
    private var live = false
    private var suspended = false
    /// Set by a reset-kind quiesce: the device is reset and must be programmed again.
    private var needsProgram = false
    /// False once the device may no longer hold what `mapped` says: after a reset without
    /// IOTLB_PERSIST (the kernel asks the device to drop its mappings), or a batch that failed
    /// part-way. The next IOTLB change then invalidates everything and maps it all again.
    private var mapTrusted = true
    /// What status output shows (`details`), kept current by `publish`; read from any thread.
    private let snapshot: Mutex<DeviceDetails>

    /// The virtio-net configuration fields the driver reads (virtio spec 5.1.4).
    struct NetConfig {
        var mac: [UInt8]?
        var maxQueuePairs: UInt16
        var mtu: UInt16?
    }

    /// Opens the device through `kernel` (`VhostVDPAFile(path:)` for a real one) and reads what
    /// it offers. `forceReset` makes the reset switchover the one used even when the device can
    /// suspend (tests compare the two kinds on one device).
    public init(kernel: any VhostVDPAKernel, path: String, forceReset: Bool = false, logger: Logger) throws(DeviceError) {
        self.kernel = kernel
        self.path = path
        self.logger = logger
        func k<R>(_ what: String, _ body: () throws(SystemError) -> R) throws(DeviceError) -> R {
            do { return try body() } catch { throw DeviceError("\(path): \(what): \(error)") }
        }
        try k("VHOST_SET_OWNER (is another process driving this device?)") { () throws(SystemError) in try kernel.setOwner() }
        let deviceID = try k("device id") { () throws(SystemError) in try kernel.deviceID() }
        guard deviceID == 1 else {
            throw DeviceError("\(path): virtio device id \(deviceID) is not a network device (1): vdpad drives vDPA NICs only")
        }
        let offered = try k("backend features") { () throws(SystemError) in try kernel.backendFeatures() }
        guard offered & VhostBackendFeature.iotlbMsgV2 != 0 else {
            throw DeviceError("\(path): the device does not offer IOTLB_MSG_V2 (backend features 0x\(String(offered, radix: 16))): too old a kernel")
        }
        // ENABLE_AFTER_DRIVER_OK is not taken: every enable change on a running device goes the
        // reset way (see setRingEnabled), one path for every device, the one the tests run.
        // IOTLB_PERSIST is taken when offered: the device then keeps its mappings across a reset
        // (without it the kernel asks the device to drop them, and the driver maps everything
        // again after each reset: on a device that pins memory, all guest RAM re-pinned).
        let wanted = VhostBackendFeature.iotlbMsgV2 | VhostBackendFeature.iotlbBatch | VhostBackendFeature.suspend
            | VhostBackendFeature.resume | VhostBackendFeature.iotlbPersist
        let acked = offered & wanted
        backendFeatures = acked
        try k("set backend features") { () throws(SystemError) in try kernel.setBackendFeatures(acked) }
        deviceFeatures = try k("features") { () throws(SystemError) in try kernel.deviceFeatures() }
        queueCount = try k("queue count") { () throws(SystemError) in try kernel.queueCount() }
        maxQueueSize = try k("maximum queue size") { () throws(SystemError) in try kernel.maxQueueSize() }
        let size = try k("config size") { () throws(SystemError) in try kernel.configSize() }
        let bytes = try k("config") { () throws(SystemError) in try kernel.readConfig(offset: 0, length: min(size, 12)) }
        let config = Self.parseConfig(bytes, features: deviceFeatures)
        let range = try k("IOVA range") { () throws(SystemError) in try kernel.iovaRange() }
        guard range.first == 0, range.last >= reservedIOVABase + (1 << 30) else {
            throw DeviceError("\(path): the device maps IOVA [0x\(String(range.first, radix: 16)), 0x\(String(range.last, radix: 16))] only: it needs guest-physical addresses from 0 and the daemon's range at 0x\(String(reservedIOVABase, radix: 16))")
        }
        guard queueCount >= 2 else { throw DeviceError("\(path): \(queueCount) virtqueue(s): a NIC needs at least one RX/TX pair") }
        // One pair: see `virtioFeatures` (MQ needs the control queue).
        queuePairs = 1
        let canSwitchBySuspend = backendFeatures & VhostBackendFeature.suspend != 0 && backendFeatures & VhostBackendFeature.resume != 0
        switchover = canSwitchBySuspend && !forceReset ? .suspend : .reset
        var d = DeviceDetails(driver: "vhost-vdpa")
        d.path = path
        d.deviceFeatures = "0x" + String(deviceFeatures, radix: 16)
        d.backendFeatures = VhostBackendFeature.names(acked)
        d.switchover = switchover.rawValue
        d.status = 0
        d.mac = config.mac.map(Self.formatMAC)
        d.mtu = config.mtu.map(Int.init)
        d.maxQueuePairs = Int(config.maxQueuePairs)
        d.rings = []
        snapshot = Mutex(d)
        try statusReset()
    }

    static func parseConfig(_ b: [UInt8], features: UInt64) -> NetConfig {
        func u16(_ o: Int) -> UInt16? { b.count >= o + 2 ? UInt16(b[o]) | UInt16(b[o + 1]) << 8 : nil }
        let mac = features & VirtioNetFeature.mac != 0 && b.count >= 6 ? Array(b[0..<6]) : nil
        let pairs = features & VirtioNetFeature.mq != 0 ? (u16(8) ?? 1) : 1
        let mtu = features & VirtioNetFeature.mtu != 0 ? u16(10) : nil
        return NetConfig(mac: mac, maxQueuePairs: pairs, mtu: mtu)
    }

    static func formatMAC(_ m: [UInt8]) -> String {
        m.map { let s = String($0, radix: 16); return s.count == 1 ? "0" + s : s }.joined(separator: ":")
    }

    // MARK: VDPADevice

    public var summary: String {
        "vhost-vdpa \(path) queues=\(queueCount) switchover=\(switchover.rawValue) backend=\(VhostBackendFeature.names(backendFeatures).joined(separator: "+"))"
    }

    /// The device's features less those the vhost-user side must not see: ACCESS_PLATFORM (the
    /// frontend gives guest-physical addresses; the daemon is the device's IOMMU).
    /// MQ too: several queue pairs are switched on through the device's control queue
    /// (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET), which the daemon does not drive yet, and devices that
    /// follow the spec refuse MQ without CTRL_VQ (mlx5 does). One queue pair until then.
    public var virtioFeatures: UInt64 { deviceFeatures & ~VirtioFeature.accessPlatform & ~VirtioNetFeature.mq }


    /// The device interrupts as the guest's avail ring says, never on the relay's request.
    public var interruptsEveryBatch: Bool { false }

    public var details: DeviceDetails? { snapshot.withLock { $0 } }

    private func k<R>(_ what: String, _ body: () throws(SystemError) -> R) throws(DeviceError) -> R {
        do { return try body() } catch { throw DeviceError("\(path): \(what): \(error)") }
    }

    public func setFeatures(_ features: UInt64) throws(DeviceError) {
        // Only the device's own bits: vhost-user's (LOG_ALL, PROTOCOL_FEATURES) are the port's.
        var want = features & deviceFeatures & ~VirtioFeature.vhostLogAll & ~VirtioFeature.vhostUserProtocolFeatures
        want |= deviceFeatures & VirtioFeature.accessPlatform
        if negotiated == want { return }
        if negotiated != nil {
            guard rings.isEmpty else {
                throw DeviceError("\(path): features 0x\(String(want, radix: 16)) asked while rings run with 0x\(String(negotiated ?? 0, radix: 16)): a device takes features once per reset")
            }
            try resetDevice()
        }
        try negotiate(want)
        publish()
    }

    private func negotiate(_ want: UInt64) throws(DeviceError) {
        let s = VirtioStatus.acknowledge | VirtioStatus.driver
        try k("status ACKNOWLEDGE|DRIVER") { () throws(SystemError) in try kernel.setStatus(s) }
        try k("set features 0x\(String(want, radix: 16))") { () throws(SystemError) in try kernel.setFeatures(want) }
        try k("status FEATURES_OK") { () throws(SystemError) in try kernel.setStatus(s | VirtioStatus.featuresOK) }
        let now = try k("status") { () throws(SystemError) in try kernel.status() }
        guard now & VirtioStatus.featuresOK != 0 else {
            throw DeviceError("\(path): the device refused features 0x\(String(want, radix: 16)) (status 0x\(String(now, radix: 16)) without FEATURES_OK)")
        }
        negotiated = want
    }

    public func setMemory(_ memory: DeviceMemory) throws(DeviceError) {
        self.memory = memory
        try syncIOTLB()
    }

    public func startRing(_ c: VDPARingConfig) throws(DeviceError) {
        guard c.index < Int(queueCount) else {
            throw DeviceError("\(path): ring \(c.index) does not exist (the device has \(queueCount))")
        }
        guard c.size > 0, c.size <= maxQueueSize else {
            throw DeviceError("\(path): ring \(c.index): size \(c.size) is above the device's maximum \(maxQueueSize)")
        }
        guard c.kick != nil else {
            throw DeviceError("\(path): ring \(c.index) has no kick eventfd: a kernel vDPA device cannot poll")
        }
        guard let negotiated else { throw DeviceError("\(path): ring \(c.index) started before the features were set") }
        _ = negotiated
        let ring = Ring(size: c.size, desc: c.descGPA, avail: c.availGPA, guestUsed: c.usedGPA, used: c.usedGPA, base: c.base,
                        kick: c.kick, call: c.call, enabled: c.enabled)
        if live || suspended || needsProgram {
            try reconfigure { $0.rings[c.index] = ring }
        } else {
            rings[c.index] = ring
            try syncIOTLB()
            try program(c.index)
            if c.enabled { try goLive() }
        }
        publish()
    }

    public func setRingEnabled(_ index: Int, _ enabled: Bool) throws(DeviceError) {
        guard let r = rings[index], r.enabled != enabled else { return }
        if needsProgram {
            // Reset and waiting to be programmed again: taken then.
            rings[index]?.enabled = enabled
        } else if !live && !suspended {
            try k("enable ring \(index)") { () throws(SystemError) in try kernel.setRingEnabled(index, enabled) }
            rings[index]?.enabled = enabled
            if enabled { try goLive() }
        } else {
            // On a running device by reset: a disable must stop the ring for sure with its
            // position kept, and devices ignore it after DRIVER_OK (VDUSE) or undo it at the next
            // RESUME (mlx5 resumes every queue); an enable after DRIVER_OK needs
            // ENABLE_AFTER_DRIVER_OK, which the driver does not take.
            _ = r
            try reconfigure { $0.rings[index]?.enabled = enabled }
        }
        publish()
    }

    public func setRingCall(_ index: Int, _ call: SharedFD?) throws(DeviceError) {
        guard rings[index] != nil else { return }
        rings[index]?.call = call
        if !needsProgram {
            try k("set ring \(index)'s call") { () throws(SystemError) in try kernel.setRingCall(index, fd: call?.raw ?? -1) }
        }
    }

    public func stopRing(_ index: Int) throws(DeviceError) -> UInt16 {
        guard let r = rings[index] else { throw DeviceError("\(path): ring \(index) is not running") }
        let othersRun = rings.contains { $0.key != index && $0.value.enabled }
        var base = r.base
        if (live || suspended) && r.enabled && !needsProgram {
            if switchover == .suspend && !othersRun {
                // Nothing else must keep running: SUSPEND, and the device's own answer (or the
                // reset path's base, when quiesce had to reset: see there).
                try quiesce()
                base = suspended ? try k("GET_VRING_BASE(\(index))") { () throws(SystemError) in try kernel.ringBase(index) }
                                 : rings[index]?.base ?? base
            } else {
                // Others run on and this one must not (a disable is not to be trusted, see
                // setRingEnabled): the reset path, which also gives this ring's base.
                try resetAndRecordBases()
                base = rings[index]?.base ?? base
            }
        } else {
            base = rings[index]?.base ?? base
        }
        rings.removeValue(forKey: index)
        if othersRun {
            if !needsProgram { try resetAndRecordBases() }
            try restart()
        } else {
            try park()
        }
        publish()
        return base
    }

    /// The last running ring stopped: the device is reset (once) and left with the features and
    /// the IOTLB in place and the rings still known programmed (disabled ones may be enabled
    /// later: they must not come back unprogrammed).
    private func park() throws(DeviceError) {
        if !needsProgram {
            try statusReset()
        }
        live = false
        suspended = false
        needsProgram = false
        guard let want = negotiated else { return }
        try negotiate(want)
        try syncIOTLB()
        for i in rings.keys.sorted() { try program(i) }
    }

    public func redirectUsedRing(_ index: Int, usedIOVA: UInt64?, mapping: IOVAMapping?, call: SharedFD?,
                                 interruptEveryBatch: Bool) throws(DeviceError) -> UInt16 {
        guard let r = rings[index] else { throw DeviceError("\(path): ring \(index) is not running") }
        if let mapping {
            // Mapped before the device stops: it does not use it until the ring is moved there.
            extra[mapping.iova] = mapping
            try syncIOTLB()
        }
        let target = usedIOVA ?? r.guestUsed
        let at = try suspendRing(index)
        if let p = daemonPointer(iova: target &+ 2, length: 2) {
            // The target is the daemon's (a mediated ring): its index starts at the device's, so
            // the relay, which may look before the device's first completion, sees no entry that
            // is not the device's. (The guest's own used ring is the relay's to write.)
            // Safety: 2 bytes at p lie in a live mapping of `extra`; the device is quiesced.
            p.storeBytes(of: at.littleEndian, as: UInt16.self)
        }
        rings[index]?.used = target
        rings[index]?.call = call
        try syncIOTLB()
        if suspended {
            try k("SET_VRING_ADDR(\(index))") { () throws(SystemError) in try kernel.setRingAddress(index, desc: r.desc, avail: r.avail, used: target) }
            try k("SET_VRING_CALL(\(index))") { () throws(SystemError) in try kernel.setRingCall(index, fd: call?.raw ?? -1) }
            try restart()
        } else if needsProgram {
            try restart()
        } else {
            // Not running yet: programmed as it is now, taken at DRIVER_OK.
            try program(index)
        }
        publish()
        return at
    }

    /// Quiesces the device (SUSPEND, or a reset with the bases recorded) and returns the used
    /// index of ring `index`: every completion up to it is published where its used ring is.
    public func suspendRing(_ index: Int) throws(DeviceError) -> UInt16 {
        guard let r = rings[index] else { throw DeviceError("\(path): ring \(index) is not running") }
        guard live || suspended || needsProgram else { return r.base }
        try quiesce()
        return suspended ? try usedIndex(index) : rings[index]?.base ?? r.base
    }

    public func unmapIOVA(_ iova: UInt64) throws(DeviceError) {
        guard extra.removeValue(forKey: iova) != nil else { return }
        try syncIOTLB()
    }

    public func migrationDone() {}

    /// A kernel vDPA device takes frames from the guest only: the daemon cannot inject one.
    public func sendRARP(mac: [UInt8]) -> Bool { false }

    /// The device's own per-queue counters where it has them (`VhostVDPAKernel.vendorCounters`);
    /// none are invented: without them the stats say the queues are not counted.
    public func counters() -> [QueueCounters] { kernel.vendorCounters() ?? [] }

    public func reset() {
        do throws(DeviceError) { try resetDevice() } catch { logger.error("\(error)") }
        // The frontend's eventfds are not held by the kernel after it went away (rings stopped
        // earlier included).
        for i in 0..<Int(queueCount) {
            _ = try? kernel.setRingKick(i, fd: -1)
            _ = try? kernel.setRingCall(i, fd: -1)
        }
        rings = [:]
        negotiated = nil
        memory = .empty
        extra = [:]
        // Whatever the device holds goes, including what a failed batch left.
        do throws(DeviceError) { try remapAll() } catch { logger.error("\(error)") }
        publish()
    }

    public func close() {
        reset()
        kernel.release()
    }

    // MARK: device state

    /// Programs ring `i` as recorded (the device must not be running it).
    private func program(_ i: Int) throws(DeviceError) {
        guard let r = rings[i] else { return }
        try k("ring \(i)") { () throws(SystemError) in
            try kernel.setRingSize(i, r.size)
            try kernel.setRingAddress(i, desc: r.desc, avail: r.avail, used: r.used)
            try kernel.setRingBase(i, r.base)
            try kernel.setRingKick(i, fd: r.kick?.raw ?? -1)
            try kernel.setRingCall(i, fd: r.call?.raw ?? -1)
            try kernel.setRingEnabled(i, r.enabled)
        }
    }

    /// Status 0. Without IOTLB_PERSIST the device drops its mappings: no longer trusted.
    private func statusReset() throws(DeviceError) {
        if backendFeatures & VhostBackendFeature.iotlbPersist == 0 { mapTrusted = false }
        try k("reset") { () throws(SystemError) in try kernel.setStatus(0) }
    }

    private func goLive() throws(DeviceError) {
        guard !live else { return }
        let s = VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK | VirtioStatus.driverOK
        try k("status DRIVER_OK") { () throws(SystemError) in try kernel.setStatus(s) }
        let now = try k("status") { () throws(SystemError) in try kernel.status() }
        guard now & VirtioStatus.driverOK != 0, now & (VirtioStatus.needsReset | VirtioStatus.failed) == 0 else {
            throw DeviceError("\(path): the device did not take DRIVER_OK (status 0x\(String(now, radix: 16)))")
        }
        live = true
        notifyRunningRings()
    }

    /// Stops the device from touching the rings with every completion published: SUSPEND, or a
    /// reset after which each ring's used index is read back as its base.
    private func quiesce() throws(DeviceError) {
        if suspended || needsProgram || !live { return }
        // RESUME may start every queue the device knows, the disabled ones too (mlx5 moves every
        // initialised queue to ready): with a disabled ring programmed, only a reset is safe.
        if switchover == .suspend && !rings.values.contains(where: { !$0.enabled }) {
            try k("SUSPEND") { () throws(SystemError) in try kernel.suspend() }
            suspended = true
        } else {
            try resetAndRecordBases()
        }
    }

    /// Resets the device and takes the used index of each ring that ran (every completion it
    /// made is published once the reset returns) as the avail index it restarts from.
    private func resetAndRecordBases() throws(DeviceError) {
        try statusReset()
        let ran = live || suspended
        live = false
        suspended = false
        needsProgram = true
        guard ran else { return }
        for i in rings.keys.sorted() where rings[i]?.enabled == true {
            let used = try usedIndex(i)
            rings[i]?.base = used
        }
    }

    /// Back to running after `quiesce` and the changes: RESUME, or features, IOTLB and every ring
    /// programmed again, then DRIVER_OK.
    private func restart() throws(DeviceError) {
        if suspended {
            try k("RESUME") { () throws(SystemError) in try kernel.resume() }
            suspended = false
            notifyRunningRings()
            return
        }
        guard needsProgram else { return }
        needsProgram = false
        guard let want = negotiated else { return }
        try negotiate(want)
        try syncIOTLB()
        for i in rings.keys.sorted() { try program(i) }
        if rings.values.contains(where: \.enabled) { try goLive() }
    }

    /// A kick the guest gave while the device was reset or suspended may be lost (VDUSE drops
    /// kicks to a queue that is not ready; vhost-vdpa forwards them whatever the device's
    /// state): the driver owes the device a notification of the buffers that may be waiting.
    /// A spurious kick costs the device one look at an avail index. (The SoftNIC scans its rings
    /// when they start, so no test here can see a lost kick; devices that wait for one need this.)
    private func notifyRunningRings() {
        for r in rings.values where r.enabled {
            if let k = r.kick { _ = EventFD.signal(k.raw) }
        }
    }

    /// Applies `change` (a ring added, enabled or disabled) to a live device: by the reset
    /// path, whatever the switchover kind (the kernel takes a new ring's addresses only while
    /// suspended, and its enable only with ENABLE_AFTER_DRIVER_OK, which is not taken).
    private func reconfigure(_ change: (VhostVDPADevice) -> Void) throws(DeviceError) {
        if !needsProgram { try resetAndRecordBases() }
        change(self)
        try restart()
    }

    /// A reset that forgets the features too (new features, or the frontend went away).
    private func resetDevice() throws(DeviceError) {
        try statusReset()
        live = false
        suspended = false
        needsProgram = false
        negotiated = nil
    }

    /// The used index of ring `i` as its current used ring holds it (the device is quiesced).
    private func usedIndex(_ i: Int) throws(DeviceError) -> UInt16 {
        guard let r = rings[i] else { throw DeviceError("\(path): ring \(i) is not running") }
        guard let p = hostPointer(iova: r.used &+ 2, length: 2) else {
            throw DeviceError("\(path): ring \(i)'s used ring at IOVA 0x\(String(r.used, radix: 16)) is not in the device's memory")
        }
        // Safety: 2 bytes at p lie inside a live mapping (guest memory or a mediated ring).
        return UInt16(littleEndian: p.loadUnaligned(as: UInt16.self))
    }

    private func daemonPointer(iova: UInt64, length: UInt64) -> UnsafeMutableRawPointer? {
        for m in extra.values where iova >= m.iova && iova - m.iova <= m.size && length <= m.size - (iova - m.iova) {
            return m.host + Int(iova - m.iova)
        }
        return nil
    }

    /// Guest memory (the data path's own lookup, GuestMemoryView), then the daemon's mappings.
    private func hostPointer(iova: UInt64, length: UInt64) -> UnsafeMutableRawPointer? {
        // Safety: the view lives only inside the closure, over `memory.regions`' buffer.
        let guest = memory.regions.withUnsafeBufferPointer { b in
            b.baseAddress.flatMap { GuestMemoryView(base: $0, count: b.count).hostPointer(gpa: iova, length: length) }
        }
        return guest ?? daemonPointer(iova: iova, length: length)
    }

    /// What the IOTLB must hold: the guest's regions at their guest-physical addresses and the
    /// daemon's mappings (mediated rings) at theirs.
    private var wantedMappings: [UInt64: (size: UInt64, uaddr: UInt64)] {
        var want: [UInt64: (size: UInt64, uaddr: UInt64)] = [:]
        for r in memory.regions where r.size > 0 { want[r.gpa] = (r.size, UInt64(r.host)) }
        for m in extra.values { want[m.iova] = (m.size, UInt64(UInt(bitPattern: m.host))) }
        return want
    }

    /// Brings the IOTLB in step with `wantedMappings`: ranges gone or changed are invalidated,
    /// new ones mapped, in one batch when the device takes batches. A batch that fails part-way
    /// fails the frontend's message, and the reset that follows invalidates the whole IOVA space
    /// (`reset`), so nothing the failed batch mapped outlives the session.
    private func syncIOTLB() throws(DeviceError) {
        if !mapTrusted { return try remapAll() }
        let want = wantedMappings
        var messages: [IOTLBMessage] = []
        for (iova, m) in mapped.sorted(by: { $0.key < $1.key }) where want[iova].map({ $0 != m }) ?? true {
            messages.append(.invalidate(iova: iova, size: m.size))
        }
        for (iova, m) in want.sorted(by: { $0.key < $1.key }) where mapped[iova].map({ $0 != m }) ?? true {
            messages.append(.update(iova: iova, size: m.size, uaddr: m.uaddr, writable: true))
        }
        try sendBatch(messages)
        mapped = want
    }

    /// Everything again: one invalidate of the whole IOVA space, then every wanted range (after
    /// a reset that may have dropped the device's mappings, or a failed batch).
    private func remapAll() throws(DeviceError) {
        let want = wantedMappings
        var messages: [IOTLBMessage] = [.invalidate(iova: 0, size: .max)]
        messages += want.sorted(by: { $0.key < $1.key }).map { .update(iova: $0.key, size: $0.value.size, uaddr: $0.value.uaddr, writable: true) }
        mapped = [:]
        try sendBatch(messages)
        mapped = want
        mapTrusted = true
    }

    private func sendBatch(_ messages: [IOTLBMessage]) throws(DeviceError) {
        guard !messages.isEmpty else { return }
        let batched = backendFeatures & VhostBackendFeature.iotlbBatch != 0
        do {
            try kernel.send(batched ? [.batchBegin] + messages : messages)
        } catch {
            // Close the batch whatever happened (the device takes what was applied); the
            // frontend's reset that follows the failed message invalidates everything.
            if batched { try? kernel.send([.batchEnd]) }
            mapTrusted = false
            throw DeviceError("\(path): IOTLB update: \(error)")
        }
        if batched { try k("IOTLB update (batch end)") { () throws(SystemError) in try kernel.send([.batchEnd]) } }
    }

    private func publish() {
        let status = Int((try? kernel.status()) ?? 0)
        let list = rings.keys.sorted().compactMap { i in
            rings[i].map { DeviceDetails.Ring(index: i, size: Int($0.size), base: Int($0.base), enabled: $0.enabled,
                                              usedIOVA: "0x" + String($0.used, radix: 16)) }
        }
        let negotiated = self.negotiated.map { "0x" + String($0, radix: 16) }
        snapshot.withLock {
            $0.status = status
            $0.negotiatedFeatures = negotiated
            $0.rings = list
        }
    }
}
