/// Reads a split used ring from the driver's side: what a relay does with the mediated used ring
/// the device completes into.
public struct UsedRingReader {
    public let size: UInt16
    public let used: UnsafeMutableRawPointer
    @usableFromInline let mask: UInt16

    // Safety: the caller guarantees `used` holds a used ring of `size` entries (6 + 8*size bytes,
    // 4-byte aligned) and outlives the reader.
    public init(size: UInt16, used: UnsafeMutableRawPointer) {
        self.size = size
        self.used = used
        mask = size &- 1
    }

    /// used.idx with acquire: entries below it were written before the device released it.
    @inlinable
    public func loadIndex() -> UInt16 {
        // Mirrors virtqueue_get_buf_ctx_split: "Only get used array entries after they have been
        // exposed by host" (virtio_rmb after reading used->idx).
        RingWord(used + SplitRingLayout.usedIndexOffset).loadAcquire()
    }

    /// used.ring[index mod size] as (id, len). Call only below a `loadIndex()` value.
    @inlinable
    public func element(at index: UInt16) -> (id: UInt32, length: UInt32) {
        let p = used + SplitRingLayout.usedRingOffset + SplitRingLayout.usedElementSize * Int(index & mask)
        return (UInt32(littleEndian: p.loadUnaligned(as: UInt32.self)),
                UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt32.self)))
    }

    /// used.flags (the device's VRING_USED_F_NO_NOTIFY), relaxed.
    @inlinable
    public func loadFlags() -> UInt16 { RingWord(used + SplitRingLayout.usedFlagsOffset).loadRelaxed() }

    /// avail_event (the device's EVENT_IDX kick threshold), relaxed.
    @inlinable
    public func loadAvailEvent() -> UInt16 {
        RingWord(used + SplitRingLayout.usedRingOffset + SplitRingLayout.usedElementSize * Int(size)).loadRelaxed()
    }
}
