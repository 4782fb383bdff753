#if canImport(Glibc)
import Glibc
#endif
import DeviceFramework
import Logging
import Platform
import SoftNIC
import VhostVDPA
import Virtio

/// A model of the kernel's vhost-vdpa character device over a SoftNIC, for the host (which has
/// no vDPA modules): it keeps the rules of drivers/vhost/vdpa.c in Linux 6.12 that the driver
/// depends on, and serves the rings the way a VDUSE device does (the device learns its rings at
/// DRIVER_OK, enable changes after DRIVER_OK are ignored, a reset stops everything with every
/// completion published). With `offersSuspend` it also offers SUSPEND and RESUME, which no
/// device here has (VDUSE in 6.12 has neither): that is how the suspend switchover is tested.
/// The real device is exercised in the TCG guest (tests/peers/vduse-*.sh).
final class VhostVDPAModel: VhostVDPAKernel, @unchecked Sendable {
    // @unchecked Sendable: the driver calls it from one thread at a time; `ops` is only read by
    // the test after the calls it checks.
    let nic: SoftNIC
    let offersSuspend: Bool
    let pairs: Int
    private(set) var acked: UInt64 = 0
    private(set) var statusByte: UInt8 = 0
    private(set) var features: UInt64 = 0
    private(set) var suspended = false
    /// Every operation, in order ("SUSPEND", "reset", "DRIVER_OK", "SET_VRING_ADDR 0", ...).
    private(set) var ops: [String] = []
    /// Fault injection: the next call of this operation fails with this errno (after
    /// `failAfter[op]` more calls succeed, if set).
    var failNext: [String: Int32] = [:]
    var failAfter: [String: Int] = [:]
    /// The device does not take DRIVER_OK (it keeps its status without the bit, as a device that
    /// failed to start does; VDUSE does when its daemon answers FAILED).
    var refuseDriverOK = false
    /// Runs once inside the next reset, after the device stopped (a test posts and kicks there:
    /// a kick in the reset window).
    var onReset: (() -> Void)?

    struct Queue {
        var num: UInt16 = 0
        var desc: UInt64 = 0, avail: UInt64 = 0, used: UInt64 = 0
        var base: UInt16 = 0
        var kick: SharedFD?
        var call: SharedFD?
        var ready = false
        var running = false
    }
    private(set) var queues: [Queue]
    private(set) var iotlb: [UInt64: (size: UInt64, uaddr: UInt64)] = [:]
    private var inBatch = false

    static let driverOK: UInt8 = 4

    /// Behave as a device with its own IOMMU (mlx5): on a reset the kernel asks it to drop its
    /// mappings unless IOTLB_PERSIST was acked (vhost's IOTLB keeps its entries); it can offer
    /// IOTLB_PERSIST. Without this, the device keeps its mappings across a reset, as VDUSE does.
    let dropsMapOnReset: Bool
    /// What the device itself maps (the last map the kernel handed it); the SoftNIC sees this.
    private var deviceMap: [UInt64: (size: UInt64, uaddr: UInt64)] = [:]

    /// With `dropsMapOnReset`: whether IOTLB_PERSIST is offered.
    let offersPersist: Bool
    /// RESUME starts every queue the device knows, the disabled ones too (mlx5 in 6.12 moves
    /// every initialised queue to ready in mlx5_vdpa_resume).
    var resumeStartsEveryQueue = false

    init(nic: SoftNIC, offersSuspend: Bool, dropsMapOnReset: Bool = false, offersPersist: Bool = true) {
        self.nic = nic
        self.offersSuspend = offersSuspend
        self.dropsMapOnReset = dropsMapOnReset
        self.offersPersist = offersPersist
        pairs = nic.queuePairs
        queues = Array(repeating: Queue(), count: nic.queuePairs * 2)
    }

    private func op(_ name: String) throws(SystemError) {
        ops.append(name)
        let key = String(name.split(separator: " ").first ?? "")
        if let n = failAfter[key], n > 0 { failAfter[key] = n - 1; return }
        if let e = failNext.removeValue(forKey: key) { throw SystemError(name, errno: e) }
    }
    private func dup(_ fd: Int32) -> SharedFD? { fd < 0 ? nil : SharedFD(FileDescriptor(owning: Glibc.dup(fd))) }
    private func device<R>(_ body: () throws(DeviceError) -> R) throws(SystemError) -> R {
        do { return try body() } catch { throw SystemError("device: \(error)", errno: EIO) }
    }

