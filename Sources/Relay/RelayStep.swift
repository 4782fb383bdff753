import Platform
import Synchronization
import VhostUser
import Virtio

/// The relay step: one ring's new completions copied to the guest's used ring, every byte they
/// expose marked first.
extension RelayEngine {
    /// Copies new completions of one ring to the guest. Returns how many it moved.
    @inline(__always)
    func step(_ q: RelayQueue) -> Int {
        guard let g = q.guest else { return 0 }
        if let a = q.avail { return stepAvail(q, g, a) }
        let deviceIndex = q.reader.loadIndex()
        let flags = q.reader.loadFlags()
        let availEvent = q.reader.loadAvailEvent()
        let old = q.lastRelayed
        let n = deviceIndex &- old
        let notifyChanged = flags != q.lastFlags || availEvent != q.lastAvailEvent
        if n == 0 && !notifyChanged { return 0 }
        let c = q.config
        // More than a ring of new entries cannot be the device's: an index that is not (yet) its
        // own. Nothing is relayed until the device writes a sane one.
        if n > c.ring.size {
            if !q.insaneIndexSeen { q.insaneIndexSeen = true; q.counters.errors.wrappingAdd(1, ordering: .relaxed) }
            return 0
        }
        q.insaneIndexSeen = false
        guard let log else { return 0 }
        var marker = WrittenBytesMarker(batch: DirtyLog.Batch(log: log), granularity: c.log, skipMarking: skipBufferMarking,
                                        journal: journal.map { JournalContext(journal: $0, view: view, ring: c.ring.index, publishIndex: deviceIndex) })
        var i = old
        while i != deviceIndex {
            let (id, length) = q.reader.element(at: i)
            g.writeUsedElement(at: i, id: id, length: length)
            if c.deviceWritesBuffers && length > 0 && id < UInt32(c.ring.size) {
                markWritten(q, g, head: UInt16(id), length: length, marker: &marker)
            }
            i &+= 1
        }
        if n > 0 { Self.markUsedEntries(&marker.batch, c.ring, from: old, count: n) }
        var notificationsEnabled = false
        if notifyChanged {
            // The device's notification state lives in the used ring: carry it to the guest's.
            notificationsEnabled = (flags != q.lastFlags && flags & 1 == 0) || availEvent != q.lastAvailEvent
            g.storeUsedFlags(flags)
            g.storeAvailEvent(availEvent)
            marker.batch.mark(gpa: c.ring.usedLogGPA, length: 2)
            marker.batch.mark(gpa: c.ring.usedLogGPA &+ 4 &+ 8 &* UInt64(c.ring.size), length: 2)
            q.lastFlags = flags
            q.lastAvailEvent = availEvent
        }
        if n > 0 {
            marker.batch.mark(gpa: c.ring.usedLogGPA &+ 2, length: 2)
        }
        // Every mark is in the log before the index that exposes the entries is published:
        // flush does the ORs (buffers and used-ring words share the batch), and the release store below orders them first.
        marker.batch.flush()
        if n > 0 {
            g.publishUsedIndex(deviceIndex)
            q.lastRelayed = deviceIndex
            notifyGuest(q, g, oldUsed: old, newUsed: deviceIndex, relayed: n, pages: marker.pages)
        }
        if notificationsEnabled, let kick = c.ring.kick {
            // The device asked for kicks (it is about to sleep), but the guest sees that request
            // only now, through us: buffers it posted in between came without a kick. Full fence
            // (store of the flags, then load of avail.idx, as virtqueue_enable_cb_delayed), then
            // ring the device's doorbell if the guest has posted buffers the device has not used.
            atomicMemoryFence(ordering: .sequentiallyConsistent)
            if g.loadAvailIndex() != deviceIndex && !EventFD.signal(kick.raw) { quarantineBlockingFDs() }
        }
        return Int(n)
    }


    /// After a used index was published: the guest's interrupt if EVENT_IDX (or its flags) asks
    /// for one, and the ring's counters.
    @inline(__always)
    func notifyGuest(_ q: RelayQueue, _ g: SplitQueue, oldUsed: UInt16, newUsed: UInt16, relayed: UInt16, pages: UInt64) {
        if q.guestCallFD >= 0 && g.needsInterrupt(oldUsed: oldUsed, newUsed: newUsed, eventIdx: q.config.eventIdx) {
            if !EventFD.signal(q.guestCallFD) { quarantineBlockingFDs() }
            q.counters.interrupts.wrappingAdd(1, ordering: .relaxed)
        }
        q.counters.relayed.wrappingAdd(UInt64(relayed), ordering: .relaxed)
        q.counters.pagesMarked.wrappingAdd(pages, ordering: .relaxed)
    }

    /// Marks the used entries [from, from + count) of `ring` in its used ring in guest memory (at
    /// its log address): one or two contiguous slot ranges, as the ring wraps.
    @inline(__always)
    static func markUsedEntries(_ batch: inout DirtyLog.Batch, _ ring: RingSetup, from: UInt16, count: UInt16) {
        let first = UInt64(from & (ring.size &- 1))
        let total = UInt64(count)
        let tail = min(total, UInt64(ring.size) &- first)
        batch.mark(gpa: ring.usedLogGPA &+ 4 &+ 8 &* first, length: 8 &* tail)
        if total > tail { batch.mark(gpa: ring.usedLogGPA &+ 4, length: 8 &* (total &- tail)) }
    }

