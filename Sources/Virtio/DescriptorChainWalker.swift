/// One buffer of a validated chain: its guest range and where it is in host memory.
public struct ChainSegment: Equatable {
    public var gpa: UInt64
    public var length: UInt32
    public var isWritable: Bool
    /// Host address of `gpa`; `length` bytes there are mapped.
    public var host: UnsafeMutableRawPointer

    @inlinable
    public init(gpa: UInt64, length: UInt32, isWritable: Bool, host: UnsafeMutableRawPointer) {
        self.gpa = gpa
        self.length = length
        self.isWritable = isWritable
        self.host = host
    }
}

/// A validated chain: the walker's segment buffer plus totals. Device-readable segments come
/// first (`0..<firstWritableIndex`), then device-writable ones.
///
/// A view, not a copy: valid until the same walker walks again or goes away. Do not store it.
public struct DescriptorChain: RandomAccessCollection {
    public let head: UInt16
    /// Sum of readable segment lengths (with `writableBytes`, at most 2^32 - 1).
    public let readableBytes: UInt64
    public let writableBytes: UInt64
    /// Index of the first writable segment (`count` if none).
    public let firstWritableIndex: Int
    /// Whether the chain went through an indirect table.
    public let usedIndirectTable: Bool
    @usableFromInline let segments: UnsafeBufferPointer<ChainSegment>

    @inlinable
    init(head: UInt16, readableBytes: UInt64, writableBytes: UInt64, firstWritableIndex: Int,
         usedIndirectTable: Bool, segments: UnsafeBufferPointer<ChainSegment>) {
        self.head = head
        self.readableBytes = readableBytes
        self.writableBytes = writableBytes
        self.firstWritableIndex = firstWritableIndex
        self.usedIndirectTable = usedIndirectTable
        self.segments = segments
    }

    public var totalBytes: UInt64 { readableBytes + writableBytes }
    @inlinable public var startIndex: Int { 0 }
    @inlinable public var endIndex: Int { segments.count }
    // Safety: segments points at `count` initialised elements of the walker's buffer, alive until its next walk (documented contract).
    @inlinable public subscript(position: Int) -> ChainSegment { segments[position] }
}

/// Walks split-ring descriptor chains out of hostile guest memory.
///
/// Built once per queue: it owns a segment buffer of `capacity` (the queue size) entries and
/// allocates nothing per walk. Each descriptor is copied out of guest memory once into a local
/// and validated from the copy: head and next indices, loops (TTL = queue size for the ring's
/// table, entry count for an indirect table), chain length <= queue size, indirect rules
/// (negotiated, not nested, not with NEXT, len a non-zero multiple of 16, table mapped),
/// every buffer mapped, total length <= 2^32 - 1, no readable buffer after a writable one.
public struct DescriptorChainWalker: ~Copyable {
    public let capacity: Int
    /// Whether VIRTIO_F_INDIRECT_DESC was negotiated.
    public let indirectAllowed: Bool
    @usableFromInline let storage: UnsafeMutablePointer<ChainSegment>

    /// `capacity` is the queue size (1...32768).
    public init(capacity: UInt16, indirectAllowed: Bool) {
        precondition(capacity >= 1 && capacity <= SplitRingLayout.maxQueueSize, "capacity must be 1...32768")
        self.capacity = Int(capacity)
        self.indirectAllowed = indirectAllowed
        // Safety: owned by this ~Copyable walker, freed once in deinit; chains view it until the next walk.
        storage = .allocate(capacity: Int(capacity))
    }

    deinit {
        storage.deallocate()
    }

    /// Walks the chain starting at `head` in the descriptor table `table` (`queueSize` * 16
    /// bytes, mapped). The result is valid until the next call.
    @inlinable
    public mutating func walk<M: GuestMemoryAccess>(head: UInt16, table: UnsafeRawPointer, queueSize: UInt16,
                                                    memory: M) throws(ChainError) -> DescriptorChain {
        guard queueSize >= 1, Int(queueSize) <= capacity else { throw .invalidQueueSize(queueSize) }
        guard head < queueSize else { throw .headOutOfRange(head: head, queueSize: queueSize) }

        var currentTable = table
        var tableSize = UInt32(queueSize)
        var ttl = UInt32(queueSize)
        var index = head
        var inIndirect = false
        var count = 0
        var readable: UInt64 = 0
        var writable: UInt64 = 0
        var firstWritable = -1

        while true {
            guard ttl > 0 else { throw .loop(index: index, ttl: tableSize) }
            ttl -= 1
            // Safety: index < tableSize, and currentTable holds tableSize * 16 mapped bytes.
            let d = VirtqDescriptor(copyingFrom: currentTable + Int(index) * SplitRingLayout.descriptorSize)

            if d.flags.contains(.indirect) {
                guard !inIndirect else { throw .nestedIndirect(index: index) }
                guard indirectAllowed else { throw .indirectNotNegotiated(index: index) }
                guard !d.flags.contains(.next) else { throw .indirectWithNext(index: index) }
                guard d.len != 0, d.len % UInt32(SplitRingLayout.descriptorSize) == 0 else {
                    throw .indirectTableLength(d.len)
                }
                guard let host = memory.hostPointer(gpa: d.addr, length: UInt64(d.len)) else {
                    throw .indirectTableOutOfRange(gpa: d.addr, length: d.len)
                }
                currentTable = UnsafeRawPointer(host)
                tableSize = d.len / UInt32(SplitRingLayout.descriptorSize)
                ttl = tableSize
                index = 0
                inIndirect = true
                continue
            }

            guard count < Int(queueSize) else { throw .chainTooLong(limit: queueSize) }
            let isWritable = d.flags.contains(.write)
            if isWritable {
                if firstWritable < 0 { firstWritable = count }
            } else if firstWritable >= 0 {
                throw .readableAfterWritable(index: index)
            }
            guard let host = memory.hostPointer(gpa: d.addr, length: UInt64(d.len)) else {
                throw .bufferOutOfRange(gpa: d.addr, length: d.len)
            }
            if isWritable { writable += UInt64(d.len) } else { readable += UInt64(d.len) }
            guard readable + writable <= UInt64(UInt32.max) else {
                throw .totalLengthOverflow(readable + writable)
            }
            // Safety: count < queueSize <= capacity, and ChainSegment is a trivial type.
            (storage + count).initialize(to: ChainSegment(gpa: d.addr, length: d.len, isWritable: isWritable, host: host))
            count += 1

            guard d.flags.contains(.next) else { break }
            guard UInt32(d.next) < tableSize else { throw .nextOutOfRange(next: d.next, tableSize: tableSize) }
            index = d.next
        }

        return DescriptorChain(
            head: head, readableBytes: readable, writableBytes: writable,
            firstWritableIndex: firstWritable < 0 ? count : firstWritable, usedIndirectTable: inIndirect,
            segments: UnsafeBufferPointer(start: storage, count: count))
    }

    /// Walks the chain at `head` in `queue`'s descriptor table.
    @inlinable
    public mutating func walk<M: GuestMemoryAccess>(head: UInt16, queue: SplitQueue,
                                                    memory: M) throws(ChainError) -> DescriptorChain {
        try walk(head: head, table: queue.descriptorTable, queueSize: queue.size, memory: memory)
    }
}