    func setOwner() throws(SystemError) { try op("SET_OWNER") }
    func deviceID() throws(SystemError) -> UInt32 { 1 }
    func deviceFeatures() throws(SystemError) -> UInt64 {
        nic.virtioFeatures | VirtioFeature.accessPlatform | VirtioNetFeature.mac | (pairs > 1 ? VirtioNetFeature.mq : 0)
    }
    func setFeatures(_ f: UInt64) throws(SystemError) {
        try op("SET_FEATURES")
        guard statusByte & 8 == 0 else { throw SystemError("VHOST_SET_FEATURES", errno: EBUSY) }
        features = f
    }
    func backendFeatures() throws(SystemError) -> UInt64 {
        VhostBackendFeature.iotlbMsgV2 | VhostBackendFeature.iotlbBatch
            | (offersSuspend ? VhostBackendFeature.suspend | VhostBackendFeature.resume : 0)
            | (dropsMapOnReset && offersPersist ? VhostBackendFeature.iotlbPersist : 0)
    }
    func setBackendFeatures(_ f: UInt64) throws(SystemError) {
        guard f & ~(try backendFeatures()) == 0 else { throw SystemError("VHOST_SET_BACKEND_FEATURES", errno: EOPNOTSUPP) }
        acked = f
    }
    func queueCount() throws(SystemError) -> UInt32 { UInt32(pairs * 2) }
    func maxQueueSize() throws(SystemError) -> UInt16 { 1024 }
    func configSize() throws(SystemError) -> UInt32 { 12 }
    func readConfig(offset: UInt32, length: UInt32) throws(SystemError) -> [UInt8] {
        let cfg: [UInt8] = [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, UInt8(pairs), 0, 0xdc, 0x05]
        return Array(cfg[Int(offset)..<min(cfg.count, Int(offset + length))])
    }
    func status() throws(SystemError) -> UInt8 { statusByte }

    func setStatus(_ s: UInt8) throws(SystemError) {
        if s == 0 {
            try op("reset")
            // The device stops every ring; what it completed is published (SoftNIC.reset).
            nic.reset()
            if dropsMapOnReset && acked & VhostBackendFeature.iotlbPersist == 0 { deviceMap = [:] }
            queues = Array(repeating: Queue(), count: pairs * 2)
            statusByte = 0
            suspended = false
            features = 0
            if let f = onReset { onReset = nil; f() }
            return
        }
        guard statusByte & ~s == 0 else { throw SystemError("VHOST_VDPA_SET_STATUS", errno: EINVAL) }
        let was = statusByte
        if refuseDriverOK && s & Self.driverOK != 0 { try op("DRIVER_OK refused"); return }
        statusByte = s
        if s & Self.driverOK != 0 && was & Self.driverOK == 0 {
            try op("DRIVER_OK")
            try device { () throws(DeviceError) in
                try nic.setFeatures(features)
                try nic.setMemory(memory())
            }
            for i in queues.indices where queues[i].ready {
                let q = queues[i]
                try device { () throws(DeviceError) in
                    try nic.startRing(VDPARingConfig(index: i, size: q.num, descGPA: q.desc, availGPA: q.avail, usedGPA: q.used,
                                                     base: q.base, kick: q.kick, call: q.call, enabled: true))
                }
                queues[i].running = true
            }
        }
    }

    /// The device's map as the SoftNIC's memory (VDUSE hands its daemon the same ranges).
    private func memory() -> DeviceMemory {
        DeviceMemory(regions: deviceMap.sorted { $0.key < $1.key }.map {
            GuestMemoryView.Region(gpa: $0.key, size: $0.value.size, host: UInt($0.value.uaddr))
        }, owner: nil)
    }

    func iovaRange() throws(SystemError) -> (first: UInt64, last: UInt64) { (0, .max) }

    func send(_ messages: [IOTLBMessage]) throws(SystemError) {
        for m in messages {
            switch m {
            case .batchBegin: inBatch = true
            case .batchEnd:
                inBatch = false
                deviceMap = iotlb
                try op("IOTLB")
                if statusByte & Self.driverOK != 0 { try device { () throws(DeviceError) in try nic.setMemory(memory()) } }
            case .update(let iova, let size, let uaddr, _):
                guard !iotlb.contains(where: { Self.overlap($0.key, $0.value.size, iova, size) }) else {
                    throw SystemError("IOTLB update 0x\(String(iova, radix: 16))", errno: EEXIST)
                }
                try op("IOTLB_UPDATE")
                iotlb[iova] = (size, uaddr)
            case .invalidate(let iova, let size):
                iotlb = iotlb.filter { !Self.overlap($0.key, $0.value.size, iova, size) }
            }
        }
        if !inBatch { deviceMap = iotlb }
        if !inBatch && statusByte & Self.driverOK != 0 { try device { () throws(DeviceError) in try nic.setMemory(memory()) } }
    }

