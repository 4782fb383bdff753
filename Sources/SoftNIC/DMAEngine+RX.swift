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
    func deliver(_ frame: UnsafeRawPointer, length: Int, to r: EngineRing, countDrop: Bool = true) -> Bool {
        var resolutions = 0
        var outcome: RXOutcome
        var position: RXPosition
        while true {
            guard let q = r.queue else { r.stats.drop(.noBuffer); return false }
            let writer = RXWriter(queue: q, memory: view, headerLength: headerLength, mergeable: mergeable)
            position = RXPosition(lastAvail: r.lastAvail, usedIdx: r.usedIdx, availCache: r.availCache)
            do throws(RXFault) {
                outcome = try writer.write(frame, length: length, walker: &r.walker, at: &position)
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
            return false
        }
    }

    /// Pulls frames from the link (source generator, tap, wire) into the RX rings.
    func serviceLinkInbound() -> Int {
        switch link.kind {
        case .source:
            return serviceSource()
        case .tap:
            guard let t = link.tap else { return 0 }
            var n = 0
            while n < Self.batch {
                let got: Int
                do throws(SystemError) {
                    guard let length = try t.receive(into: frameBuffer, capacity: Self.frameBufferSize), length > 0 else { break }
                    got = length
                } catch {
                    rings[0].stats.drop(.linkError)  // the tap failed (not merely empty): counted on RX queue 0
                    break
                }
                n += 1
                if got > LinkSpec.maxFrame { rings[0].stats.drop(.frameTooLarge); continue }
                // Like a NIC without RX descriptors: a frame that finds no running RX ring is dropped.
                guard let rx = nextRX() else { rings[0].stats.drop(.noBuffer); continue }
                deliver(UnsafeRawPointer(frameBuffer), length: got, to: rx)
            }
            return n
        case .wire:
            guard let w = link.wireIn else { return 0 }
            var n = 0
            while n < Self.batch, let (p, len) = w.peek() {
                guard let rx = nextRX() else {
                    w.pop()
                    rings[0].stats.drop(.noBuffer)  // no RX ring running: counted on RX queue 0
                    n += 1
                    continue
                }
                if !deliver(p, length: len, to: rx, countDrop: false) {
                    // No buffer: keep the frame until the guest posts more (the ring holds 4096).
                    break
                }
                w.pop()
                n += 1
            }
            return n
        case .sink, .loopback:
            return 0
        }
    }

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
