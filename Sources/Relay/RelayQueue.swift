import DeviceFramework
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
    /// The avail relay checks indirect tables only where INDIRECT_DESC was negotiated (as the
    /// device's walker does); any INDIRECT descriptor is a rejected chain otherwise.
    public var indirect = false

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
    /// Each writable buffer that holds written bytes whole (up to 68 KiB past those bytes).
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
    /// Chains the avail relay refused (they broke a walker rule): completed to the guest with
    /// length 0, never shown to the device.
    public let rejectedChains = Atomic<UInt64>(0)
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
    /// The avail relay's side of the ring (`relay=avail+used`); nil for the used relay.
    var avail: AvailRelayState?

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

/// What the avail relay keeps for one ring (`relay=avail+used`). Confined to the relay thread.
///
/// Three index spaces: the guest's avail positions (`guestAvail`, the next one to check), the
/// mediated ring's slots (`mediatedAvail`, the next one to fill; the device's used index counts
/// the slots it completed, `RelayQueue.lastRelayed`), and the guest's used index (`guestUsed`,
/// the relay's own: device completions and rejected chains both land there).
///
/// The rule that keeps GET_VRING_BASE exact: a rejected chain is completed only once the device
/// has completed at least as many chains as were accepted before it (`rejectedAfter`). When
/// the device is stopped it has completed every slot it took (M = its used index), so the
/// guest-side base is the guest position of the first accepted slot >= M (`slotGuestPos`), or
/// `guestAvail` when every accepted slot was taken: every chain before the base has been
/// completed (accepted ones by the device, rejected ones by the rule), none after it has, and
/// the guest's used index equals the base. Rejected chains after the base are left to whoever
/// reads the ring next (the destination, or the device on the direct path), which checks them again.
final class AvailRelayState {
    let ring: MediatedAvailRing
    let writer: AvailRingWriter
    /// The device's walker (same bounds, buffers translated through guest memory), one per ring,
    /// allocated once: a check allocates nothing.
    var walker: DescriptorChainWalker
    /// The guest's kick, which the relay sleeps on; nil once quarantined (the relay then polls).
    var guestKick: SharedFD?
    let deviceKick: SharedFD
    var guestAvail: UInt16
    var mediatedAvail: UInt16
    var guestUsed: UInt16
    /// Guest avail position of each mediated slot in [device used index, mediatedAvail).
    let slotGuestPos: UnsafeMutablePointer<UInt16>
    /// Rejected chains not yet completed, in guest order: head, and how many slots had been
    /// accepted before it (free-running mediated index). FIFO over [rejectedFirst, rejectedEnd).
    let rejectedHead: UnsafeMutablePointer<UInt16>
    let rejectedAfter: UnsafeMutablePointer<UInt16>
    var rejectedFirst: UInt16 = 0
    var rejectedEnd: UInt16 = 0
    /// The guest's used-ring notification words as the relay last wrote them (nil: not yet).
    var availEventWritten: UInt16?
    /// The guest's avail index was more than a ring ahead (counted once per episode).
    var insaneAvailSeen = false
    let mask: UInt16

    /// The device was at `position` when it moved to `ring`: slots [usedIndex, nextAvail) are
    /// chains it took from the guest's ring directly, at the same guest positions.
    init(ring: MediatedAvailRing, guestKick: SharedFD?, deviceKick: SharedFD, position: RingPosition, indirect: Bool) {
        self.ring = ring
        writer = AvailRingWriter(size: ring.size, avail: ring.base)
        walker = DescriptorChainWalker(capacity: ring.size, indirectAllowed: indirect)
        self.guestKick = guestKick
        self.deviceKick = deviceKick
        guestAvail = position.nextAvail
        mediatedAvail = position.nextAvail
        guestUsed = position.usedIndex
        mask = ring.size &- 1
        // Safety: each buffer holds one entry per ring slot, is indexed modulo the ring size only,
        // and is freed once in deinit.
        slotGuestPos = .allocate(capacity: Int(ring.size))
        rejectedHead = .allocate(capacity: Int(ring.size))
        rejectedAfter = .allocate(capacity: Int(ring.size))
        var s = position.usedIndex
        while s != position.nextAvail { slotGuestPos[Int(s & mask)] = s; s &+= 1 }
    }

    deinit {
        slotGuestPos.deallocate()
        rejectedHead.deallocate()
        rejectedAfter.deallocate()
    }

    var rejectedPending: UInt16 { rejectedEnd &- rejectedFirst }
}
