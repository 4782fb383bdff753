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