    /// Marks what the device wrote into the chain at `head` (see `WrittenBytesMarker.mark`). A
    /// chain the guest broke since the device completed it keeps the marks made up to the break,
    /// and the break is counted as an error of the ring.
    @inline(__always)
    func markWritten(_ q: RelayQueue, _ g: SplitQueue, head: UInt16, length: UInt32, marker: inout WrittenBytesMarker) {
        do throws(ChainError) {
            try marker.mark(head: head, length: length, table: g.descriptorTable, queueSize: q.config.ring.size, tables: view)
        } catch {
            q.counters.errors.wrappingAdd(1, ordering: .relaxed)
        }
    }
}

/// The relay's chain visitor: marks the first `used.len` bytes of a completed chain's writable
/// buffers in the step's dirty-log batch (`log=exact`), its written buffers whole (`buffer`), or
/// the 64-page runs around the written bytes (`page-run`).
struct WrittenBytesMarker: ChainVisitor, ~Copyable {
    /// The most `log=buffer` marks of one buffer beyond its written bytes (a virtio-net receive
    /// buffer is at most 64 KiB and a header).
    static let bufferMarkLimit: UInt64 = 65_536 + 4_096
    var batch: DirtyLog.Batch
    let granularity: LogGranularity
    /// Bytes of the current chain still to mark.
    var remaining: UInt64 = 0
    /// Pages marked by this step (for the ring's counters).
    var pages: UInt64 = 0
    /// Test-only: count the ranges but mark nothing (VDPAD_TEST_SKIP_BUFFER_MARKING).
    let skipMarking: Bool
    /// Test-only: journal each range (VDPAD_TEST_JOURNAL).
    let journal: JournalContext?

    init(batch: consuming DirtyLog.Batch, granularity: LogGranularity = .exact, skipMarking: Bool = false, journal: JournalContext? = nil) {
        self.batch = batch
        self.granularity = granularity
        self.skipMarking = skipMarking
        self.journal = journal
    }

    /// Marks the first `length` bytes of the writable buffers of the chain at `head` in the
    /// descriptor table `table` (`queueSize` entries), walking indirect tables. The walk is
    /// `ChainWalk`, with the device walker's bounds (head and next indices inside their table,
    /// TTL, at most queue-size buffers, one level of indirection, an indirect descriptor never
    /// with NEXT and its length a non-zero multiple of 16). Only the tables are read: indirect
    /// tables translate through `tables`; buffer addresses are marked as the guest-physical
    /// addresses they are, never translated (the device's IOMMU maps guest memory 1:1), and a
    /// readable buffer after a writable one is no concern of the relay's. Indirect tables are
    /// followed whether or not INDIRECT_DESC is negotiated now: the device decided when the ring
    /// started, and marking a chain it completed is never wrong. On a broken chain it throws
    /// after marking what it walked up to the break.
    @inline(__always)
    mutating func mark<Tables: GuestMemoryAccess>(head: UInt16, length: UInt32, table: UnsafeRawPointer, queueSize: UInt16,
                                                  tables: Tables) throws(ChainError) {
        remaining = UInt64(length)
        guard remaining > 0 else { return }
        _ = try ChainWalk.walk(head: head, table: table, queueSize: queueSize, indirectAllowed: true, tables: tables, visitor: &self)
    }

    @inline(__always)
    mutating func visit(_ d: VirtqDescriptor, position: Int, index: UInt16) -> Bool {
        if d.flags.contains(.write) && d.len > 0 {
            // `buffer` marks each writable buffer that holds written bytes whole, up to
            // `bufferMarkLimit`: the descriptor is the guest's, re-read at completion, and a
            // length it rewrote must not make the relay mark gigabytes.
            let written = min(UInt64(d.len), remaining)
            let m = granularity == .buffer ? max(written, min(UInt64(d.len), Self.bufferMarkLimit)) : written
            if !skipMarking {
                if granularity == .pageRun {
                    pages &+= batch.markRuns(gpa: d.addr, length: m)
                } else {
                    batch.mark(gpa: d.addr, length: m)
                    pages &+= ((d.addr &+ m &- 1) >> 12) &- (d.addr >> 12) &+ 1
                }
            }
            journal?.record(gpa: d.addr, length: m, marked: !skipMarking)
            remaining &-= written
        }
        return remaining > 0
    }
}

/// Test-only: where and how the relay journals the ranges it marks (see `RelayJournal`).
struct JournalContext {
    let journal: any RelayJournal
    let view: GuestMemoryView
    let ring: Int
    let publishIndex: UInt16

    /// Journals one device-written range with a checksum of its bytes now.
    func record(gpa: UInt64, length: UInt64, marked: Bool) {
        var sum: UInt64 = 0xcbf2_9ce4_8422_2325
        if let p = view.hostPointer(gpa: gpa, length: length) {
            for k in 0..<Int(length) { sum = (sum ^ UInt64(p.load(fromByteOffset: k, as: UInt8.self))) &* 0x100_0000_01b3 }
        }
        journal.record(ring: ring, gpa: gpa, length: UInt32(length), checksum: sum, marked: marked, publishIndex: publishIndex)
    }
}
