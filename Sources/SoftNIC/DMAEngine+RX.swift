import Platform
import Virtio

/// The DMA engine's RX path (link → guest): frames from the generator, the tap or the wire (and
/// loopback frames from TX) written into the RX rings by `RXWriter`, counted per ring.
extension DMAEngine {
    /// Writes one frame into ring `r` (see `RXWriter`); used entries are published by `flush`.
    /// Returns false (and counts a drop, or faults the ring) when it was not written; nothing is
    /// consumed then. `countDrop: false` leaves a want of buffers uncounted (the caller keeps the
    /// frame for later).
    @discardableResult
    func deliver(_ frame: UnsafeRawPointer, length: Int, header: VirtioNetHeader = VirtioNetHeader(), to r: EngineRing,
                 countDrop: Bool = true) -> Bool {
        var resolutions = 0
        var outcome: RXOutcome
        var position: RXPosition
        waitingForBuffers = false
        while true {
            guard let q = r.queue else { r.stats.drop(.noBuffer); return false }
            let writer = RXWriter(queue: q, memory: view, headerLength: headerLength, mergeable: mergeable, dirty: dirty)
            position = RXPosition(lastAvail: r.lastAvail, usedIdx: r.usedIdx, availCache: r.availCache)
            do throws(RXFault) {
                outcome = try writer.write(frame, length: length, header: header, walker: &r.walker, at: &position)
                break
            } catch {
                r.availCache = position.availCache
                // A miss is found while the frame is checked to fit, before any byte is written:
                // once the resolver mapped more, the frame is tried again with the new memory.
                if resolutions < Self.maxMissResolutions, let miss = error.unmapped, resolveMiss(miss) {
                    resolutions += 1
                    continue
                }
                fault(r, error.text)
                return false
            }
        }
        r.availCache = position.availCache
        switch outcome {
        case .written:
            r.lastAvail = position.lastAvail
            r.usedIdx = position.usedIdx
            r.pendingPackets &+= 1
            r.pendingBytes &+= UInt64(length)
            return true
        case .dropped(let reason):
            if reason != .noBuffer || countDrop { r.stats.drop(reason) }
            waitingForBuffers = reason == .noBuffer
            return false
        }
    }

    /// Pulls frames from the link (source generator, tap, wire) into the RX rings.
    func serviceLinkInbound() -> Int {
        switch link.kind {
        case .source:
            return serviceSource()
        case .tap:
            return serviceTapInbound()
        case .wire:
            guard let w = link.wireIn else { return 0 }
            var n = 0
            while n < Self.batch, let (p, len, hp) = w.peek() {
                guard let rx = nextRX() else {
                    w.pop()
                    wireResume = 0
                    rings[0].stats.drop(.noBuffer)  // no RX ring running: counted on RX queue 0
                    n += 1
                    continue
                }
                var h = VirtioNetHeader(from: hp, size: VirtioNetHeader.fullSize)
                let before = h
                let done = deliverOffloaded(p, length: len, header: &h, to: rx, countDrop: false, resume: &wireResume)
                // A checksum completed in the ring stays completed if the frame waits for buffers.
                if h != before { h.write(to: hp, size: VirtioNetHeader.fullSize) }
                if !done {
                    // No buffer: keep the frame until the guest posts more (the ring holds 4096 frames, 16 MiB).
                    break
                }
                w.pop()
                wireResume = 0
                n += 1
            }
            return n
        case .sink, .loopback:
            return 0
        }
    }

    /// Whether the guest takes a frame with this header as it is (its partial checksum, its
    /// segmentation): the GUEST_* offloads it negotiated.
    @inline(__always)
    func guestTakes(_ h: VirtioNetHeader) -> Bool {
        let gso = h.gsoType & ~VirtioNetHeader.gsoECN
        if gso == VirtioNetHeader.gsoNone {
            return h.flags & VirtioNetHeader.flagNeedsCsum == 0 || features & VirtioNetFeature.guestCsum != 0
        }
        let needed: UInt64 = switch gso {
        case VirtioNetHeader.gsoTCPv4: VirtioNetFeature.guestTSO4
        case VirtioNetHeader.gsoTCPv6: VirtioNetFeature.guestTSO6
        case VirtioNetHeader.gsoUDP: VirtioNetFeature.guestUFO
        default: 0
        }
        let ecn: UInt64 = h.gsoType & VirtioNetHeader.gsoECN != 0 ? VirtioNetFeature.guestECN : 0
        return needed != 0 && features & (needed | ecn | VirtioNetFeature.guestCsum) == needed | ecn | VirtioNetFeature.guestCsum
    }

