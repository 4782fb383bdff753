// libFuzzer target for the split-ring descriptor chain walker (and the device-side ring
// accessors it is used with). Built by build.sh together with the Virtio sources it needs,
// compiled into one module (VirtioFuzz), so no SwiftPM module import is needed here.

#if canImport(Glibc)
import Glibc
#endif
//
// Input layout:
//   byte 0      queue size = 1 << (byte % 9)  (1...256, keeps each run short)
//   byte 1      bit 0: INDIRECT_DESC negotiated   bit 1: EVENT_IDX
//               bits 2-3: base gpa of guest memory (0, 0x1000, 2^64 - size, 0xFFFF_FFFF_0000_0000)
//               bit 4: take heads from the avail ring through SplitQueue instead of bytes 2-3
//               bit 5: guest memory has a second region, 64 GiB of zeros at gpa 2^40, so
//                      chains of many large buffers reach the 2^32 - 1 total-length check
//   bytes 2-3   head (little endian, may be out of range)
//   rest        guest memory: descriptor table at offset 0, avail ring and used ring after it
//               (split layout, zero-padded up to the layout's size); indirect tables and
//               buffers are wherever the descriptors say.
// The walker must reject or accept every input without crashing, and an accepted chain must
// satisfy the invariants checked in `checkChain`.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard size >= 4 else { return 0 }
    let queueSize = UInt16(1) << UInt16(data[0] % 9)
    let flags = data[1]
    let indirectAllowed = flags & 1 != 0
    let eventIdx = flags & 2 != 0
    let useAvailRing = flags & 16 != 0
    let head = UInt16(data[2]) | UInt16(data[3]) << 8

    let layout = SplitRingLayout(queueSize: queueSize)!
    let offsets = layout.contiguousOffsets()
    let guestBytes = UnsafeRawBufferPointer(start: data + 4, count: size - 4)
    let memorySize = max(guestBytes.count, offsets.totalBytes)
    let baseGPA: UInt64
    switch (flags >> 2) & 3 {
    case 0: baseGPA = 0
    case 1: baseGPA = 0x1000
    case 2: baseGPA = UInt64.max - UInt64(memorySize) + 1
    default: baseGPA = 0xFFFF_FFFF_0000_0000
    }
    let flat = FlatGuestMemory(copying: guestBytes, baseGPA: baseGPA, minimumSize: memorySize)
    var walker = DescriptorChainWalker(capacity: queueSize, indirectAllowed: indirectAllowed)

    if flags & 32 != 0 {
        walkHeads(&walker, head: head, table: flat.base, queueSize: queueSize, memory: TwoRegionMemory(flat: flat))
        return 0
    }
    let memory = flat
    if !useAvailRing {
        walkHeads(&walker, head: head, table: flat.base, queueSize: queueSize, memory: memory)
        return 0
    }

    // Device-side path: heads from the avail ring, completions into the used ring.
    guard let queue = try? SplitQueue(size: queueSize, descriptorTableGPA: baseGPA + UInt64(offsets.descriptorTable),
                                      availGPA: baseGPA + UInt64(offsets.avail), usedGPA: baseGPA + UInt64(offsets.used),
                                      memory: memory) else {
        fatalError("ring areas inside the padded memory must translate")
    }
    let availIndex = queue.loadAvailIndex()
    var lastAvail = head // the "last_avail_idx" a migration source handed over
    var usedIndex = queue.loadUsedIndex()
    let oldUsed = usedIndex
    var budget = Int(queueSize)
    while lastAvail != availIndex, budget > 0 {
        budget -= 1
        let h = queue.availHead(at: lastAvail)
        lastAvail &+= 1
        var written: UInt32 = 0
        if let chain = try? walker.walk(head: h, queue: queue, memory: memory) {
            checkChain(chain, memory: memory, queueSize: queueSize)
            written = UInt32(chain.writableBytes)
        }
        queue.writeUsedElement(at: usedIndex, id: UInt32(h), length: written)
        usedIndex &+= 1
    }
    queue.publishUsedIndex(usedIndex)
    _ = queue.needsInterrupt(oldUsed: oldUsed, newUsed: usedIndex, eventIdx: eventIdx)
    _ = queue.enableNotifications(eventIdx: eventIdx, lastAvailIndex: lastAvail)
    queue.disableNotifications(eventIdx: eventIdx)
    return 0
}

