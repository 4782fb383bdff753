import Virtio

/// Where an RX ring stands for the writer: the next avail entry to use, the used index written so
/// far (entries past the published index are not visible yet), and avail.idx as last loaded (RX
/// fills several frames per load).
struct RXPosition: Equatable {
    var lastAvail: UInt16
    var usedIdx: UInt16
    var availCache: UInt16
}

/// What became of a frame the ring could take.
enum RXOutcome: Equatable {
    /// Written into `chains` chains (1, or more with MRG_RXBUF); their used entries are written
    /// but not published.
    case written(chains: UInt16)
    /// Not written, nothing consumed: no buffer posted, or the posted ones too small.
    case dropped(DropReason)
}

/// A chain the device cannot use (the walker's error, or avail.idx out of range): the ring must
/// fault. Nothing was consumed. (An error rather than an outcome: a payload that needs releasing
/// would cost the hot path a call per frame.)
struct RXFault: Error, Equatable {
    let text: String
    /// The range that missed the IOMMU, when that is why (the engine may map it and retry).
    var unmapped: IOVARange? = nil
}

/// Writes frames (virtio-net header, as given: zero, or the offloads the guest takes + bytes) into a device's RX ring through guest memory, one
/// at a time, merging chains when MRG_RXBUF was negotiated. It checks that the frame fits in the
/// posted buffers before writing any byte, so no buffer is written and then left unused (while a
/// migration runs, such bytes would be written but never marked). It neither publishes the used
/// index nor raises interrupts (the engine's `flush` does, once per batch), and needs no thread:
/// tests drive it over plain memory (RXWriterTests).
struct RXWriter<Memory: GuestMemoryAccess> {
    let queue: SplitQueue
    /// Where the chains' buffers translate (the device's guest view).
    let memory: Memory
    /// 12 with VERSION_1 or MRG_RXBUF, 10 otherwise.
    let headerLength: Int
    let mergeable: Bool
    /// The IOMMU's dirty bits while tracking is on: every byte written is marked after it is
    /// written (DMAEngine+Dirty.swift).
    var dirty: IOMMUDirtyBitmap? = nil

    /// Writes one frame at `position`. On `.written` the position has moved past the chains and
    /// used entries it took; otherwise (or when it throws) only `availCache` may have changed. Inlined into the
    /// engine's `deliver`, so the writer and the outcome cost nothing per frame there.
    @inline(__always)
    func write(_ frame: UnsafeRawPointer, length: Int, header: VirtioNetHeader = VirtioNetHeader(),
               walker: inout DescriptorChainWalker, at position: inout RXPosition) throws(RXFault) -> RXOutcome {
        let q = queue
        let hdr = headerLength
        let needed = hdr + length
        let start = position.lastAvail
        var problem: DropReason?
        var faultText: String?
        var unmapped: IOVARange?

        // First, make sure the frame fits in the buffers the guest posted. The common case, one
        // chain large enough, walks once.
        var chainsNeeded = 1
        if ensureAvailable(start, start, &position.availCache, &problem, &faultText) {
            do {
                let head = q.availHead(at: start)
                let first = try walker.walk(head: head, queue: q, memory: memory)
                if first.writableBytes >= UInt64(needed) {
                    // The common case: one chain holds the frame. Write it from this walk.
                    if writeSingle(first, head: head, frame: frame, length: length, header: header, usedIdx: position.usedIdx) {
                        position.usedIdx &+= 1
                        position.lastAvail &+= 1
                        return .written(chains: 1)
                    }
                }
                if first.writableBytes < UInt64(needed) {
                    if !mergeable {
                        problem = .bufferTooSmall
                    } else {
                        var room = first.writableBytes
                        var idx = start &+ 1
                        while room < UInt64(needed) {
                            guard ensureAvailable(idx, start, &position.availCache, &problem, &faultText) else { break }
                            let c = try walker.walk(head: q.availHead(at: idx), queue: q, memory: memory)
                            if c.writableBytes == 0 { problem = .bufferTooSmall; break }
                            room += c.writableBytes
                            idx &+= 1
                            chainsNeeded += 1
                        }
                    }
                }
            } catch {
                faultText = "RX chain at avail index \(start): \(error)"
                unmapped = error.unmappedRange
            }
        }

        var idx = start
        var used = position.usedIdx
        var written = 0
        var buffers: UInt16 = 0
        var numBuffersAt: UnsafeMutableRawPointer?
        var numBuffersGPA: UInt64 = 0
        if faultText == nil && problem == nil {
            while buffers < UInt16(chainsNeeded) && written < needed {
                let head = q.availHead(at: idx)
                var chainWritten = 0
                do {
                    let chain = try walker.walk(head: head, queue: q, memory: memory)
                    // Index loop: generic iteration allocates in unoptimised builds.
                    var k = 0
                    while k < chain.count {
                        let seg = chain[k]
                        k &+= 1
                        if !seg.isWritable { continue }
                        var dst = seg.host
                        var room = Int(seg.length)
                        if buffers == 0 && chainWritten == 0 {
                            // The header goes whole into the first writable buffer.
                            guard room >= hdr else { break }
                            // Safety: hdr <= room = seg.length bytes mapped at seg.host (the walker translated them).
                            header.write(to: dst, size: hdr)
                            numBuffersAt = dst + 10
                            numBuffersGPA = seg.gpa &+ 10
                            dst += hdr
                            room -= hdr
                            chainWritten = hdr
                            written = hdr
                        }
                        let n = min(room, needed - written)
                        if n > 0 {
                            // Safety: n <= room, the bytes left of the translated segment at dst; the frame has needed - hdr bytes.
                            dst.copyMemory(from: frame + (written - hdr), byteCount: n)
                            written += n
                            chainWritten += n
                        }
                        if written == needed { break }
                    }
                    if let d = dirty { markWritten(chain, bytes: chainWritten, in: d) }
                } catch {
                    faultText = "RX chain at avail index \(idx) (head \(head)): \(error)"
                    unmapped = error.unmappedRange
                    break
                }
                if chainWritten == 0 {
                    problem = .bufferTooSmall
                    break
                }
                q.writeUsedElement(at: used, id: UInt32(head), length: UInt32(chainWritten))
                used &+= 1
                idx &+= 1
                buffers &+= 1
            }
            if problem == nil && faultText == nil && written < needed { problem = .bufferTooSmall }
        }
        if let faultText { throw RXFault(text: faultText, unmapped: unmapped) }
        if let problem { return .dropped(problem) }  // used entries written past usedIdx stay unpublished
        // num_buffers exists in the 12-byte header (VERSION_1 or MRG_RXBUF); it is 1 without MRG_RXBUF.
        // Safety: numBuffersAt + 2 <= the header's 12 bytes, written above into a translated segment.
        if hdr == 12, let p = numBuffersAt {
            p.storeBytes(of: buffers.littleEndian, as: UInt16.self)
            dirty?.mark(iova: numBuffersGPA, length: 2)
        }
        position.lastAvail = idx
        position.usedIdx = used
        return .written(chains: buffers)
    }