    /// Delivers a frame from the wire or the loopback with the offloads its sender asked for:
    /// as it is when the guest takes them (`guestTakes`), otherwise with the work done here, as
    /// a NIC would: the partial checksum completed in place (`header` then says so), a large
    /// frame cut into segments, each delivered on its own. `resume` counts the segments of this
    /// frame already delivered: when a segment finds no buffer and `countDrop` is false, it is
    /// left there and false returned (the caller keeps the frame and calls again later).
    /// Returns true when the frame is done with (delivered, or dropped and counted).
    func deliverOffloaded(_ frame: UnsafeMutableRawPointer, length: Int, header: inout VirtioNetHeader, to rx: EngineRing,
                          countDrop: Bool, resume: inout Int) -> Bool {
        header.numBuffers = 0
        // DATA_VALID on TX means nothing (the sender's guest may set it): it never crosses.
        // DATA_VALID is for guests with GUEST_CSUM only.
        if features & VirtioNetFeature.guestCsum == 0 { header.flags &= ~VirtioNetHeader.flagDataValid }
        if header.flags == 0 && header.gsoType == VirtioNetHeader.gsoNone {
            return deliver(frame, length: length, to: rx, countDrop: countDrop) || !waits(countDrop)
        }
        if guestTakes(header) {
            return deliver(frame, length: length, header: header, to: rx, countDrop: countDrop) || !waits(countDrop)
        }
        if header.gsoType == VirtioNetHeader.gsoNone {
            // A partial checksum the guest does not take: complete it (once: the flag goes).
            let start = Int(header.csumStart)
            let offset = Int(header.csumOffset)
            guard SoftOffload.completeChecksum(frame, length: length, start: start, offset: offset, udp: offset == 6) else {
                rx.stats.drop(.badOffload)
                return true
            }
            header.flags &= ~VirtioNetHeader.flagNeedsCsum
            return deliver(frame, length: length, header: header, to: rx, countDrop: countDrop) || !waits(countDrop)
        }
        var segments: SoftSegmenter
        do throws(OffloadError) {
            segments = try SoftSegmenter(frame: frame, length: length, header: header)
        } catch {
            rx.stats.drop(.badOffload)
            resume = 0
            return true
        }
        segments.skip(resume)
        var index = resume
        while let n = segments.next(into: segmentBuffer, capacity: Self.frameBufferSize) {
            defer { index += 1 }
            if !deliver(segmentBuffer, length: n, to: rx, countDrop: countDrop) && waits(countDrop) {
                resume = index
                return false
            }
        }
        resume = 0
        return true
    }

    /// Whether a frame `deliver` just refused should wait for buffers: only when the caller keeps
    /// frames (`countDrop` false) and no buffer was posted. One that can never fit (buffers too
    /// small for it) or whose ring faulted was counted, and is done with: it must not hold the
    /// frames behind it.
    @inline(__always)
    func waits(_ countDrop: Bool) -> Bool { !countDrop && waitingForBuffers }

    /// The next running RX ring, round-robin.
    func nextRX() -> EngineRing? {
        let count = rings.count / 2
        for _ in 0..<count {
            let r = rings[2 * (rxRoundRobin % count)]
            rxRoundRobin &+= 1
            if r.running { return r }
        }
        return nil
    }

    /// The generator's frames that are due, into the running RX rings.
    func serviceSource() -> Int {
        let budget = link.generator.due(limit: Self.batch)
        if budget == 0 { return 0 }
        let count = activeRX.count
        if count == 0 { return 0 }
        if count == 1 {
            // One ring: hold it for the whole batch (no reference counting per frame).
            return source(into: activeRX[0], budget: budget)
        }
        // Several rings: round-robin per frame.
        var n = 0
        var misses = 0
        while n < budget && misses < count {
            // Read again for every frame: a ring that faults (or an IOMMU miss that made the
            // engine translate the rings again) leaves `activeRX` shorter than it was.
            let running = activeRX.count
            if running == 0 { break }
            let r = activeRX[link.generator.nextRing % running]
            link.generator.nextRing &+= 1
            if source(into: r, budget: 1) == 0 { misses += 1 } else { misses = 0 }
            n += 1
        }
        return n
    }

    /// Generates up to `budget` frames into one ring. Returns the frames generated (delivered,
    /// or dropped for want of a buffer at a set rate).
    @inline(__always)
    func source(into rx: EngineRing, budget: Int) -> Int {
        let size = link.generator.frameSize
        let rateLimited = link.generator.rate > 0
        var n = 0
        while n < budget {
            if deliver(link.generator.frame(), length: size, to: rx, countDrop: rateLimited) {
                link.generator.sequence &+= 1
            } else if !rateLimited {
                // As fast as the guest posts buffers: wait for more instead of dropping.
                return n
            } else {
                link.generator.sequence &+= 1  // the frame existed and was lost: the gap shows it
            }
            link.generator.sent &+= 1
            n += 1
        }
        return n
    }
}
