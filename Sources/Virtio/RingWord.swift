import Synchronization

/// A little-endian 16-bit word of a ring shared with the other side (flags, idx, ring entries,
/// event indices), accessed only through atomic loads and stores with an explicit ordering.
///
/// Atomics come from the standard Synchronization module rather than swift-atomics so the
/// ring and walker files compile on their own (see Fuzz/chain-walker/build.sh).
@usableFromInline
struct RingWord {
    @usableFromInline let address: UnsafeMutableRawPointer

    @inlinable init(_ address: UnsafeMutableRawPointer) { self.address = address }

    // Safety: address is 2-byte aligned (checked when the ring is set up) inside a mapping that outlives the ring, and the word is only ever accessed atomically.
    @inlinable var atomic: UnsafeMutablePointer<Atomic<UInt16>> {
        address.assumingMemoryBound(to: Atomic<UInt16>.self)
    }

    @inlinable func loadAcquire() -> UInt16 {
        UInt16(littleEndian: atomic.pointee.load(ordering: .acquiring))
    }

    @inlinable func loadRelaxed() -> UInt16 {
        UInt16(littleEndian: atomic.pointee.load(ordering: .relaxed))
    }

    @inlinable func storeRelease(_ value: UInt16) {
        atomic.pointee.store(value.littleEndian, ordering: .releasing)
    }

    @inlinable func storeRelaxed(_ value: UInt16) {
        atomic.pointee.store(value.littleEndian, ordering: .relaxed)
    }
}

/// A full barrier (Linux smp_mb / virtio_mb): orders earlier stores before later loads.
@inlinable
func ringFullFence() {
    atomicMemoryFence(ordering: .sequentiallyConsistent)
}
