/// The device side of a split virtqueue over three host pointers.
///
/// It only loads and stores ring words with the right ordering; the caller keeps
/// `last_avail_idx` / `used_idx` shadows and walks chains with `DescriptorChainWalker`.
/// Indices passed in are the free-running u16 indices; slots are taken modulo the size.
/// Not Sendable: one thread owns a queue at a time.
public struct SplitQueue {
    public let size: UInt16
    public let descriptorTable: UnsafeMutableRawPointer
    public let avail: UnsafeMutableRawPointer
    public let used: UnsafeMutableRawPointer
    @usableFromInline let mask: UInt16

    /// Checks the size (power of two, at most 32768) and the areas' alignments (16, 2, 4).
    /// The caller guarantees the areas hold `SplitRingLayout` sizes and outlive the queue.
    public init(size: UInt16, descriptorTable: UnsafeMutableRawPointer,
                avail: UnsafeMutableRawPointer, used: UnsafeMutableRawPointer) throws(SplitRingError) {
        guard SplitRingLayout.isValidQueueSize(size) else { throw .invalidQueueSize(size) }
        try checkAlignment(descriptorTable, SplitRingLayout.descriptorTableAlignment, .descriptorTable)
        try checkAlignment(avail, SplitRingLayout.availAlignment, .avail)
        try checkAlignment(used, SplitRingLayout.usedAlignment, .used)
        self.size = size
        self.descriptorTable = descriptorTable
        self.avail = avail
        self.used = used
        mask = size &- 1
    }

    /// Translates the three areas through guest memory (each must be mapped contiguously).
    public init<M: GuestMemoryAccess>(size: UInt16, descriptorTableGPA: UInt64, availGPA: UInt64,
                                      usedGPA: UInt64, memory: M) throws(SplitRingError) {
        guard let layout = SplitRingLayout(queueSize: size) else { throw .invalidQueueSize(size) }
        let desc = try translate(memory, descriptorTableGPA, layout.descriptorTableBytes, .descriptorTable)
        let avail = try translate(memory, availGPA, layout.availRingBytes, .avail)
        let used = try translate(memory, usedGPA, layout.usedRingBytes, .used)
        try self.init(size: size, descriptorTable: desc, avail: avail, used: used)
    }

    // MARK: avail ring (written by the driver)

    /// avail.idx with acquire ordering.
    @inlinable
    public func loadAvailIndex() -> UInt16 {
        // vhost_get_avail_idx + smp_rmb (drivers/vhost/vhost.c): "Only get avail ring entries
        // after they have been exposed by guest." Acquire pairs with the driver's release
        // (virtio_wmb before the avail->idx store in virtqueue_add_split).
        RingWord(avail + SplitRingLayout.availIndexOffset).loadAcquire()
    }

    /// avail.ring[index mod size]: the head the driver placed there. Call only for indices
    /// below an avail.idx loaded with `loadAvailIndex()`. The value is guest-controlled.
    @inlinable
    public func availHead(at index: UInt16) -> UInt16 {
        RingWord(avail + SplitRingLayout.availRingOffset + 2 * Int(index & mask)).loadRelaxed()
    }

    /// avail.flags (VRING_AVAIL_F_NO_INTERRUPT = 1), relaxed: order it with a fence first.
    @inlinable
    public func loadAvailFlags() -> UInt16 {
        RingWord(avail + SplitRingLayout.availFlagsOffset).loadRelaxed()
    }

    /// used_event, the avail ring's tail word, relaxed: order it with a fence first.
    @inlinable
    public func loadUsedEvent() -> UInt16 {
        RingWord(avail + SplitRingLayout.availRingOffset + 2 * Int(size)).loadRelaxed()
    }

    // MARK: used ring (written by the device)

    /// Writes used.ring[index mod size] = (id, len). Not visible until `publishUsedIndex`.
    @inlinable
    public func writeUsedElement(at index: UInt16, id: UInt32, length: UInt32) {
        let element = used + SplitRingLayout.usedRingOffset + SplitRingLayout.usedElementSize * Int(index & mask)
        // Safety: element is inside the used ring (slot < size) and 4-byte aligned (used is 4-aligned).
        element.storeBytes(of: (UInt64(id) | UInt64(length) << 32).littleEndian, as: UInt64.self)
    }

