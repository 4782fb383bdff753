import Platform
import Virtio

/// Where one ring lives and how it signals: what the framework hands a vDPA device when the
/// frontend has configured the ring (after DPDK's rte_vdpa_dev_ops, in this project's terms).
public struct VDPARingConfig: Sendable {
    public var index: Int
    public var size: UInt16
    public var descGPA: UInt64
    public var availGPA: UInt64
    public var usedGPA: UInt64
    /// Next avail index the device reads; the used index starts equal to it.
    public var base: UInt16
    /// The guest's kick eventfd: the device's doorbell. nil = the frontend asked the device to poll.
    public var kick: SharedFD?
    /// The guest's call eventfd: the device's interrupt. nil = no interrupts.
    public var call: SharedFD?
    public var enabled: Bool

    public init(index: Int, size: UInt16, descGPA: UInt64, availGPA: UInt64, usedGPA: UInt64, base: UInt16,
                kick: SharedFD?, call: SharedFD?, enabled: Bool) {
        self.index = index; self.size = size; self.descGPA = descGPA; self.availGPA = availGPA
        self.usedGPA = usedGPA; self.base = base; self.kick = kick; self.call = call; self.enabled = enabled
    }
}

/// A range of daemon memory mapped into a device's IOMMU (the relay's mediated rings).
public struct IOVAMapping: @unchecked Sendable {
    // @unchecked Sendable: `host` stays valid while `owner` is alive; the mapping holds `owner`.
    public var iova: UInt64
    public var size: UInt64
    public var host: UnsafeMutableRawPointer
    public var owner: AnyObject
    public init(iova: UInt64, size: UInt64, host: UnsafeMutableRawPointer, owner: AnyObject) {
        self.iova = iova; self.size = size; self.host = host; self.owner = owner
    }
}

/// Where `redirectRing` points a ring's avail side (`relay=avail+used`): the avail ring the
/// device reads, its doorbell, and where it continues from.
public struct AvailRedirect: Sendable {
    /// The avail ring the device reads from now on: an IOVA of the daemon's (a mediated avail
    /// ring, mapped by the same call), or nil for the ring's own avail ring in guest memory.
    public var availIOVA: UInt64?
    /// The device's doorbell from now on (the relay's eventfd, or the guest's kick going back).
    public var kick: SharedFD?
    /// Where the device continues: its next avail index and its used index. nil = both stay
    /// where they are; then, when `availIOVA` is the daemon's, the device writes its next avail
    /// index into that ring's idx before it runs again (as `redirectUsedRing` seeds a mediated
    /// used ring's idx), so the ring it reads starts exactly where it was.
    public var position: RingPosition?
    public init(availIOVA: UInt64?, kick: SharedFD?, position: RingPosition? = nil) {
        self.availIOVA = availIOVA; self.kick = kick; self.position = position
    }
}

/// A ring's position: the next avail index the device reads, and its used index.
public struct RingPosition: Sendable, Equatable {
    public var nextAvail: UInt16
    public var usedIndex: UInt16
    public init(nextAvail: UInt16, usedIndex: UInt16) { self.nextAvail = nextAvail; self.usedIndex = usedIndex }
}

/// Everything `redirectRing` moves: the used ring, optionally the avail ring and doorbell, the
/// interrupt, and the daemon memory the device must reach for them.
public struct RingRedirect: Sendable {
    /// The used ring (an IOVA of the daemon's), or nil for the ring's own in guest memory.
    public var usedIOVA: UInt64?
    /// nil: the avail ring and the doorbell stay as they are (the used relay).
    public var avail: AvailRedirect?
    public var call: SharedFD?
    /// Daemon memory mapped in the device's IOMMU before the ring moves (the mediated rings).
    public var mappings: [IOVAMapping]
    /// Raise the interrupt for every completed batch (a relay consumes it).
    public var interruptEveryBatch: Bool
    /// IOVAs of daemon mappings to remove once the ring has moved (the mediated rings it leaves):
    /// in the same operation, so that a switch-back waits for the device once, not once per ring.
    public var unmaps: [UInt64]
    public init(usedIOVA: UInt64?, avail: AvailRedirect? = nil, call: SharedFD?, mappings: [IOVAMapping] = [], interruptEveryBatch: Bool,
                unmaps: [UInt64] = []) {
        self.usedIOVA = usedIOVA; self.avail = avail; self.call = call; self.mappings = mappings
        self.interruptEveryBatch = interruptEveryBatch
        self.unmaps = unmaps
    }
}

