/// Guest-physical addresses of one split virtqueue's three parts.
public struct PlacedRing: Equatable, Sendable {
    public var index: UInt32
    /// Queue size (number of descriptors).
    public var size: UInt32
    public var descGPA: UInt64
    public var availGPA: UInt64
    public var usedGPA: UInt64

    public init(index: UInt32, size: UInt32, descGPA: UInt64, availGPA: UInt64, usedGPA: UInt64) {
        self.index = index; self.size = size
        self.descGPA = descGPA; self.availGPA = availGPA; self.usedGPA = usedGPA
    }

    /// One past the last byte of the used ring (the highest part in a `RingPlacement` layout).
    public var endGPA: UInt64 { usedGPA + RingPlacement.usedRingBytes(size: size) }

    // Field addresses, for drivers that write rings by hand.
    public var availIdxGPA: UInt64 { availGPA + 2 }
    public func availEntryGPA(_ slot: UInt32) -> UInt64 { availGPA + 4 + 2 * UInt64(slot % size) }
    public var usedEventGPA: UInt64 { availGPA + 4 + 2 * UInt64(size) }
    public var usedIdxGPA: UInt64 { usedGPA + 2 }
    public func usedEntryGPA(_ slot: UInt32) -> UInt64 { usedGPA + 4 + 8 * UInt64(slot % size) }
    public var availEventGPA: UInt64 { usedGPA + 4 + 8 * UInt64(size) }
    public func descGPA(_ i: UInt32) -> UInt64 { descGPA + 16 * UInt64(i) }
}

/// Lays out split virtqueues (virtio 1.2, 2.7: descriptor table 16-byte aligned, 16*S bytes;
/// available ring 2-aligned, 6+2*S bytes; used ring 4-aligned, 6+8*S bytes, both with the
/// event-index field) one after another.
public enum RingPlacement {
    public static let descAlignment: UInt64 = 16
    public static let availAlignment: UInt64 = 2
    public static let usedAlignment: UInt64 = 4
    /// Largest split-ring queue size.
    public static let maxQueueSize: UInt32 = 32768

    public static func descTableBytes(size: UInt32) -> UInt64 { 16 * UInt64(size) }
    public static func availRingBytes(size: UInt32) -> UInt64 { 6 + 2 * UInt64(size) }
    public static func usedRingBytes(size: UInt32) -> UInt64 { 6 + 8 * UInt64(size) }

    static func alignUp(_ v: UInt64, _ a: UInt64) -> UInt64 { (v + a - 1) / a * a }

    /// Pure layout: `count` rings of `size` entries, indices `firstIndex...`, starting at
    /// `startGPA` (rounded up to `ringAlignment`, at least 16). Each ring starts on a
    /// `ringAlignment` boundary; pass 4096 to give each ring its own pages.
    public static func layout(rings count: Int, size: UInt32, startGPA: UInt64, firstIndex: UInt32 = 0,
                              ringAlignment: UInt64 = 16) throws(FrontendError) -> [PlacedRing] {
        guard count >= 0 else { throw .invalidArgument("ring count \(count)") }
        guard size >= 1, size <= maxQueueSize else { throw .invalidArgument("queue size \(size) (1...\(maxQueueSize))") }
        guard ringAlignment >= descAlignment, ringAlignment & (ringAlignment - 1) == 0 else {
            throw .invalidArgument("ring alignment \(ringAlignment) must be a power of two >= 16")
        }
        var out: [PlacedRing] = []
        var cursor = startGPA
        for i in 0..<count {
            let desc = alignUp(cursor, ringAlignment)
            let avail = alignUp(desc + descTableBytes(size: size), availAlignment)
            let used = alignUp(avail + availRingBytes(size: size), usedAlignment)
            let ring = PlacedRing(index: firstIndex + UInt32(i), size: size, descGPA: desc, availGPA: avail, usedGPA: used)
            out.append(ring)
            cursor = ring.endGPA
        }
        return out
    }

    /// Lays out rings inside `ram`, starting `offset` bytes into it, and checks they fit.
    public static func place(rings count: Int, size: UInt32, in ram: GuestRAM, offset: UInt64 = 0,
                             firstIndex: UInt32 = 0, ringAlignment: UInt64 = 16) throws(FrontendError) -> [PlacedRing] {
        let rings = try layout(rings: count, size: size, startGPA: ram.baseGPA + offset,
                               firstIndex: firstIndex, ringAlignment: ringAlignment)
        if let last = rings.last, !ram.contains(gpa: ram.baseGPA + offset, length: last.endGPA - ram.baseGPA - offset) {
            throw .unmappedAddress(gpa: ram.baseGPA + offset, length: last.endGPA - ram.baseGPA - offset)
        }
        return rings
    }
}
