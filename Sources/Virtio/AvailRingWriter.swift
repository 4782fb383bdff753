/// Writes a split avail ring from the driver's side: what the avail relay does with the mediated
/// avail ring the device reads (`relay=avail+used`). The counterpart of `UsedRingReader`.
public struct AvailRingWriter {
    public let size: UInt16
    public let avail: UnsafeMutableRawPointer
    @usableFromInline let mask: UInt16

    // Safety: the caller guarantees `avail` holds an avail ring of `size` entries (6 + 2*size
    // bytes, 2-byte aligned) and outlives the writer.
    public init(size: UInt16, avail: UnsafeMutableRawPointer) {
        self.size = size
        self.avail = avail
        mask = size &- 1
    }

    /// avail.ring[index mod size] = head. Not visible to the device until `publishIndex`.
    @inlinable
    public func writeHead(_ head: UInt16, at index: UInt16) {
        RingWord(avail + SplitRingLayout.availRingOffset + 2 * Int(index & mask)).storeRelaxed(head)
    }

    /// avail.idx = `index` with release ordering.
    @inlinable
    public func publishIndex(_ index: UInt16) {
        // virtqueue_add_split (virtio_ring.c): virtio_wmb before the avail->idx store, "Descriptors
        // and available array need to be set before we expose the new available array entries."
        // Pairs with the device's acquire load of avail.idx (SplitQueue.loadAvailIndex).
        RingWord(avail + SplitRingLayout.availIndexOffset).storeRelease(index)
    }

    /// avail.idx as last stored (the writer owns it).
    @inlinable
    public func loadIndex() -> UInt16 { RingWord(avail + SplitRingLayout.availIndexOffset).loadRelaxed() }

    /// avail.flags (VRING_AVAIL_F_NO_INTERRUPT = 1).
    @inlinable
    public func storeFlags(_ flags: UInt16) { RingWord(avail + SplitRingLayout.availFlagsOffset).storeRelaxed(flags) }

    /// used_event, the avail ring's tail word: "interrupt me when used.idx passes this".
    @inlinable
    public func storeUsedEvent(_ index: UInt16) {
        RingWord(avail + SplitRingLayout.availRingOffset + 2 * Int(size)).storeRelaxed(index)
    }

    /// Whether the device wants a kick after avail.idx moved from `oldIndex` to `newIndex`
    /// (already published), from the device's used ring `used` (its flags and avail_event).
    @inlinable
    public func deviceWantsKick(used: UsedRingReader, oldIndex: UInt16, newIndex: UInt16, eventIdx: Bool) -> Bool {
        // virtqueue_kick_prepare_split: virtio_mb, "We need to expose available array entries
        // before checking avail event." Store (avail.idx) then load (avail_event / flags): a
        // full fence; pairs with the device's fence in SplitQueue.enableNotifications.
        ringFullFence()
        if eventIdx { return vringNeedEvent(eventIndex: used.loadAvailEvent(), newIndex: newIndex, oldIndex: oldIndex) }
        return used.loadFlags() & SplitRingLayout.usedFlagNoNotify == 0
    }
}