/// Per-queue counters a device reports (the stats JSON's per-queue fields come from these).
public struct QueueCounters: Codable, Sendable, Equatable {
    public var index: Int
    public var packets: UInt64
    public var bytes: UInt64
    public var drops: [String: UInt64]
    public var faults: UInt64
    public var error: String?
    public var interrupts: UInt64
    public var doorbells: UInt64

    public init(index: Int, packets: UInt64 = 0, bytes: UInt64 = 0, drops: [String: UInt64] = [:], faults: UInt64 = 0,
                error: String? = nil, interrupts: UInt64 = 0, doorbells: UInt64 = 0) {
        self.index = index; self.packets = packets; self.bytes = bytes; self.drops = drops
        self.faults = faults; self.error = error; self.interrupts = interrupts; self.doorbells = doorbells
    }
}

/// What status output shows of a device beyond its one-line summary (a kernel device's path,
/// features, backend features, switchover kind, status byte and rings). Keys are added, never
/// renamed (docs/CONTROL.md).
public struct DeviceDetails: Codable, Sendable, Equatable {
    public struct Ring: Codable, Sendable, Equatable {
        public var index: Int
        public var size: Int
        /// The avail index the device (re)starts the ring from.
        public var base: Int
        public var enabled: Bool
        /// Where the device writes completions (hex IOVA): the guest's used ring or a mediated one.
        public var usedIOVA: String
        public init(index: Int, size: Int, base: Int, enabled: Bool, usedIOVA: String) {
            self.index = index; self.size = size; self.base = base; self.enabled = enabled; self.usedIOVA = usedIOVA
        }
    }
    public var driver: String
    public var path: String?
    public var deviceFeatures: String?
    public var negotiatedFeatures: String?
    public var backendFeatures: [String]?
    public var switchover: String?
    public var status: Int?
    public var mac: String?
    public var mtu: Int?
    public var maxQueuePairs: Int?
    public var rings: [Ring]?
    public init(driver: String) { self.driver = driver }
}

/// A device operation that was not applied (the device stopped, or does not answer).
public struct DeviceError: Error, CustomStringConvertible, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// The vDPA device operations the framework drives. Every call comes from the port's thread and
/// returns once the device has applied it (the device's DMA engine runs on its own threads), or
/// throws when it could not be applied: the port then fails the frontend's message.
public protocol VDPADevice: AnyObject, Sendable {
    /// A one-line description for status output, e.g. "softnic link=loopback".
    var summary: String { get }
    var queuePairs: Int { get }
    /// Virtio features the device offers (the port offers those the relay can migrate, see
    /// `VirtioNetFeatureSet.migratable`, plus vhost-user's own bits).
    var virtioFeatures: UInt64 { get }
    /// Negotiated virtio features.
    func setFeatures(_ features: UInt64) throws(DeviceError)
    /// Programs the device's IOMMU from the guest's memory (IOVA = guest-physical).
    func setMemory(_ memory: DeviceMemory) throws(DeviceError)
    /// The ring is configured and its doorbell is set: the device may serve it while enabled.
    func startRing(_ config: VDPARingConfig) throws(DeviceError)
    /// Enables or disables a started ring (SET_VRING_ENABLE); a disabled ring keeps its position.
    func setRingEnabled(_ index: Int, _ enabled: Bool) throws(DeviceError)
    /// Replaces a ring's interrupt eventfd while it runs.
    func setRingCall(_ index: Int, _ call: SharedFD?) throws(DeviceError)
    /// Stops a ring: the device completes what it took, touches the ring no more, and returns
    /// the next avail index (GET_VRING_BASE's answer).
    func stopRing(_ index: Int) throws(DeviceError) -> UInt16
    // MARK: what the relay needs (suspend, move the used ring, resume; or the device's own way)

