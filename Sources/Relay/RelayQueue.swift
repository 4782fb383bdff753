import Platform
import Synchronization
import VhostUser
import Virtio

/// Where a relayed ring lives on both sides.
public struct RelayRingConfig: Sendable {
    public var index: Int
    public var size: UInt16
    public var descGPA: UInt64
    public var availGPA: UInt64
    public var usedGPA: UInt64
    /// Where the guest's used ring is logged (SET_VRING_ADDR's log_guest_addr, or usedGPA).
    public var usedLogGPA: UInt64
    /// Whether the device writes the chains' buffers (RX): their written bytes are marked.
    public var deviceWritesBuffers: Bool
    public var eventIdx: Bool
    public var indirect: Bool
    public var guestCall: SharedFD?
    /// The device's doorbell (the guest's kick eventfd), rung when a notification-state change
    /// reaches the guest late (see `RelayEngine.step`).
    public var deviceKick: SharedFD?

    public init(index: Int, size: UInt16, descGPA: UInt64, availGPA: UInt64, usedGPA: UInt64, usedLogGPA: UInt64,
                deviceWritesBuffers: Bool, eventIdx: Bool, indirect: Bool, guestCall: SharedFD?, deviceKick: SharedFD?) {
        self.deviceKick = deviceKick
        self.index = index; self.size = size; self.descGPA = descGPA; self.availGPA = availGPA; self.usedGPA = usedGPA
        self.usedLogGPA = usedLogGPA; self.deviceWritesBuffers = deviceWritesBuffers; self.eventIdx = eventIdx
        self.indirect = indirect; self.guestCall = guestCall
    }
}

/// Per relayed ring counters, read by the control thread.
public final class RelayCounters: Sendable {
    public let relayed = Atomic<UInt64>(0)
    public let pagesMarked = Atomic<UInt64>(0)
    public let interrupts = Atomic<UInt64>(0)
    public let errors = Atomic<UInt64>(0)
    public init() {}
}

/// One relayed ring. Confined to the relay thread.
final class RelayQueue {
    var config: RelayRingConfig
    let mediated: MediatedUsedRing
    let reader: UsedRingReader
    /// The device signals this eventfd when it completes into the mediated ring.
    let deviceCall: SharedFD
    var guest: SplitQueue?
    var lastRelayed: UInt16
    var lastFlags: UInt16
    var lastAvailEvent: UInt16
    let counters: RelayCounters
    var guestCallFD: Int32

    init(config: RelayRingConfig, mediated: MediatedUsedRing, deviceCall: SharedFD, startIndex: UInt16, counters: RelayCounters) {
        self.config = config
        self.mediated = mediated
        reader = UsedRingReader(size: config.size, used: mediated.base)
        self.deviceCall = deviceCall
        lastRelayed = startIndex
        lastFlags = 0xFFFF
        lastAvailEvent = 0
        self.counters = counters
        guestCallFD = config.guestCall?.raw ?? -1
    }
}
