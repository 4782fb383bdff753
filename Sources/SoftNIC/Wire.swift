import Platform
import Synchronization

/// A bounded single-producer, single-consumer queue of frames between two DMA engines (a wire
/// between two ports of one daemon). Slots are preallocated; nothing allocates per frame.
public final class FrameRing: @unchecked Sendable {
    // @unchecked Sendable: one producer thread writes slots in [tail, head + capacity) and
    // publishes `tail` with release; one consumer reads slots in [head, tail) after an acquire
    // load and publishes `head` with release. No slot is touched by both at once.
    static let slotSize = 9216
    let capacity: Int
    let storage: UnsafeMutableRawPointer
    let lengths: UnsafeMutablePointer<Int>
    let head = Atomic<Int>(0)
    let tail = Atomic<Int>(0)
    /// Signalled by the producer so a sleeping consumer wakes.
    public let wake: SharedFD

    init(capacity: Int) throws(SystemError) {
        self.capacity = capacity
        storage = .allocate(byteCount: capacity * Self.slotSize, alignment: 64)
        lengths = .allocate(capacity: capacity)
        lengths.initialize(repeating: 0, count: capacity)
        wake = SharedFD(try EventFD.make())
    }

    deinit {
        storage.deallocate()
        lengths.deallocate()
    }

    /// Producer: copies a frame in; false when full (the caller counts a drop).
    func push(_ frame: UnsafeRawPointer, length: Int) -> Bool {
        guard length <= Self.slotSize else { return false }
        let t = tail.load(ordering: .relaxed)
        // Acquire pairs with the consumer's release of `head`: the slot is free once seen.
        let h = head.load(ordering: .acquiring)
        guard t &- h < capacity else { return false }
        let slot = t % capacity
        (storage + slot * Self.slotSize).copyMemory(from: frame, byteCount: length)
        lengths[slot] = length
        // Release: the slot's bytes are visible before the consumer sees the new tail.
        tail.store(t &+ 1, ordering: .releasing)
        return true
    }

    /// Consumer: the next frame, if any (valid until `pop()`).
    func peek() -> (UnsafeRawPointer, Int)? {
        let h = head.load(ordering: .relaxed)
        // Acquire pairs with the producer's release of `tail`.
        guard h != tail.load(ordering: .acquiring) else { return nil }
        let slot = h % capacity
        return (UnsafeRawPointer(storage + slot * Self.slotSize), lengths[slot])
    }

    func pop() {
        head.store(head.load(ordering: .relaxed) &+ 1, ordering: .releasing)
    }

    var isEmpty: Bool { head.load(ordering: .relaxed) == tail.load(ordering: .acquiring) }
}

/// Where wire links find each other: each wired port registers its inbound ring under its id.
public final class WireHub: Sendable {
    public static let shared = WireHub()
    private let rings = Mutex<[String: FrameRing]>([:])

    func inbound(for id: String) throws(SystemError) -> FrameRing {
        if let r = rings.withLock({ $0[id] }) { return r }
        let r = try FrameRing(capacity: 4096)
        return rings.withLock { d in
            if let existing = d[id] { return existing }
            d[id] = r
            return r
        }
    }
}
