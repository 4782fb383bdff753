import DeviceFramework
import Virtio

/// Dirty tracking in the DMA engine: while it is on (`dirty` set, through
/// `SoftNIC.setDirtyTracking`), every write the device makes to guest memory sets the dirty bit
/// of its IOVA pages, after the bytes are written:
/// - RX buffers: the bytes `RXWriter` writes (header, frame, the num_buffers fix-up), the bytes
///   the tap wrote straight into a zero-copy window (`commitWindow`, dropped frames included:
///   the kernel wrote them) and their header fix-ups;
/// - used rings (RX and TX): the whole used area (flags, entries, idx, avail_event) at every
///   publish, at every change of the notification state, at start and at stop. Marking the whole
///   area rather than the entries written is a superset (a page marked that was not written is
///   only copied once more); it costs one or two atomic words per batch, and it covers the
///   entries a frame that did not fit wrote past the published index.
/// When tracking is off each of these is one predictable branch on `dirty`; nothing allocates.
extension DMAEngine {
    @inline(__always)
    func markUsedArea(_ r: EngineRing) {
        guard let d = dirty, let c = r.config else { return }
        d.mark(iova: c.usedGPA, length: UInt64(SplitRingLayout.usedRingBytes(queueSize: c.size)))
    }

    /// The first `bytes` bytes the tap wrote into `w`'s buffers.
    @inline(__always)
    func markWindow(_ w: RXWindow, bytes: Int) {
        guard let d = dirty else { return }
        var left = bytes
        var i = 0
        while left > 0 && i < w.iovCount {
            let n = min(left, w.iov[i].iov_len)
            // Safety: i < iovCount, the window's initialised entries.
            d.mark(iova: w.gpas[i], length: UInt64(n))
            left -= n
            i += 1
        }
    }
}

extension RXWriter {
    /// Marks the first `bytes` bytes of the chain's writable buffers (the order the writer fills
    /// them in), once they are written.
    @inline(__always)
    func markWritten(_ chain: DescriptorChain, bytes: Int, in d: IOMMUDirtyBitmap) {
        var left = bytes
        var k = chain.firstWritableIndex
        while left > 0 && k < chain.count {
            let seg = chain[k]
            k &+= 1
            if !seg.isWritable { continue }
            let n = min(left, Int(seg.length))
            d.mark(iova: seg.gpa, length: UInt64(n))
            left -= n
        }
    }
}

/// Test-only: the device's own journal of what it wrote while dirty tracking was on
/// (VDPAD_TEST_JOURNAL with `migration=iommu-dirty`, where no relay runs to journal; the format
/// is the relay's, see DeviceFramework's `DeviceWriteJournal`, and the QEMU migration oracle
/// checks it).
extension DMAEngine {
    /// Journals the RX completions [from, r.usedIdx) of `r` just before `flush` publishes them:
    /// for each used entry, the first `used.len` bytes of its chain's writable buffers, one line
    /// per buffer, with the checksum of the bytes as they are now (every write of the frame,
    /// num_buffers fix-up included, is done) and `publishIndex` = the used index this flush
    /// publishes. `marked` is 1: tracking is on (`dirty` is set for the whole batch, control
    /// operations run only between batches), and every RX write path sets the pages' dirty bits
    /// after writing them (`RXWriter.markWritten`, `markWindow`). It says the bit was set, not
    /// that it reached the frontend's log: a bit the folder drops (VDPAD_TEST_SKIP_DIRTY_FOLD) or
    /// a write the device forgot to mark shows as a journaled range whose bytes the destination
    /// lacks, which the oracle's RAM comparison finds. The chain is walked again as the relay
    /// walks it (`ChainWalk`, through the guest view); a chain that no longer walks is skipped
    /// (the device walked it moments ago, so only a guest breaking its own ring does that).
    func journalRX(_ r: EngineRing, _ q: SplitQueue, from old: UInt16) {
        guard let journal else { return }
        let reader = UsedRingReader(size: q.size, used: q.used)
        var i = old
        while i != r.usedIdx {
            let (id, length) = reader.element(at: i)
            i &+= 1
            guard length > 0, id < UInt32(q.size) else { continue }
            var v = JournalVisitor(journal: journal, view: view, ring: r.index, publishIndex: r.usedIdx, remaining: UInt64(length))
            _ = try? ChainWalk.walk(head: UInt16(id), table: q.descriptorTable, queueSize: q.size, indirectAllowed: true,
                                    tables: view, visitor: &v)
        }
    }
}

/// Journals the first `remaining` bytes of a completed chain's writable buffers.
struct JournalVisitor: ChainVisitor {
    let journal: any DeviceWriteJournal
    let view: GuestMemoryView
    let ring: Int
    let publishIndex: UInt16
    var remaining: UInt64

    mutating func visit(_ d: VirtqDescriptor, position: Int, index: UInt16) throws(ChainError) -> Bool {
        if d.flags.contains(.write) && d.len > 0 {
            let m = min(UInt64(d.len), remaining)
            var sum: UInt64 = 0xcbf2_9ce4_8422_2325
            if let p = view.hostPointer(gpa: d.addr, length: m) {
                for k in 0..<Int(m) { sum = (sum ^ UInt64(p.load(fromByteOffset: k, as: UInt8.self))) &* 0x100_0000_01b3 }
            }
            journal.record(ring: ring, gpa: d.addr, length: UInt32(m), checksum: sum, marked: true, publishIndex: publishIndex)
            remaining &-= m
        }
        return remaining > 0
    }
}
