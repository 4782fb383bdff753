/// Why a descriptor chain was rejected. Each case carries the offending value; the device
/// treats any of them as an error on that queue (e.g. `add_used(head, 0)`), never a crash.
public enum ChainError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The walk was asked for queue size 0 or one larger than the walker's capacity.
    case invalidQueueSize(UInt16)
    /// avail.ring gave a head index >= the queue size.
    case headOutOfRange(head: UInt16, queueSize: UInt16)
    /// A descriptor's `next` field points outside its table (queue size or indirect entry count).
    case nextOutOfRange(next: UInt16, tableSize: UInt32)
    /// More descriptors were followed than the table holds (TTL): the chain loops.
    case loop(index: UInt16, ttl: UInt32)
    /// The chain has more buffers than the queue size (possible through an indirect table).
    case chainTooLong(limit: UInt16)
    /// An INDIRECT descriptor inside an indirect table.
    case nestedIndirect(index: UInt16)
    /// A descriptor with both INDIRECT and NEXT in its flags.
    case indirectWithNext(index: UInt16)
    /// An indirect table whose `len` is zero or not a multiple of 16.
    case indirectTableLength(UInt32)
    /// An INDIRECT descriptor although VIRTIO_F_INDIRECT_DESC was not negotiated.
    case indirectNotNegotiated(index: UInt16)
    /// The buffers' lengths add up to more than 2^32 - 1 bytes.
    case totalLengthOverflow(UInt64)
    /// A buffer's `addr`/`len` range is not inside guest memory.
    case bufferOutOfRange(gpa: UInt64, length: UInt32)
    /// An indirect table's `addr`/`len` range is not inside guest memory.
    case indirectTableOutOfRange(gpa: UInt64, length: UInt32)
    /// A device-readable descriptor follows a device-writable one.
    case readableAfterWritable(index: UInt16)

    public var description: String {
        switch self {
        case .invalidQueueSize(let n):
            "queue size \(n) is zero or exceeds the walker's capacity"
        case .headOutOfRange(let head, let size):
            "avail ring head \(head) is out of range (queue size \(size))"
        case .nextOutOfRange(let next, let tableSize):
            "descriptor field next = \(next) is out of range (table has \(tableSize) entries)"
        case .loop(let index, let ttl):
            "descriptor chain loops: descriptor \(index) reached after \(ttl) descriptors (next fields form a cycle)"
        case .chainTooLong(let limit):
            "descriptor chain has more than \(limit) buffers (queue size)"
        case .nestedIndirect(let index):
            "descriptor \(index) in an indirect table has flags INDIRECT (nested indirect)"
        case .indirectWithNext(let index):
            "descriptor \(index) has flags INDIRECT and NEXT together"
        case .indirectTableLength(let len):
            "indirect descriptor field len = \(len) is zero or not a multiple of 16"
        case .indirectNotNegotiated(let index):
            "descriptor \(index) has flags INDIRECT but INDIRECT_DESC was not negotiated"
        case .totalLengthOverflow(let total):
            "descriptor chain field len sums to \(total) bytes, over 2^32 - 1"
        case .bufferOutOfRange(let gpa, let len):
            "descriptor fields addr = 0x\(String(gpa, radix: 16)), len = \(len) are outside guest memory"
        case .indirectTableOutOfRange(let gpa, let len):
            "indirect table fields addr = 0x\(String(gpa, radix: 16)), len = \(len) are outside guest memory"
        case .readableAfterWritable(let index):
            "descriptor \(index) is device-readable (flags without WRITE) after a writable one"
        }
    }
}
