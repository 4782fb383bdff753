import Platform
import Synchronization
import VhostUser
import Virtio

/// A relayed ring: the ring as the frontend set it up (its areas, the log address of its used
/// ring, the guest's call, and the guest's kick, which is the device's doorbell the relay rings
/// when a notification-state change reaches the guest late, see `RelayEngine.step`), and how the
/// relay treats it.
public struct RelayRingConfig: Sendable {
    public var ring: RingSetup
    /// Whether the device writes the chains' buffers (RX): their written bytes are marked.
    public var deviceWritesBuffers: Bool
    public var eventIdx: Bool
    /// The device may complete into the mediated ring without interrupting (it follows the
    /// guest's suppression: a kernel vDPA device); the relay then wakes every millisecond while
    /// it relays this ring, instead of every 100 ms.
    public var deviceMayNotInterrupt = false
    /// How much the relay marks for each completion (`log=`).
    public var log = LogGranularity.exact

    /// Indirect tables are followed whether or not INDIRECT_DESC was negotiated (the device
    /// decided when the ring started; marking a chain it completed is never wrong).
    public init(ring: RingSetup, deviceWritesBuffers: Bool, eventIdx: Bool) {
        self.ring = ring
        self.deviceWritesBuffers = deviceWritesBuffers
        self.eventIdx = eventIdx
    }
}

/// How much the relay marks for each completion (`--port ...,log=`). Every option covers at least
/// every byte the device wrote.
public enum LogGranularity: String, Sendable, CaseIterable {
    /// The first `used.len` bytes of the chain's writable buffers (the bytes the device wrote).
    case exact
    /// Each writable buffer of a completed chain whole, whatever `used.len` says.
    case buffer
    /// Whole runs of 64 pages (256 KiB, aligned: one 64-bit word of the log) around the written
    /// bytes: one word set whole per run, and a completion whose bytes fall in the run the step
    /// set last costs one comparison, no bit arithmetic and no atomic operation. QEMU sends the
    /// whole run again (more pages per migration iteration, for less relay work per packet).
    case pageRun = "page-run"
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
    /// The device index was more than a ring ahead (counted once per episode, see `step`).
    var insaneIndexSeen = false
    let counters: RelayCounters
    var guestCallFD: Int32

    init(config: RelayRingConfig, mediated: MediatedUsedRing, deviceCall: SharedFD, startIndex: UInt16, counters: RelayCounters) {
        self.config = config
        self.mediated = mediated
        reader = UsedRingReader(size: config.ring.size, used: mediated.base)
        self.deviceCall = deviceCall
        lastRelayed = startIndex
        lastFlags = 0xFFFF
        lastAvailEvent = 0
        self.counters = counters
        guestCallFD = config.ring.call?.raw ?? -1
    }
}
