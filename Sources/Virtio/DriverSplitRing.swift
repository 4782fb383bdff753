/// One buffer a driver offers: a guest range and whether the device may write it.
public struct DriverBuffer: Equatable, Sendable {
    public var gpa: UInt64
    public var length: UInt32
    public var isWritable: Bool

    public init(gpa: UInt64, length: UInt32, isWritable: Bool) {
        self.gpa = gpa
        self.length = length
        self.isWritable = isWritable
    }
}

/// A used element as the driver reads it.
public struct UsedElement: Equatable, Sendable {
    public var id: UInt32
    public var length: UInt32

    public init(id: UInt32, length: UInt32) {
        self.id = id
        self.length = length
    }
}

/// The driver side of a split ring, for test frontends, benchmarks and tools (not the daemon).
///
/// It zeroes and owns the layout of the three areas it is given, keeps a free list of
/// descriptors on the host side (like Linux's desc_extra, so a device scribbling on the table
/// cannot corrupt it), adds chains, publishes avail.idx with release, reads used entries with
/// acquire, and implements both notification-suppression schemes. Raw writers let hostile-input
/// tests put any bytes in the descriptor table and the avail ring.
/// Not Sendable: one thread drives it.
public final class DriverSplitRing {
    public let size: UInt16
    /// Whether VIRTIO_F_EVENT_IDX is in use (used_event / avail_event instead of flags).
    public let eventIdx: Bool
    public let descriptorTable: UnsafeMutableRawPointer
    public let avail: UnsafeMutableRawPointer
    public let used: UnsafeMutableRawPointer
    public let descriptorTableGPA: UInt64
    public let availGPA: UInt64
    public let usedGPA: UInt64

    private let layout: SplitRingLayout
    private let device: SplitQueue
    private let mask: UInt16
    private var nextFree: [UInt16]
    private var chainLength: [UInt16]
    private var freeHead: UInt16 = 0
    /// Descriptors not in any chain added through `addChain` / `addIndirectChain`.
    public private(set) var freeCount: Int
    /// The avail.idx the next `publish()` stores (entries pushed so far).
    public private(set) var availIndex: UInt16 = 0
    /// avail.idx at the last `kickNeeded()` check (Linux: new - num_added).
    private var kickedAvailIndex: UInt16 = 0
    /// The next used index the driver will read (last_used_idx).
    public private(set) var lastUsedIndex: UInt16 = 0

    /// Lays the ring out over the given areas (sizes from `SplitRingLayout`) and zeroes them.
    public init(size: UInt16, eventIdx: Bool,
                descriptorTable: UnsafeMutableRawPointer, descriptorTableGPA: UInt64,
                avail: UnsafeMutableRawPointer, availGPA: UInt64,
                used: UnsafeMutableRawPointer, usedGPA: UInt64) throws(SplitRingError) {
        guard let layout = SplitRingLayout(queueSize: size) else { throw .invalidQueueSize(size) }
        // Size and alignment checks come from the device-side view of the same areas.
        device = try SplitQueue(size: size, descriptorTable: descriptorTable, avail: avail, used: used)
        self.size = size
        self.eventIdx = eventIdx
        self.layout = layout
        mask = size &- 1
        self.descriptorTable = descriptorTable
        self.avail = avail
        self.used = used
        self.descriptorTableGPA = descriptorTableGPA
        self.availGPA = availGPA
        self.usedGPA = usedGPA
        // Safety: the caller hands over areas of the layout's sizes that outlive the ring.
        descriptorTable.initializeMemory(as: UInt8.self, repeating: 0, count: layout.descriptorTableBytes)
        avail.initializeMemory(as: UInt8.self, repeating: 0, count: layout.availRingBytes)
        used.initializeMemory(as: UInt8.self, repeating: 0, count: layout.usedRingBytes)
        nextFree = (0..<Int(size)).map { UInt16(truncatingIfNeeded: $0 + 1) }
        chainLength = Array(repeating: 0, count: Int(size))
        freeCount = Int(size)
    }

    /// Lays the three areas out contiguously from `baseGPA` (see `SplitRingLayout.contiguousOffsets`).
    public convenience init<M: GuestMemoryAccess>(size: UInt16, eventIdx: Bool, baseGPA: UInt64,
                                                  memory: M) throws(SplitRingError) {
        guard let layout = SplitRingLayout(queueSize: size) else { throw .invalidQueueSize(size) }
        let o = layout.contiguousOffsets()
        guard let base = memory.hostPointer(gpa: baseGPA, length: UInt64(o.totalBytes)) else {
            throw .notMapped(area: .descriptorTable, gpa: baseGPA, length: UInt64(o.totalBytes))
        }
        try self.init(size: size, eventIdx: eventIdx,
                      descriptorTable: base + o.descriptorTable, descriptorTableGPA: baseGPA + UInt64(o.descriptorTable),
                      avail: base + o.avail, availGPA: baseGPA + UInt64(o.avail),
                      used: base + o.used, usedGPA: baseGPA + UInt64(o.used))
    }

