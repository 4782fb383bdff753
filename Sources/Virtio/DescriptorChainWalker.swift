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

/// Walks split-ring descriptor chains out of hostile guest memory, for a device: each buffer is
/// translated and collected.
///
/// Built once per queue: it owns a segment buffer of `capacity` (the queue size) entries and
/// allocates nothing per walk. The walk's bounds are `ChainWalk`'s (head and next indices,
/// loops, chain length <= queue size, indirect rules, each descriptor copied out once); a device
/// adds its own: every buffer mapped, total length <= 2^32 - 1, no readable buffer after a
/// writable one.
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
        var segments = SegmentCollector(memory: memory, storage: storage)
        let walked = try ChainWalk.walk(head: head, table: table, queueSize: queueSize, indirectAllowed: indirectAllowed,
                                        tables: memory, visitor: &segments)
        return DescriptorChain(
            head: head, readableBytes: segments.readable, writableBytes: segments.writable,
            firstWritableIndex: segments.firstWritable < 0 ? walked.buffers : segments.firstWritable,
            usedIndirectTable: walked.usedIndirectTable,
            segments: UnsafeBufferPointer(start: storage, count: walked.buffers))
    }

    /// Walks the chain at `head` in `queue`'s descriptor table.
    @inlinable
    public mutating func walk<M: GuestMemoryAccess>(head: UInt16, queue: SplitQueue,
                                                    memory: M) throws(ChainError) -> DescriptorChain {
        try walk(head: head, table: queue.descriptorTable, queueSize: queue.size, memory: memory)
    }
}

/// The device's visitor: translates each buffer through guest memory, checks the device's rules
/// and stores the segment in the walker's buffer.
@usableFromInline
struct SegmentCollector<Memory: GuestMemoryAccess>: ChainVisitor {
    @usableFromInline let memory: Memory
    @usableFromInline let storage: UnsafeMutablePointer<ChainSegment>
    @usableFromInline var readable: UInt64 = 0
    @usableFromInline var writable: UInt64 = 0
    @usableFromInline var firstWritable = -1

    @inlinable
    init(memory: Memory, storage: UnsafeMutablePointer<ChainSegment>) {
        self.memory = memory
        self.storage = storage
    }

    @inlinable @inline(__always)
    mutating func visit(_ d: VirtqDescriptor, position: Int, index: UInt16) throws(ChainError) -> Bool {
        let isWritable = d.flags.contains(.write)
        if isWritable {
            if firstWritable < 0 { firstWritable = position }
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
        // Safety: position < queueSize <= capacity (the walk's chain-length bound), and ChainSegment is a trivial type.
        (storage + position).initialize(to: ChainSegment(gpa: d.addr, length: d.len, isWritable: isWritable, host: host))
        return true
    }
}
