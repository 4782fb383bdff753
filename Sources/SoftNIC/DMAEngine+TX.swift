import Virtio

/// The DMA engine's TX path (guest → link): each chain's readable bytes after the virtio-net
/// header gathered into the device's frame buffer and handed to the link, the chain completed.
extension DMAEngine {
    /// Serves up to one batch of TX chains: gathers each frame into the device buffer, hands it to
    /// the link, completes the chain. Returns the number of chains.
    func serviceTX(_ r: EngineRing) -> Int {
        guard var q = r.queue else { return 0 }
        // Ring state in locals for the loop: class property accesses cost exclusivity checks.
        var lastAvail = r.lastAvail
        var usedIdx = r.usedIdx
        let avail = q.loadAvailIndex()
        let pending = avail &- lastAvail
        if pending == 0 { return 0 }
        if pending > q.size {
            fault(r, "avail index jumped from \(lastAvail) to \(avail), more than the ring size \(q.size)")
            return 0
        }
        let n = min(Int(pending), Self.batch)
        let consumes = link.consumesTX
        var packets: UInt64 = 0
        var bytes: UInt64 = 0
        var runts: UInt64 = 0
        var tooLarge: UInt64 = 0
        var done = 0
        var faultText: String?
        var resolutions = 0
        while done < n {
            let head = q.availHead(at: lastAvail)
            let length: Int
            do {
                let chain = try r.walker.walk(head: head, queue: q, memory: view)
                length = gather(chain)
            } catch {
                if resolutions < Self.maxMissResolutions, let miss = error.unmappedRange, resolveMiss(miss) {
                    // The device's memory changed under this batch: go on with the ring as translated
                    // now, or stop if it faulted (its areas went away); the chain was not consumed.
                    resolutions &+= 1
                    guard r.running, let now = r.queue else {
                        r.lastAvail = lastAvail
                        r.usedIdx = usedIdx
                        return done
                    }
                    q = now
                    continue
                }
                faultText = "TX chain at avail index \(lastAvail) (head \(head)): \(error)"
                break
            }
            if length < 0 {
                tooLarge &+= 1
            } else if length < 14 {
                runts &+= 1
            } else {
                if !consumes { transmit(frameBuffer, length: length, from: r) }
                packets &+= 1
                bytes &+= UInt64(length)
            }
            q.writeUsedElement(at: usedIdx, id: UInt32(head), length: 0)
            usedIdx &+= 1
            lastAvail &+= 1
            done &+= 1
        }
        r.lastAvail = lastAvail
        r.usedIdx = usedIdx
        flush(r)
        r.stats.add(packets: packets, bytes: bytes)
        if runts > 0 { r.stats.drop(.runt, runts) }
        if tooLarge > 0 { r.stats.drop(.frameTooLarge, tooLarge) }
        if done > 0 { link.notifyPeer() }
        // Loopback frames went to the paired RX ring: publish them with this batch.
        if link.kind == .loopback { flush(rings[r.index - 1]) }
        if let faultText { fault(r, faultText) }
        return done
    }

    /// Copies the chain's readable bytes after the virtio-net header into the device buffer.
    /// Returns the frame length, or -1 when it does not fit.
    @inline(__always)
    func gather(_ chain: DescriptorChain) -> Int {
        var skip = headerLength
        var out = 0
        var k = 0
        while k < chain.count {
            let seg = chain[k]
            k &+= 1
            if seg.isWritable { continue }
            var src = UnsafeRawPointer(seg.host)
            var len = Int(seg.length)
            if skip > 0 {
                let s = min(skip, len)
                skip -= s
                src += s
                len -= s
            }
            if len == 0 { continue }
            if out + len > LinkSpec.maxFrame { return -1 }
            // Safety: out + len <= maxFrame < frameBufferSize; src has len bytes of a translated segment.
            (frameBuffer + out).copyMemory(from: src, byteCount: len)
            out += len
        }
        return out
    }

    /// Hands a TX frame to the link (or, for loopback, to the paired RX ring).
    @inline(__always)
    func transmit(_ frame: UnsafeMutableRawPointer, length: Int, from r: EngineRing) {
        switch link.kind {
        case .sink, .source:
            break  // they consume TX frames; they are counted by the caller
        case .loopback:
            let rx = rings[r.index - 1]
            if rx.running {
                deliver(UnsafeRawPointer(frame), length: length, to: rx)
            } else {
                rx.stats.drop(.noBuffer)
            }
        case .tap, .wire:
            if !link.send(frame, length: length) { r.stats.drop(.linkError) }
        }
    }
}
