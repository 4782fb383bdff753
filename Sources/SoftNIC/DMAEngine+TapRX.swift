import Glibc
import Platform
import Virtio

/// The chains posted in an RX ring ahead of its next avail entry, walked once and kept as one
/// iovec list of their writable buffers, so a frame from the tap is read straight into the
/// guest's buffers (one readv, no device-buffer copy). Walked chains stay in the window across
/// frames; it is rebuilt when its start or the engine's translation generation
/// changes. Preallocated once; confined to the engine's thread.
final class RXWindow {
    static let maxIOV = 1024
    static let maxChains = 256
    /// The writable buffers of the window's chains, in order.
    let iov: UnsafeMutablePointer<iovec>
    /// The guest-physical address (IOVA) of each `iov` entry, for dirty tracking.
    let gpas: UnsafeMutablePointer<UInt64>
    /// Per chain: its head, the end of its buffers in `iov`, its writable bytes.
    let heads: UnsafeMutablePointer<UInt16>
    let iovEnd: UnsafeMutablePointer<Int>
    let room: UnsafeMutablePointer<Int>
    /// The avail index of the first chain.
    var start: UInt16 = 0
    /// The translation generation it was built in (never: no generation matches it).
    var generation: UInt64 = .max
    var chains = 0
    var iovCount = 0
    /// Writable bytes of all chains.
    var bytes = 0

    init() {
        iov = .allocate(capacity: Self.maxIOV)
        gpas = .allocate(capacity: Self.maxIOV)
        heads = .allocate(capacity: Self.maxChains)
        iovEnd = .allocate(capacity: Self.maxChains)
        room = .allocate(capacity: Self.maxChains)
    }

    deinit {
        iov.deallocate()
        gpas.deallocate()
        heads.deallocate()
        iovEnd.deallocate()
        room.deallocate()
    }

    func reset(start: UInt16, generation: UInt64) {
        self.start = start
        self.generation = generation
        chains = 0
        iovCount = 0
        bytes = 0
    }


    /// Drops the first `k` chains (used by a frame); the rest move to the front.
    func consume(_ k: Int) {
        guard k < chains else {
            start &+= UInt16(truncatingIfNeeded: chains)
            chains = 0
            iovCount = 0
            bytes = 0
            return
        }
        let firstIOV = iovEnd[k - 1]
        var dropped = 0
        for i in 0..<k { dropped += room[i] }
        // Safety: the moved ranges lie inside the arrays' initialised prefixes (chains, iovCount entries).
        iov.update(from: iov + firstIOV, count: iovCount - firstIOV)
        gpas.update(from: gpas + firstIOV, count: iovCount - firstIOV)
        heads.update(from: heads + k, count: chains - k)
        room.update(from: room + k, count: chains - k)
        for i in 0..<(chains - k) { iovEnd[i] = iovEnd[i + k] - firstIOV }
        chains -= k
        iovCount -= firstIOV
        bytes -= dropped
        start &+= UInt16(truncatingIfNeeded: k)
    }
}

extension DMAEngine {
    /// The largest frame the tap hands over: a GSO frame when the guest takes segmentation
    /// offloads, else the largest frame the device carries.
    var tapMaxFrame: Int {
        features & VirtioNetFeature.guestCsum != 0
            && features & (VirtioNetFeature.guestTSO4 | VirtioNetFeature.guestTSO6 | VirtioNetFeature.guestUFO) != 0
            ? LinkSpec.maxGSOFrame : LinkSpec.maxFrame
    }