    /// used.idx = `newIndex` with release ordering.
    @inlinable
    public func publishUsedIndex(_ newIndex: UInt16) {
        // vhost_add_used_n (drivers/vhost/vhost.c) smp_wmb: "Make sure buffer is written before
        // we update index." Release orders the used elements (and the buffers the device wrote)
        // before the index; pairs with the driver's virtio_rmb in virtqueue_get_buf_ctx_split.
        RingWord(used + SplitRingLayout.usedIndexOffset).storeRelease(newIndex)
    }

    /// used.idx as last stored (the device owns it, so relaxed is enough).
    @inlinable
    public func loadUsedIndex() -> UInt16 {
        RingWord(used + SplitRingLayout.usedIndexOffset).loadRelaxed()
    }

    /// used.flags (VRING_USED_F_NO_NOTIFY = 1).
    @inlinable
    public func loadUsedFlags() -> UInt16 {
        RingWord(used + SplitRingLayout.usedFlagsOffset).loadRelaxed()
    }

    @inlinable
    public func storeUsedFlags(_ flags: UInt16) {
        RingWord(used + SplitRingLayout.usedFlagsOffset).storeRelaxed(flags)
    }

    /// avail_event, the used ring's tail word: "kick me when avail.idx passes this".
    @inlinable
    public func storeAvailEvent(_ index: UInt16) {
        RingWord(used + SplitRingLayout.usedRingOffset + SplitRingLayout.usedElementSize * Int(size))
            .storeRelaxed(index)
    }

    // MARK: notification suppression

    /// Whether the driver wants an interrupt after the device moved used.idx from `oldUsed` to
    /// `newUsed` (already published). With EVENT_IDX: `vring_need_event(used_event, new, old)`;
    /// without: unless avail.flags has VRING_AVAIL_F_NO_INTERRUPT.
    @inlinable
    public func needsInterrupt(oldUsed: UInt16, newUsed: UInt16, eventIdx: Bool) -> Bool {
        // vhost_notify (drivers/vhost/vhost.c) smp_mb: "Flush out used index updates. This is
        // paired with the barrier that the Guest executes when enabling interrupts." A store
        // (used.idx) followed by a load (used_event / avail.flags) needs a full fence: the
        // driver writes used_event, fences, then rereads used.idx (virtqueue_poll).
        ringFullFence()
        if eventIdx {
            return vringNeedEvent(eventIndex: loadUsedEvent(), newIndex: newUsed, oldIndex: oldUsed)
        }
        return loadAvailFlags() & SplitRingLayout.availFlagNoInterrupt == 0
    }

    /// Stops asking for kicks (vhost_disable_notify). With EVENT_IDX there is nothing to
    /// write: avail_event simply stays behind.
    @inlinable
    public func disableNotifications(eventIdx: Bool) {
        if !eventIdx {
            storeUsedFlags(loadUsedFlags() | SplitRingLayout.usedFlagNoNotify)
        }
    }

    /// Asks for a kick at the next avail entry after `lastAvailIndex` (vhost_enable_notify) and
    /// returns true if the driver has already published more: process them instead of sleeping.
    @inlinable
    public func enableNotifications(eventIdx: Bool, lastAvailIndex: UInt16) -> Bool {
        if eventIdx {
            storeAvailEvent(lastAvailIndex)
        } else {
            storeUsedFlags(loadUsedFlags() & ~SplitRingLayout.usedFlagNoNotify)
        }
        // vhost_enable_notify smp_mb: "They could have slipped one in as we were doing that:
        // make sure it's written, then check again." Store (avail_event / flags) then load
        // (avail.idx) needs a full fence; pairs with virtio_mb in virtqueue_kick_prepare_split.
        ringFullFence()
        return loadAvailIndex() != lastAvailIndex
    }
}

private func checkAlignment(_ p: UnsafeMutableRawPointer, _ alignment: Int,
                            _ area: SplitRingError.Area) throws(SplitRingError) {
    let address = UInt(bitPattern: p)
    guard address & UInt(alignment - 1) == 0 else { throw .misaligned(area: area, address: address) }
}

private func translate<M: GuestMemoryAccess>(_ memory: M, _ gpa: UInt64, _ length: Int,
                                             _ area: SplitRingError.Area) throws(SplitRingError) -> UnsafeMutableRawPointer {
    guard let p = memory.hostPointer(gpa: gpa, length: UInt64(length)) else {
        throw .notMapped(area: area, gpa: gpa, length: UInt64(length))
    }
    return p
}