/// The flat buffer plus a second, real region of 64 GiB at gpa 2^40: an anonymous
/// MAP_NORESERVE mapping made once, read-only, so untouched pages read as zeros and cost no RSS.
/// Lets chains of many large buffers reach the 2^32 - 1 total-length check.
struct TwoRegionMemory: GuestMemoryAccess {
    static let start: UInt64 = 1 << 40
    static let size: UInt64 = 1 << 36
    // Safety: mapped once for the life of the process and never unmapped or written.
    nonisolated(unsafe) static let big: UnsafeMutableRawPointer = {
        guard let p = mmap(nil, Int(size), PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
              p != MAP_FAILED else { fatalError("mmap of the 64 GiB fuzz region failed") }
        return p
    }()
    let flat: FlatGuestMemory

    func hostPointer(gpa: UInt64, length: UInt64) -> UnsafeMutableRawPointer? {
        if let p = flat.hostPointer(gpa: gpa, length: length) { return p }
        guard let offset = GuestRange.offset(gpa: gpa, length: length, regionStart: Self.start, regionSize: Self.size)
        else { return nil }
        return Self.big + Int(offset)
    }
}

/// Walks `head`, then every head of the table (cheap, and more paths per input). Each chain the
/// device's walker accepts is walked again with the relay's settings (`ChainWalk` with indirect
/// tables always allowed and a visitor that records each buffer untranslated, as the relay's
/// marker sees it), which must accept it too and visit the same buffers: the device's visitor
/// (translation, its extra rules) leaves the walk the relay relies on unchanged. Both walks share
/// `ChainWalk`'s bounds, so this does not test those; the walker's own checks do.
func walkHeads<M: GuestMemoryAccess>(_ walker: inout DescriptorChainWalker, head: UInt16, table: UnsafeRawPointer,
                                     queueSize: UInt16, memory: M) {
    let seen = UnsafeMutablePointer<VirtqDescriptor>.allocate(capacity: Int(queueSize))
    defer { seen.deallocate() }
    for h in [head] + Array(0..<queueSize) {
        if let chain = try? walker.walk(head: h, table: table, queueSize: queueSize, memory: memory) {
            checkChain(chain, memory: memory, queueSize: queueSize)
            var recorder = Recorder(storage: seen, capacity: Int(queueSize))
            guard let walked = try? ChainWalk.walk(head: h, table: table, queueSize: queueSize,
                                                   indirectAllowed: true, tables: memory, visitor: &recorder)
            else { preconditionFailure("the untranslated walk rejected a chain the device's walker accepted") }
            precondition(walked.buffers == chain.count && walked.usedIndirectTable == chain.usedIndirectTable,
                         "the two walks disagree on the chain's shape")
            for (i, s) in chain.enumerated() {
                let d = seen[i]
                precondition(d.addr == s.gpa && d.len == s.length && d.flags.contains(.write) == s.isWritable,
                             "the two walks disagree on buffer \(i)")
            }
        }
    }
}

/// The relay's kind of visitor: records each buffer as the guest described it, translates nothing.
struct Recorder: ChainVisitor {
    let storage: UnsafeMutablePointer<VirtqDescriptor>
    let capacity: Int

    mutating func visit(_ d: VirtqDescriptor, position: Int, index: UInt16) -> Bool {
        precondition(position < capacity, "the walk visited more buffers than the queue size")
        // Safety: position < capacity, the storage's size (checked above).
        (storage + position).initialize(to: d)
        return true
    }
}

/// Invariants of an accepted chain; a violation is a crash the fuzzer reports.
func checkChain<M: GuestMemoryAccess>(_ chain: DescriptorChain, memory: M, queueSize: UInt16) {
    precondition(chain.count >= 1 && chain.count <= Int(queueSize), "segment count out of bounds")
    precondition(chain.totalBytes <= UInt64(UInt32.max), "total length over 2^32 - 1")
    var readable: UInt64 = 0
    var writable: UInt64 = 0
    for (i, s) in chain.enumerated() {
        precondition(s.isWritable == (i >= chain.firstWritableIndex), "readable segment after a writable one")
        if s.isWritable { writable += UInt64(s.length) } else { readable += UInt64(s.length) }
        precondition(memory.hostPointer(gpa: s.gpa, length: UInt64(s.length)) == s.host, "segment host pointer mismatch")
        if s.length > 0 {
            // Touch both ends so AddressSanitizer sees any out-of-bounds translation.
            _ = s.host.load(as: UInt8.self) &+ s.host.load(fromByteOffset: Int(s.length) - 1, as: UInt8.self)
        }
    }
    precondition(readable == chain.readableBytes && writable == chain.writableBytes, "totals disagree with segments")
}
