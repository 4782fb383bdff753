/// What a walk does with each buffer of a chain: the device's walker translates and collects
/// them (`DescriptorChainWalker`), the relay marks the written ones in the dirty log without
/// translating them.
///
/// Take it as a generic parameter (specialised, no existential box), never as `any ChainVisitor`.
/// It may be non-copyable (the relay's holds a dirty-log batch).
public protocol ChainVisitor: ~Copyable {
    /// Called for each buffer descriptor (never for an INDIRECT one), in chain order, once the
    /// walk's bounds hold for it. `position` counts the chain's buffers from 0; `index` is the
    /// descriptor's index in its table. Returns false to end the walk after this buffer (the
    /// visitor has what it needs); a throw ends the walk with that error.
    mutating func visit(_ descriptor: VirtqDescriptor, position: Int, index: UInt16) throws(ChainError) -> Bool
}

/// The walk of a split-ring descriptor chain through hostile guest memory, with the bounds every
/// user of a chain keeps, whatever it does with the buffers:
/// - the head, and every `next`, inside its table (queue size, or an indirect table's entries);
/// - at most as many descriptors per table as it has entries (TTL: a chain that loops ends);
/// - at most queue-size buffers in the chain (possible to exceed through an indirect table);
/// - one level of indirection: an INDIRECT descriptor only where `indirectAllowed`, never inside
///   an indirect table, never with NEXT, its length a non-zero multiple of 16, the table mapped
///   (translated through `tables`).
/// Each descriptor is copied out of guest memory once and checked from the copy. Buffers
/// themselves are neither translated nor read here: that is the visitor's business.
public enum ChainWalk {
    /// Walks the chain at `head` in the descriptor table `table` (`queueSize` * 16 mapped bytes),
    /// calling `visitor` for each buffer. Returns the number of buffers visited and whether the
    /// chain went through an indirect table. Allocates nothing.
    @inlinable @inline(__always)
    public static func walk<Tables: GuestMemoryAccess, Visitor: ChainVisitor & ~Copyable>(
        head: UInt16, table: UnsafeRawPointer, queueSize: UInt16, indirectAllowed: Bool, tables: Tables,
        visitor: inout Visitor
    ) throws(ChainError) -> (buffers: Int, usedIndirectTable: Bool) {
        guard head < queueSize else { throw .headOutOfRange(head: head, queueSize: queueSize) }

        var currentTable = table
        var tableSize = UInt32(queueSize)
        var ttl = UInt32(queueSize)
        var index = head
        var inIndirect = false
        var count = 0

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
                guard let host = tables.hostPointer(gpa: d.addr, length: UInt64(d.len)) else {
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
            let more = try visitor.visit(d, position: count, index: index)
            count += 1

            guard more, d.flags.contains(.next) else { break }
            guard UInt32(d.next) < tableSize else { throw .nextOutOfRange(next: d.next, tableSize: tableSize) }
            index = d.next
        }
        return (count, inIndirect)
    }
}