    /// The device-side view of the same memory (for in-process tests).
    public func deviceQueue() -> SplitQueue { device }

    // MARK: adding buffers

    /// Puts `buffers` in a chain of free descriptors and its head in the avail ring (not yet
    /// published). Returns the head, or nil if the collection is empty or too few are free.
    @discardableResult
    public func addChain<C: Collection>(_ buffers: C) -> UInt16? where C.Element == DriverBuffer {
        let n = buffers.count
        guard n > 0, n <= freeCount else { return nil }
        let head = freeHead
        var index = head
        var remaining = n
        for b in buffers {
            remaining -= 1
            let next = nextFree[Int(index)]
            var flags: VirtqDescriptor.Flags = b.isWritable ? .write : []
            if remaining > 0 { flags.insert(.next) }
            writeDescriptor(VirtqDescriptor(addr: b.gpa, len: b.length, flags: flags, next: remaining > 0 ? next : 0),
                            at: index)
            if remaining > 0 { index = next } else { freeHead = next }
        }
        freeCount -= n
        chainLength[Int(head)] = UInt16(n)
        pushAvailHead(head)
        return head
    }

    /// Writes `buffers` as an indirect table at `table` / `tableGPA` (16 bytes per buffer) and
    /// adds one INDIRECT descriptor pointing at it. Returns the head, or nil if none is free.
    @discardableResult
    public func addIndirectChain<C: Collection>(_ buffers: C, table: UnsafeMutableRawPointer,
                                                tableGPA: UInt64) -> UInt16? where C.Element == DriverBuffer {
        let n = buffers.count
        guard n > 0, freeCount > 0 else { return nil }
        var i = 0
        for b in buffers {
            var flags: VirtqDescriptor.Flags = b.isWritable ? .write : []
            if i + 1 < n { flags.insert(.next) }
            // Safety: the caller provides a table of 16 bytes per buffer at `table`.
            VirtqDescriptor(addr: b.gpa, len: b.length, flags: flags, next: i + 1 < n ? UInt16(truncatingIfNeeded: i + 1) : 0)
                .store(to: table + i * SplitRingLayout.descriptorSize)
            i += 1
        }
        let head = freeHead
        freeHead = nextFree[Int(head)]
        freeCount -= 1
        chainLength[Int(head)] = 1
        writeDescriptor(VirtqDescriptor(addr: tableGPA, len: UInt32(n * SplitRingLayout.descriptorSize), flags: .indirect),
                        at: head)
        pushAvailHead(head)
        return head
    }

    /// Makes every head pushed so far visible: avail.idx = `availIndex` with release ordering.
    public func publish() {
        // virtqueue_add_split (drivers/virtio/virtio_ring.c) virtio_wmb: "Descriptors and
        // available array need to be set before we expose the new available array entries."
        // Release pairs with the device's acquire load of avail.idx.
        RingWord(avail + SplitRingLayout.availIndexOffset).storeRelease(availIndex)
    }

    /// Whether the device wants a kick for what was published since the last check
    /// (virtqueue_kick_prepare_split): avail_event with EVENT_IDX, else used.flags NO_NOTIFY.
    public func kickNeeded() -> Bool {
        // virtqueue_kick_prepare_split virtio_mb: "We need to expose available array entries
        // before checking avail event." Store (avail.idx) then load (avail_event / used.flags)
        // needs a full fence; pairs with the device's smp_mb in vhost_enable_notify.
        ringFullFence()
        let old = kickedAvailIndex
        let new = availIndex
        kickedAvailIndex = new
        if eventIdx {
            return vringNeedEvent(eventIndex: loadAvailEvent(), newIndex: new, oldIndex: old)
        }
        return RingWord(used + SplitRingLayout.usedFlagsOffset).loadRelaxed() & SplitRingLayout.usedFlagNoNotify == 0
    }

    // MARK: used ring

    /// Whether used.idx has moved past `lastUsedIndex` (acquire).
    public var hasUsed: Bool { loadUsedIndex() != lastUsedIndex }

    /// used.idx with acquire ordering.
    public func loadUsedIndex() -> UInt16 {
        // virtqueue_get_buf_ctx_split virtio_rmb: "Only get used array entries after they have
        // been exposed by host." Acquire pairs with the device's release store of used.idx.
        RingWord(used + SplitRingLayout.usedIndexOffset).loadAcquire()
    }