    /// Whether [a, a+n) and [b, b+m) overlap (sizes up to the whole 64-bit space).
    static func overlap(_ a: UInt64, _ n: UInt64, _ b: UInt64, _ m: UInt64) -> Bool {
        guard n > 0, m > 0 else { return false }
        let lastA = a.addingReportingOverflow(n - 1).overflow ? UInt64.max : a + (n - 1)
        let lastB = b.addingReportingOverflow(m - 1).overflow ? UInt64.max : b + (m - 1)
        return a <= lastB && b <= lastA
    }

    private var changesRings: Bool { statusByte & Self.driverOK != 0 && !suspended }

    func setRingSize(_ i: Int, _ size: UInt16) throws(SystemError) { try op("SET_VRING_NUM \(i)"); queues[i].num = size }
    func setRingAddress(_ i: Int, desc: UInt64, avail: UInt64, used: UInt64) throws(SystemError) {
        try op("SET_VRING_ADDR \(i)")
        guard !changesRings else { throw SystemError("VHOST_SET_VRING_ADDR", errno: EINVAL) }
        queues[i].desc = desc; queues[i].avail = avail; queues[i].used = used
    }
    func setRingBase(_ i: Int, _ base: UInt16) throws(SystemError) {
        try op("SET_VRING_BASE \(i)")
        guard !changesRings else { throw SystemError("VHOST_SET_VRING_BASE", errno: EINVAL) }
        queues[i].base = base
    }
    func ringBase(_ i: Int) throws(SystemError) -> UInt16 {
        try op("GET_VRING_BASE \(i)")
        guard queues[i].running else { return queues[i].base }
        let b = try device { () throws(DeviceError) in try nic.stopRing(i) }
        queues[i].running = false
        queues[i].base = b
        return b
    }
    func setRingKick(_ i: Int, fd: Int32) throws(SystemError) { try op("SET_VRING_KICK \(i)"); queues[i].kick = dup(fd) }
    func setRingCall(_ i: Int, fd: Int32) throws(SystemError) {
        try op("SET_VRING_CALL \(i)")
        queues[i].call = dup(fd)
        if queues[i].running { let c = queues[i].call; try device { () throws(DeviceError) in try nic.setRingCall(i, c) } }
    }
    func setRingEnabled(_ i: Int, _ enabled: Bool) throws(SystemError) {
        try op("SET_VRING_ENABLE \(i) \(enabled ? 1 : 0)")
        // After DRIVER_OK a VDUSE device never hears of it (no ENABLE_AFTER_DRIVER_OK).
        // Kicks that came while the queue was not ready are gone: the kernel read them from the
        // eventfd and VDUSE dropped them (vduse_vq_kick).
        if enabled && !queues[i].ready, let k = queues[i].kick { _ = EventFD.drain(k.raw) }
        queues[i].ready = enabled
    }
    func suspend() throws(SystemError) {
        try op("SUSPEND")
        guard offersSuspend else { throw SystemError("VHOST_VDPA_SUSPEND", errno: EOPNOTSUPP) }
        guard statusByte & Self.driverOK != 0 else { return }
        for i in queues.indices where queues[i].running {
            _ = try device { () throws(DeviceError) in try nic.suspendRing(i) }
        }
        suspended = true
    }
    func resume() throws(SystemError) {
        try op("RESUME")
        guard offersSuspend else { throw SystemError("VHOST_VDPA_RESUME", errno: EOPNOTSUPP) }
        guard statusByte & Self.driverOK != 0 else { return }
        // Resumes each ring where its used ring now is (the SoftNIC's redirect is suspend, move,
        // resume); interrupts follow the guest's suppression, as a real device's do.
        if resumeStartsEveryQueue {
            for i in queues.indices where !queues[i].running && queues[i].num > 0 {
                let q = queues[i]
                try device { () throws(DeviceError) in
                    try nic.startRing(VDPARingConfig(index: i, size: q.num, descGPA: q.desc, availGPA: q.avail, usedGPA: q.used,
                                                     base: q.base, kick: q.kick, call: q.call, enabled: true))
                }
                queues[i].running = true
            }
        }
        for i in queues.indices where queues[i].running {
            let q = queues[i]
            _ = try device { () throws(DeviceError) in
                try nic.redirectUsedRing(i, usedIOVA: q.used, mapping: nil, call: q.call, interruptEveryBatch: false)
            }
        }
        suspended = false
    }
    func vendorCounters() -> [QueueCounters]? { nic.counters() }
    func release() { nic.close() }
}
