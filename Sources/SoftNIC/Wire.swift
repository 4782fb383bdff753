import Platform
import Synchronization
import Virtio

/// A bounded single-producer, single-consumer queue of frames between two DMA engines (a wire
/// between two ports of one daemon). Each frame travels with its virtio-net header (the
/// offloads it asks for: a partial checksum, a large frame to segment), so it is a byte ring of
/// variable-sized records: a 16-byte record header (frame length, then the 12-byte virtio-net
/// header) and the frame, padded to 16 bytes. A record never wraps: one that does not fit before
/// the end of the storage is preceded by a skip marker (length -1) and starts at offset 0.
/// Storage is allocated once; nothing allocates per frame.
public final class FrameRing: @unchecked Sendable {
    // @unchecked Sendable: one producer thread writes bytes in [tail, head + capacity) and
    // publishes `tail` with release; one consumer reads records in [head, tail) after an acquire
    // load and publishes `head` with release. No byte is touched by both at once.
    static let recordHeader = 16
    /// The largest frame a record holds (a GSO frame: 64 KiB plus its Ethernet and VLAN headers).
    static let maxFrame = LinkSpec.maxGSOFrame
    /// Bytes of storage (a power of two, a multiple of 16).
    let capacity: Int
    let storage: UnsafeMutableRawPointer
    /// Byte offsets, counted without wrapping (the storage offset is `offset & (capacity - 1)`).
    let head = Atomic<Int>(0)
    let tail = Atomic<Int>(0)
    /// Frames pushed (the producer's) and popped (published by the consumer): at most
    /// `maxFrames` wait, whatever their size, as in a NIC's queue of descriptors.
    var pushed = 0
    let popped = Atomic<Int>(0)
    static let maxFrames = 4096
    /// Signalled by the producer so a sleeping consumer wakes.
    public let wake: SharedFD

    init(capacity: Int) throws(SystemError) {
        precondition(capacity.nonzeroBitCount == 1 && capacity >= 4 * (Self.maxFrame + Self.recordHeader), "a power of two holding several large frames")
        self.capacity = capacity
        storage = .allocate(byteCount: capacity, alignment: 64)
        wake = SharedFD(try EventFD.make())
    }

    deinit {
        storage.deallocate()
    }

    @inline(__always)
    static func recordSize(_ length: Int) -> Int { recordHeader + ((length + 15) & ~15) }

    /// Producer: copies a frame and its header in; false when the frame is larger than a record
    /// holds or the ring is full (the caller counts a drop).
    func push(_ frame: UnsafeRawPointer, length: Int, header: VirtioNetHeader) -> Bool {
        guard length >= 0, length <= Self.maxFrame else { return false }
        // Acquire pairs with the consumer's release of `popped`.
        guard pushed &- popped.load(ordering: .acquiring) < Self.maxFrames else { return false }
        var t = tail.load(ordering: .relaxed)
        // Acquire pairs with the consumer's release of `head`: bytes before it are free once seen.
        let h = head.load(ordering: .acquiring)
        let size = Self.recordSize(length)
        var at = t & (capacity - 1)
        let skip = capacity - at < size ? capacity - at : 0
        guard (t &+ skip &+ size) &- h <= capacity else { return false }
        if skip > 0 {
            // Safety: at is 16-aligned and < capacity, so 16 bytes of storage are there (and free: checked above).
            (storage + at).storeBytes(of: Int32(-1), as: Int32.self)
            t &+= skip
            at = 0
        }
        let record = storage + at
        // Safety: [at, at + size) is inside the storage (no wrap) and free (checked above).
        record.storeBytes(of: Int32(length), as: Int32.self)
        header.write(to: record + 4, size: VirtioNetHeader.fullSize)
        (record + Self.recordHeader).copyMemory(from: frame, byteCount: length)
        // Release: the record's bytes (and a skip marker) are visible before the consumer sees the new tail.
        tail.store(t &+ size, ordering: .releasing)
        pushed &+= 1
        return true
    }

    /// Consumer: the next frame, if any: its bytes and its header in the ring (the consumer may
    /// change both, e.g. complete a checksum and clear NEEDS_CSUM, until `pop()`).
    func peek() -> (frame: UnsafeMutableRawPointer, length: Int, header: UnsafeMutableRawPointer)? {
        var h = head.load(ordering: .relaxed)
        // Acquire pairs with the producer's release of `tail`.
        let t = tail.load(ordering: .acquiring)
        guard h != t else { return nil }
        var at = h & (capacity - 1)
        // Safety: records and markers start 16-aligned inside the storage, written before `tail` was published.
        if (storage + at).load(as: Int32.self) == -1 {
            h &+= capacity - at
            head.store(h, ordering: .releasing)
            guard h != t else { return nil }
            at = 0
        }
        let record = storage + at
        let length = Int(truncatingIfNeeded: record.load(as: Int32.self))
        return (record + Self.recordHeader, length, record + 4)
    }

    /// Consumer: drops the frame `peek` returned.
    func pop() {
        let h = head.load(ordering: .relaxed)
        // Safety: a record (not a marker: peek stepped over it) starts at h's offset.
        let length = Int(truncatingIfNeeded: (storage + (h & (capacity - 1))).load(as: Int32.self))
        head.store(h &+ Self.recordSize(length), ordering: .releasing)
        popped.store(popped.load(ordering: .relaxed) &+ 1, ordering: .releasing)
    }

    var isEmpty: Bool { head.load(ordering: .relaxed) == tail.load(ordering: .acquiring) }
}

/// Where wire links find each other: each wired port registers its inbound ring under its id.
public final class WireHub: Sendable {
    public static let shared = WireHub()
    private let rings = Mutex<[String: FrameRing]>([:])
    /// Which port sends into each port's inbound ring: a ring has one producer.
    private let senders = Mutex<[String: String]>([:])

    public struct SharedPeer: Error, CustomStringConvertible {
        public let description: String
    }

    /// Makes `sender` the one port that sends to `peer`; refused when another port does already
    /// (two ports wired to one peer would be two producers on its single-producer ring).
    func claim(peer: String, sender: String) throws(SharedPeer) {
        let other: String? = senders.withLock { d in
            if let o = d[peer], o != sender { return o }
            d[peer] = sender
            return nil
        }
        if let other {
            throw SharedPeer(description: "link=wire:\(peer): port \(other) is already wired to \(peer); a port takes one wire (give each pair of ports its own: wire:B on A, wire:A on B)")
        }
    }

    /// Releases `sender`'s claim on `peer` (its link went away).
    func release(peer: String, sender: String) {
        senders.withLock { d in if d[peer] == sender { d[peer] = nil } }
    }

    func inbound(for id: String) throws(SystemError) -> FrameRing {
        if let r = rings.withLock({ $0[id] }) { return r }
        let r = try FrameRing(capacity: 16 << 20)
        return rings.withLock { d in
            if let existing = d[id] { return existing }
            d[id] = r
            return r
        }
    }
}