    /// Takes the next used element and returns its descriptors to the free list, or nil if
    /// there is none. Throws if the device returned an id that is not the head of a chain in
    /// flight (added through `addChain` / `addIndirectChain`).
    public func popUsed() throws(SplitRingError) -> UsedElement? {
        guard loadUsedIndex() != lastUsedIndex else { return nil }
        let slot = used + SplitRingLayout.usedRingOffset + SplitRingLayout.usedElementSize * Int(lastUsedIndex & mask)
        // Safety: slot < size lies inside the used ring; read only after the acquire load above.
        let raw = UInt64(littleEndian: slot.loadUnaligned(as: UInt64.self))
        let element = UsedElement(id: UInt32(truncatingIfNeeded: raw), length: UInt32(truncatingIfNeeded: raw >> 32))
        guard element.id < UInt32(size), chainLength[Int(element.id)] != 0 else { throw .usedIdInvalid(element.id) }
        let head = UInt16(element.id)
        var tail = head
        for _ in 1..<Int(chainLength[Int(head)]) { tail = nextFree[Int(tail)] }
        freeCount += Int(chainLength[Int(head)])
        chainLength[Int(head)] = 0
        nextFree[Int(tail)] = freeHead
        freeHead = head
        lastUsedIndex &+= 1
        return element
    }

    // MARK: interrupt suppression

    /// With EVENT_IDX: used_event = `lastUsedIndex` (interrupt at the next used entry);
    /// without: clears VRING_AVAIL_F_NO_INTERRUPT. Returns true if used entries are already
    /// pending, so the caller polls instead of waiting (virtqueue_enable_cb + virtqueue_poll).
    public func enableInterrupts() -> Bool {
        if eventIdx {
            setUsedEvent(lastUsedIndex)
        } else {
            setAvailFlags(loadAvailFlags() & ~SplitRingLayout.availFlagNoInterrupt)
        }
        // virtqueue_poll virtio_mb: the used_event / flags store must be visible before used.idx
        // is reread, or an interrupt can be lost; pairs with the device's smp_mb in vhost_notify.
        ringFullFence()
        return hasUsed
    }

    /// Sets VRING_AVAIL_F_NO_INTERRUPT (without EVENT_IDX the device then skips interrupts; with
    /// it, the device looks only at used_event, which the caller leaves behind).
    public func disableInterrupts() {
        setAvailFlags(loadAvailFlags() | SplitRingLayout.availFlagNoInterrupt)
    }

    /// used_event, the avail ring's tail word: "interrupt me when used.idx passes this".
    public func setUsedEvent(_ index: UInt16) {
        RingWord(avail + layout.usedEventOffset).storeRelaxed(index)
    }

    /// avail_event, the used ring's tail word, as the device last wrote it.
    public func loadAvailEvent() -> UInt16 {
        RingWord(used + layout.availEventOffset).loadRelaxed()
    }

    public func loadAvailFlags() -> UInt16 {
        RingWord(avail + SplitRingLayout.availFlagsOffset).loadRelaxed()
    }

    public func setAvailFlags(_ flags: UInt16) {
        RingWord(avail + SplitRingLayout.availFlagsOffset).storeRelaxed(flags)
    }

    // MARK: raw access (hostile-input tests)

    /// Writes any descriptor at `index` of the ring's table, bypassing the free list.
    public func writeDescriptor(_ descriptor: VirtqDescriptor, at index: UInt16) {
        precondition(index < size, "descriptor index out of range")
        descriptor.store(to: descriptorTable + Int(index) * SplitRingLayout.descriptorSize)
    }

    /// Takes the next used element as it is, without touching the free list (the completion of a
    /// head made with `pushAvailHead`), or nil if there is none.
    public func takeRawUsed() -> UsedElement? {
        guard loadUsedIndex() != lastUsedIndex else { return nil }
        let slot = used + SplitRingLayout.usedRingOffset + SplitRingLayout.usedElementSize * Int(lastUsedIndex & mask)
        // Safety: slot < size lies inside the used ring; read only after the acquire load above.
        let raw = UInt64(littleEndian: slot.loadUnaligned(as: UInt64.self))
        lastUsedIndex &+= 1
        return UsedElement(id: UInt32(truncatingIfNeeded: raw), length: UInt32(truncatingIfNeeded: raw >> 32))
    }

    /// Puts any value in avail.ring[availIndex mod size] and advances `availIndex` (not yet
    /// published), bypassing the free list: used ids for such heads make `popUsed` throw.
    public func pushAvailHead(_ head: UInt16) {
        RingWord(avail + SplitRingLayout.availRingOffset + 2 * Int(availIndex & mask)).storeRelaxed(head)
        availIndex &+= 1
    }
}