    /// Makes sure avail entry `idx` exists, reloading avail.idx when needed. (A method with inout
    /// parameters rather than a nested function: captured variables would be boxed on the heap in
    /// unoptimised builds.)
    @inline(__always)
    func ensureAvailable(_ idx: UInt16, _ start: UInt16, _ availCache: inout UInt16,
                         _ problem: inout DropReason?, _ faultText: inout String?) -> Bool {
        if idx != availCache { return true }
        let a = queue.loadAvailIndex()
        if a &- start > queue.size {
            faultText = "avail index jumped from \(start) to \(a), more than the ring size \(queue.size)"
            return false
        }
        availCache = a
        if idx == a {
            // Every entry of the ring is posted and the frame still does not fit: it never will
            // (buffers too small), so it must not wait for more.
            problem = a &- start == queue.size ? .bufferTooSmall : .noBuffer
            return false
        }
        return true
    }

    /// Writes a frame that fits in one chain (already walked) and its used entry at `usedIdx`.
    /// Returns false, having written nothing, when the chain's first writable buffer cannot hold
    /// the header (the caller then takes the general path).
    @inline(__always)
    func writeSingle(_ chain: DescriptorChain, head: UInt16, frame: UnsafeRawPointer, length: Int, header: VirtioNetHeader,
                     usedIdx: UInt16) -> Bool {
        let hdr = headerLength
        var k = chain.firstWritableIndex
        guard k < chain.count, Int(chain[k].length) >= hdr else { return false }
        let first = chain[k].host
        // Safety: hdr <= chain[k].length bytes mapped at chain[k].host (checked above; the walker translated them).
        header.write(to: first, size: hdr)
        // num_buffers = 1 (it exists in the 12-byte header).
        // Safety: bytes 10..<12 of the header just written.
        if hdr == 12 { first.storeBytes(of: UInt16(1).littleEndian, toByteOffset: 10, as: UInt16.self) }
        var written = 0
        var dst = first + hdr
        var room = Int(chain[k].length) - hdr
        while true {
            let n = min(room, length - written)
            if n > 0 {
                // Safety: n <= room, the bytes left of the translated segment at dst; n <= the frame's bytes left.
                dst.copyMemory(from: frame + written, byteCount: n)
                written += n
            }
            k &+= 1
            if written == length || k >= chain.count { break }
            let seg = chain[k]
            if !seg.isWritable { continue }
            dst = seg.host
            room = Int(seg.length)
        }
        if let d = dirty { markWritten(chain, bytes: hdr + written, in: d) }
        queue.writeUsedElement(at: usedIdx, id: UInt32(head), length: UInt32(hdr + written))
        return true
    }
}