    /// Frames from the tap into the RX rings: read straight into the guest's buffers when the
    /// posted chains can hold the largest frame the tap may hand over (`RXWindow`), otherwise
    /// read into the device's buffer and written by `RXWriter` (which drops a frame that does
    /// not fit). Either way the virtio-net header comes from the kernel, which was told which
    /// offloads the guest takes.
    func serviceTapInbound() -> Int {
        guard let tap = link.tap else { return 0 }
        var n = 0
        while n < Self.batch {
            // Like a NIC without RX descriptors: a frame that finds no running RX ring (or a tap
            // not yet set to the negotiated header size and offloads) is dropped.
            guard tapReady, let rx = nextRX() else {
                guard let got = readTapCopy(tap) else { break }
                if got >= 0 { rings[0].stats.drop(.noBuffer) }
                n += 1
                continue
            }
            let hdr = headerLength
            // One byte beyond the largest frame: the kernel cuts a longer frame to the window and
            // says so only by filling it, so a read that reaches past the largest frame was cut.
            if link.zeroCopy && fillWindow(rx, need: hdr + tapMaxFrame + 1) {
                let got: Int
                do throws(SystemError) {
                    guard let w = rx.rxWindow, let g = try tap.receive(scattered: w.iov, count: w.iovCount) else { break }
                    got = g
                } catch {
                    rings[0].stats.drop(.linkError)  // the tap failed (not merely empty): counted on RX queue 0
                    break
                }
                n += 1
                commitWindow(rx, got: got)
                continue
            }
            guard let got = readTapCopy(tap) else { break }
            n += 1
            guard got >= 0 else { continue }
            var h = VirtioNetHeader(from: frameBuffer, size: hdr)
            var resume = 0
            _ = deliverOffloaded(frameBuffer + hdr, length: got - hdr, header: &h, to: rx, countDrop: true, resume: &resume)
        }
        return n
    }

    /// Reads one frame (with its header) into the device's buffer. Returns its length with the
    /// header, -1 when it was dropped (counted), nil when none is waiting or the tap failed.
    @inline(__always)
    func readTapCopy(_ tap: TapDevice) -> Int? {
        let got: Int
        do throws(SystemError) {
            guard let g = try tap.receive(into: frameBuffer, capacity: Self.frameBufferSize) else { return nil }
            got = g
        } catch {
            rings[0].stats.drop(.linkError)  // the tap failed (not merely empty): counted on RX queue 0
            return nil
        }
        if got - headerLength > LinkSpec.maxGSOFrame { rings[0].stats.drop(.frameTooLarge); return -1 }
        if got < headerLength + 14 { rings[0].stats.drop(.runt); return -1 }
        return got
    }

    /// Makes the window over `rx`'s posted chains hold at least `need` bytes. False when the
    /// posted chains cannot (too few posted, more buffers than the window holds, a first buffer
    /// smaller than the header, or a chain the walker refuses: the copy path then deals with it,
    /// faults included).
    func fillWindow(_ rx: EngineRing, need: Int) -> Bool {
        guard let q = rx.queue else { return false }
        // Each RX ring has a window of its own (made at its first tap frame): frames go round-robin
        // over the rings, and a window shared between them would be rebuilt at every frame.
        let w: RXWindow
        if let existing = rx.rxWindow { w = existing } else { w = RXWindow(); rx.rxWindow = w }
        if w.generation != translationGeneration || w.start != rx.lastAvail {
            w.reset(start: rx.lastAvail, generation: translationGeneration)
        }
        while w.bytes < need {
            if !mergeable && w.chains >= 1 { return false }
            if w.chains == RXWindow.maxChains { return false }
            let idx = w.start &+ UInt16(truncatingIfNeeded: w.chains)
            if idx == rx.availCache {
                let a = q.loadAvailIndex()
                // An index out of range is the copy path's to fault on.
                if a &- rx.lastAvail > q.size { return false }
                rx.availCache = a
                if idx == a { return false }
            }
            let head = q.availHead(at: idx)
            let chain: DescriptorChain
            do { chain = try rx.walker.walk(head: head, queue: q, memory: view) } catch { return false }
            var k = chain.firstWritableIndex
            if chain.writableBytes == 0 { return false }
            var count = w.iovCount
            while k < chain.count {
                let seg = chain[k]
                k &+= 1
                if !seg.isWritable || seg.length == 0 { continue }
                if count == RXWindow.maxIOV { return false }
                // Safety: count < maxIOV entries of the window's list; the buffer is translated guest memory.
                w.iov[count] = iovec(iov_base: seg.host, iov_len: Int(seg.length))
                w.gpas[count] = seg.gpa
                count &+= 1
            }
            w.heads[w.chains] = head
            w.iovEnd[w.chains] = count
            w.room[w.chains] = Int(truncatingIfNeeded: chain.writableBytes)
            w.bytes &+= Int(truncatingIfNeeded: chain.writableBytes)
            w.iovCount = count
            w.chains &+= 1
        }
        // The header and num_buffers go in the first buffer: whichever chain is first now (after
        // frames used the ones before it) must hold them whole, or the copy path takes the frame.
        return w.iov[0].iov_len >= headerLength
    }

