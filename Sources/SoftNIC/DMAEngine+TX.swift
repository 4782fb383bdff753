import Glibc
import Virtio

/// The DMA engine's TX path (guest → link): each chain's virtio-net header read and checked,
/// then the frame written to the tap straight from the guest's buffers (one writev, the header
/// passing through), or gathered into the device's frame buffer and handed with its header to
/// the wire or the loopback; the chain completed.
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
        var badHeaders: UInt64 = 0
        var done = 0
        var faultText: String?
        var resolutions = 0
        while done < n {
            let head = q.availHead(at: lastAvail)
            let chain: DescriptorChain
            do {
                chain = try r.walker.walk(head: head, queue: q, memory: view)
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
            let length = Int(truncatingIfNeeded: chain.readableBytes) - headerLength
            if length < 14 {
                runts &+= 1
            } else {
                let header = readTXHeader(chain)
                if (header.flags | header.gsoType) != 0 || header.hdrLen != 0,
                   SoftOffload.checkTX(header, length: length, features: features) != nil {
                    badHeaders &+= 1
                } else if length > (header.gsoType == VirtioNetHeader.gsoNone ? LinkSpec.maxFrame : LinkSpec.maxGSOFrame) {
                    tooLarge &+= 1
                } else {
                    if !consumes { transmit(chain, length: length, header: header, from: r) }
                    packets &+= 1
                    bytes &+= UInt64(length)
                }
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
        if badHeaders > 0 { r.stats.drop(.badHeader, badHeaders) }
        if done > 0 { link.notifyPeer() }
        // Loopback frames went to the paired RX ring: publish them with this batch.
        if link.kind == .loopback { flush(rings[r.index - 1]) }
        if let faultText { fault(r, faultText) }
        return done
    }

    /// The chain's virtio-net header (its first `headerLength` readable bytes, which the caller
    /// made sure exist).
    @inline(__always)
    func readTXHeader(_ chain: DescriptorChain) -> VirtioNetHeader {
        let hl = headerLength
        let first = chain[0]
        if !first.isWritable && Int(first.length) >= hl { return VirtioNetHeader(from: first.host, size: hl) }
        // Spread over several buffers: collect it first.
        var raw: (UInt64, UInt64) = (0, 0)
        return withUnsafeMutableBytes(of: &raw) { b -> VirtioNetHeader in
            var got = 0
            var k = 0
            while k < chain.count && got < hl {
                let seg = chain[k]
                k &+= 1
                if seg.isWritable { continue }
                let n = min(hl - got, Int(seg.length))
                // Safety: got + n <= hl <= 16 bytes of raw; the segment has seg.length >= n translated bytes.
                (b.baseAddress! + got).copyMemory(from: seg.host, byteCount: n)
                got += n
            }
            return VirtioNetHeader(from: b.baseAddress!, size: hl)
        }
    }

    /// Copies the chain's readable bytes after the virtio-net header into the device buffer.
    /// Returns the frame length (the caller checked it fits the buffer).
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
            // Safety: out + len <= the chain's readable bytes - header <= maxGSOFrame < frameBufferSize (checked by the caller).
            (frameBuffer + out).copyMemory(from: src, byteCount: len)
            out += len
        }
        return out
    }

    /// Hands a TX frame to the link: to the tap straight from the chain's buffers (header
    /// included: the tap takes the same header), to the wire or the paired RX ring (loopback)
    /// gathered with its header.
    @inline(__always)
    func transmit(_ chain: DescriptorChain, length: Int, header given: VirtioNetHeader, from r: EngineRing) {
        // DATA_VALID means nothing on TX (virtio 1.2, 5.1.6.2): it must not reach a receiver
        // as "checksum validated". (The tap gets the guest's header as it is; the kernel ignores it there.)
        var header = given
        header.flags &= ~VirtioNetHeader.flagDataValid
        switch link.kind {
        case .sink, .source:
            break  // they consume TX frames; they are counted by the caller
        case .tap:
            // Not until the tap has the negotiated header size and offloads (a link coming up).
            if !tapReady || !sendToTap(chain, length: length, header: header) { r.stats.drop(.linkError) }
        case .loopback:
            let rx = rings[r.index - 1]
            guard rx.running else { rx.stats.drop(.noBuffer); return }
            let n = gather(chain)
            var h = header
            var resume = 0
            _ = deliverOffloaded(frameBuffer, length: n, header: &h, to: rx, countDrop: true, resume: &resume)
        case .wire:
            let n = gather(chain)
            if !link.send(frameBuffer, length: n, header: header, headerLength: headerLength) { r.stats.drop(.linkError) }
        }
    }

    /// Writes a TX chain to the tap with one writev over its readable buffers (virtio-net header
    /// and frame: the tap was given the guest's header size), or, for a chain of more buffers
    /// than the iovec list holds, gathered first.
    @inline(__always)
    func sendToTap(_ chain: DescriptorChain, length: Int, header: VirtioNetHeader) -> Bool {
        guard let tap = link.tap else { return false }
        guard link.zeroCopy else {
            let n = gather(chain)
            return link.send(frameBuffer, length: n, header: header, headerLength: headerLength)
        }
        var count = 0
        var k = 0
        while k < chain.count {
            let seg = chain[k]
            k &+= 1
            if seg.isWritable || seg.length == 0 { continue }
            if count == Self.txIOVCapacity {
                let n = gather(chain)
                return link.send(frameBuffer, length: n, header: header, headerLength: headerLength)
            }
            // Safety: count < txIOVCapacity entries of txIOV; the segment's bytes are translated guest memory.
            txIOV[count] = iovec(iov_base: seg.host, iov_len: Int(seg.length))
            count &+= 1
        }
        return tap.send(gathered: txIOV, count: count, length: headerLength + length)
    }
}
