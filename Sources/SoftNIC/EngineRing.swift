import Platform
import DeviceFramework
import Virtio

/// One ring as the DMA engine sees it. Confined to the engine's thread.
final class EngineRing {
    let index: Int
    let isRX: Bool
    let stats: QueueCounterSet
    var config: VDPARingConfig?
    /// The ring's used ring in guest memory (where `redirect` returns it).
    var guestUsedGPA: UInt64 = 0
    /// The ring's avail ring in guest memory (where `redirect` returns it after the avail relay).
    var guestAvailGPA: UInt64 = 0
    var enabled = false
    /// Suspended by the framework (for a used-ring switch): not served, position kept.
    var suspended = false
    /// Raise the interrupt on every published batch (set while a relay consumes the interrupts).
    var interruptEveryBatch = false
    var failure: String?
    /// Where the ring stopped last (its descriptor and avail areas, next avail index): a start
    /// at exactly that point continues the ring (a device reset and reprogram, as a kernel vDPA
    /// switchover does), any other start is a new run.
    var stoppedAt: (desc: UInt64, avail: UInt64, next: UInt16)?
    var queue: SplitQueue?
    var walker: DescriptorChainWalker
    var lastAvail: UInt16 = 0
    /// Used index written so far (entries may be unpublished).
    var usedIdx: UInt16 = 0
    /// Used index last published to the guest.
    var publishedUsed: UInt16 = 0
    /// avail.idx as last loaded (RX fills several frames per load).
    var availCache: UInt16 = 0
    var kick: SharedFD?
    var call: SharedFD?
    var callFD: Int32 = -1
    /// The ring has no call eventfd and the device has an `InterruptRaiser`: interrupts go there.
    var raises = false
    var notificationsEnabled = true
    /// RX counts not yet added to `stats` (added once per batch, in flush).
    var pendingPackets: UInt64 = 0
    var pendingBytes: UInt64 = 0
    /// A tap link's RX ring: its chains walked ahead, as one iovec list that tap frames are read
    /// straight into (see DMAEngine+TapRX); made at the ring's first tap frame.
    var rxWindow: RXWindow?

    init(index: Int, stats: QueueCounterSet) {
        self.index = index
        isRX = index % 2 == 0
        self.stats = stats
        walker = DescriptorChainWalker(capacity: 1, indirectAllowed: false)
    }

    var running: Bool { queue != nil && enabled && !suspended && failure == nil }

    func errorReset() { stats.errorText.withLock { $0 = nil } }
}