    /// Suspends ring `index` between batches (what it completed is published where its used ring
    /// currently is), maps `mapping` in the IOMMU, points the ring's used ring at `usedIOVA` and
    /// its interrupts at `call` (raised for every completed batch when `interruptEveryBatch`),
    /// and resumes it. Returns the used index at the switch; when `usedIOVA` is the daemon's (a
    /// mediated ring), its index is set to that value before the ring runs again. `usedIOVA`
    /// nil = back to the ring's own used ring in guest memory. The SoftNIC does this per ring
    /// without a reset; a kernel device without SUSPEND does it by resetting the device and
    /// programming every ring again from its used index (VhostVDPASwitchover.reset).
    func redirectUsedRing(_ index: Int, usedIOVA: UInt64?, mapping: IOVAMapping?, call: SharedFD?, interruptEveryBatch: Bool) throws(DeviceError) -> UInt16
    /// As `redirectUsedRing`, and, when `redirect.avail` is given, the avail ring and the doorbell
    /// too (the avail relay, `relay=avail+used`), between two batches, without a reset. Returns
    /// the position at the switch (before any `redirect.avail.position` takes effect); its
    /// `nextAvail` is the used index when the device cannot tell (the default below). Implement
    /// this or `redirectUsedRing` (each defaults to the other); a device that cannot move its
    /// avail ring keeps the default, which refuses `avail` with an error saying so.
    func redirectRing(_ index: Int, _ redirect: RingRedirect) throws(DeviceError) -> RingPosition
    /// Suspends ring `index` (completed work published) and returns its used index.
    func suspendRing(_ index: Int) throws(DeviceError) -> UInt16
    /// Removes an IOMMU mapping made by `redirectUsedRing`.
    func unmapIOVA(_ iova: UInt64) throws(DeviceError)

    /// The migration has completed on this side (the destination; DPDK calls this on SEND_RARP).
    func migrationDone()
    /// SEND_RARP: announce `mac` on the device's link. False if it cannot.
    func sendRARP(mac: [UInt8]) -> Bool
    /// Per-queue counters.
    func counters() -> [QueueCounters]
    /// The frontend went away or reset the device: stop every ring, forget the memory table and
    /// every IOVA mapping. Best effort: a device that does not answer is reported in its log.
    func reset()
    /// The port is closing for good: stop the device's threads.
    func close()
    /// Details for status output (any thread); nil when the summary says it all.
    var details: DeviceDetails? { get }
    /// Whether `redirectUsedRing(interruptEveryBatch: true)` is honoured. A kernel vDPA device
    /// follows the guest's interrupt suppression whatever it is told, so the relay cannot count
    /// on an interrupt for every completion and wakes on its own as well.
    var interruptsEveryBatch: Bool { get }
    /// Whether `redirectRing` can move the avail ring and the doorbell (`relay=avail+used`).
    var canRedirectAvailRing: Bool { get }
}

extension VDPADevice {
    public var details: DeviceDetails? { nil }
    /// Whether `redirectRing` can move the avail ring and the doorbell (`relay=avail+used`); a
    /// port asking for it on a device that cannot is refused when it is made.
    public var canRedirectAvailRing: Bool { false }

    public func redirectRing(_ index: Int, _ redirect: RingRedirect) throws(DeviceError) -> RingPosition {
        if redirect.avail != nil {
            throw DeviceError("\(summary): this device cannot move ring \(index)'s avail ring or doorbell while it runs, which relay=avail+used needs; use relay=used")
        }
        guard redirect.mappings.count <= 1 else {
            throw DeviceError("\(summary): this device maps one IOVA range per ring redirect, not \(redirect.mappings.count)")
        }
        let at = try redirectUsedRing(index, usedIOVA: redirect.usedIOVA, mapping: redirect.mappings.first, call: redirect.call,
                                      interruptEveryBatch: redirect.interruptEveryBatch)
        for iova in redirect.unmaps { try unmapIOVA(iova) }
        return RingPosition(nextAvail: at, usedIndex: at)
    }

    public func redirectUsedRing(_ index: Int, usedIOVA: UInt64?, mapping: IOVAMapping?, call: SharedFD?,
                                 interruptEveryBatch: Bool) throws(DeviceError) -> UInt16 {
        // A device that implements only redirectRing (which must then handle `unmaps` itself).
        try redirectRing(index, RingRedirect(usedIOVA: usedIOVA, call: call, mappings: mapping.map { [$0] } ?? [],
                                             interruptEveryBatch: interruptEveryBatch)).usedIndex
    }
    public var interruptsEveryBatch: Bool { true }
}
