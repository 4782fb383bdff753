/// Which virtqueue format the driver negotiated.
///
/// The seam for packed rings: only `.split` is implemented (`SplitQueue`, `DescriptorChainWalker`,
/// `DriverSplitRing`). A packed implementation adds its own queue and walker that fill the same
/// `DescriptorChain` / `ChainSegment` view, so consumers of chains need not know the format.
public enum RingFormat: Sendable, Equatable {
    case split
    case packed

    public init(negotiatedFeatures: UInt64) {
        self = negotiatedFeatures & VirtioFeature.ringPacked != 0 ? .packed : .split
    }
}

/// Sizes, alignments and field offsets of a split virtqueue (virtio 1.2, 2.7).
///
/// Descriptor table: `n` descriptors of 16 bytes. Available ring: flags, idx, ring[n] of u16,
/// used_event. Used ring: flags, idx, ring[n] of (id u32, len u32), avail_event.
public struct SplitRingLayout: Equatable, Sendable {
    /// The largest queue size a split ring may have.
    public static let maxQueueSize: UInt16 = 32768
    public static let descriptorTableAlignment = 16
    public static let availAlignment = 2
    public static let usedAlignment = 4

    public static let descriptorSize = 16
    public static let usedElementSize = 8

    public static let availFlagsOffset = 0
    public static let availIndexOffset = 2
    public static let availRingOffset = 4
    public static let usedFlagsOffset = 0
    public static let usedIndexOffset = 2
    public static let usedRingOffset = 4

    /// VRING_USED_F_NO_NOTIFY: the device does not need kicks.
    public static let usedFlagNoNotify: UInt16 = 1
    /// VRING_AVAIL_F_NO_INTERRUPT: the driver does not need interrupts.
    public static let availFlagNoInterrupt: UInt16 = 1

    public let queueSize: UInt16

    /// Nil unless `queueSize` is a power of two in 1...32768.
    public init?(queueSize: UInt16) {
        guard Self.isValidQueueSize(queueSize) else { return nil }
        self.queueSize = queueSize
    }

    public static func isPowerOfTwo(_ n: UInt32) -> Bool {
        n != 0 && n & (n - 1) == 0
    }

    /// A split queue size is a power of two, at least 1, at most `maxQueueSize`.
    public static func isValidQueueSize(_ n: UInt16) -> Bool {
        n <= maxQueueSize && isPowerOfTwo(UInt32(n))
    }

    /// 16 * n.
    public var descriptorTableBytes: Int { Self.descriptorSize * Int(queueSize) }
    /// 6 + 2n: flags, idx, ring[n], used_event.
    public var availRingBytes: Int { 6 + 2 * Int(queueSize) }
    /// 6 + 8n: flags, idx, ring[n], avail_event.
    public var usedRingBytes: Int { Self.usedRingBytes(queueSize: queueSize) }
    /// Bytes of a used ring of `queueSize` entries: flags, idx, the entries, avail_event.
    public static func usedRingBytes(queueSize: UInt16) -> Int { 6 + usedElementSize * Int(queueSize) }

    /// Offset of used_event (the avail ring's tail word).
    public var usedEventOffset: Int { Self.availRingOffset + 2 * Int(queueSize) }
    /// Offset of avail_event (the used ring's tail word).
    public var availEventOffset: Int { Self.usedRingOffset + Self.usedElementSize * Int(queueSize) }

    /// Offsets of the three areas placed one after another from an aligned base: descriptor
    /// table at 0, avail ring right after it, used ring at the next multiple of `usedAlignment`
    /// (4 for virtio 1.x; legacy drivers use 4096).
    public func contiguousOffsets(usedAlignment: Int = SplitRingLayout.usedAlignment)
        -> (descriptorTable: Int, avail: Int, used: Int, totalBytes: Int)
    {
        precondition(usedAlignment >= Self.usedAlignment && Self.isPowerOfTwo(UInt32(usedAlignment)))
        let avail = descriptorTableBytes
        let used = (avail + availRingBytes + usedAlignment - 1) & ~(usedAlignment - 1)
        return (0, avail, used, used + usedRingBytes)
    }
}

/// vring_need_event (include/uapi/linux/virtio_ring.h): true when the index moved past
/// `eventIndex`, i.e. `eventIndex` is in `[oldIndex, newIndex)` in wrapping u16 arithmetic
/// (the entry at `eventIndex` is among those just published). `newIndex == oldIndex` (nothing
/// published) never needs an event.
@inlinable
public func vringNeedEvent(eventIndex: UInt16, newIndex: UInt16, oldIndex: UInt16) -> Bool {
    newIndex &- eventIndex &- 1 < newIndex &- oldIndex
}

/// Why a ring could not be set up, or what the other side did wrong.
public enum SplitRingError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Area: String, Sendable { case descriptorTable = "descriptor table", avail = "avail ring", used = "used ring" }

    /// Queue size zero, not a power of two, or above 32768.
    case invalidQueueSize(UInt16)
    /// A ring area's host address breaks its required alignment.
    case misaligned(area: Area, address: UInt)
    /// A ring area's guest range is not mapped contiguously.
    case notMapped(area: Area, gpa: UInt64, length: UInt64)
    /// (driver side) the device returned a used id that is out of range or not in flight.
    case usedIdInvalid(UInt32)

    public var description: String {
        switch self {
        case .invalidQueueSize(let n): "queue size \(n) is not a power of two in 1...32768"
        case .misaligned(let area, let address): "\(area.rawValue) address 0x\(String(address, radix: 16)) is misaligned"
        case .notMapped(let area, let gpa, let length): "\(area.rawValue) at gpa 0x\(String(gpa, radix: 16)) (+\(length)) is not mapped"
        case .usedIdInvalid(let id): "used element id \(id) is out of range or not in flight"
        }
    }
}