    /// A frame of `got` bytes (header included) was read into the window: its chains are used,
    /// in order, each as far as the frame reached; the header's num_buffers says how many.
    func commitWindow(_ rx: EngineRing, got: Int) {
        guard let w = rx.rxWindow else { return }
        let hdr = headerLength
        guard let q = rx.queue else { return }  // (a stopped ring bumped the generation: the window is rebuilt)
        // The tap wrote these bytes into the guest's buffers, whatever becomes of the frame.
        if dirty != nil { markWindow(w, bytes: min(got, w.bytes)) }
        if got > hdr + tapMaxFrame || got < hdr + 14 {
            // Longer than the largest frame (the tap's MTU set above it; the kernel cut it to the
            // window), or a runt: dropped, nothing used. The bytes the kernel wrote stay in the
            // posted buffers, which the guest gets back only with later frames written over them.
            rx.stats.drop(got < hdr + 14 ? .runt : .frameTooLarge)
            return
        }
        let first = w.iov[0].iov_base!
        // Safety: the first buffer holds at least the header (fillWindow checked it).
        let h = VirtioNetHeader(from: first, size: hdr)
        if (h.flags & ~VirtioNetHeader.flagDataValid) != 0 || h.gsoType != VirtioNetHeader.gsoNone, !guestTakes(h) {
            // Offloads the guest does not take (frames the tap queued before the guest's offloads
            // changed): copy it out and deliver it through the software path, which writes these
            // same chains again, this time checked and used.
            var out = 0
            var i = 0
            while out < got {
                let n = min(w.iov[i].iov_len, got - out)
                // Safety: out + n <= got <= hdr + maxGSOFrame < frameBufferSize; the iov entry has iov_len >= n bytes.
                (frameBuffer + out).copyMemory(from: w.iov[i].iov_base!, byteCount: n)
                out += n
                i += 1
            }
            var copy = h
            var resume = 0
            _ = deliverOffloaded(frameBuffer + hdr, length: got - hdr, header: &copy, to: rx, countDrop: true, resume: &resume)
            return
        }
        var left = got
        var used = rx.usedIdx
        var k = 0
        while left > 0 {
            let c = min(left, w.room[k])
            q.writeUsedElement(at: used, id: UInt32(w.heads[k]), length: UInt32(c))
            used &+= 1
            left -= c
            k += 1
        }
        // Safety: the first buffer holds the header (fillWindow checked it is at least hdr bytes).
        if features & VirtioNetFeature.guestCsum == 0 {
            // DATA_VALID is for guests with GUEST_CSUM; without it the kernel sends no other flag.
            first.storeBytes(of: UInt8(0), as: UInt8.self)
        }
        if hdr == VirtioNetHeader.fullSize {
            first.storeBytes(of: UInt16(k).littleEndian, toByteOffset: 10, as: UInt16.self)
        }
        // The header fix-ups above, after the bytes they changed.
        dirty?.mark(iova: w.gpas[0], length: UInt64(hdr))
        rx.lastAvail &+= UInt16(truncatingIfNeeded: k)
        rx.usedIdx = used
        rx.pendingPackets &+= 1
        rx.pendingBytes &+= UInt64(got - hdr)
        rx.stats.tapDirect.wrappingAdd(1, ordering: .relaxed)
        w.consume(k)
    }
}
