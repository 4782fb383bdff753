import VhostUser
import Virtio

/// The SoftNIC's IOMMU: IOVA ranges mapped to host memory. The framework programs it from the
/// memory table (IOVA = guest-physical address, 1:1 onto the daemon's mappings); the relay will
/// add mediated rings in a reserved range above guest RAM. Every device access translates
/// through it; a miss is a device fault.
public final class IOMMUTable: @unchecked Sendable {
    // @unchecked Sendable: immutable after init; `entries` is only read. The mappings behind the
    // host pointers stay alive through `keepAlive` for as long as any engine holds this table.
    public struct Entry: Sendable {
        public var iova: UInt64
        public var size: UInt64
        // Safety: host addresses of live mappings (kept alive by the owning table).
        public var host: UInt
    }

    let entries: UnsafeMutableBufferPointer<Entry>
    private let keepAlive: [AnyObject]

    public init(memory: GuestMemoryTable, extra: [(iova: UInt64, size: UInt64, host: UnsafeMutableRawPointer, owner: AnyObject)] = []) {
        var list = memory.regions.map { Entry(iova: $0.guestPhysAddr, size: $0.size, host: UInt(bitPattern: $0.host)) }
        list += extra.map { Entry(iova: $0.iova, size: $0.size, host: UInt(bitPattern: $0.host)) }
        entries = .allocate(capacity: max(list.count, 1))
        _ = entries.initialize(from: list)
        keepAlive = [memory] + extra.map(\.owner)
        count = list.count
    }

    public let count: Int

    deinit { entries.deallocate() }

    public static let empty = IOMMUTable(memory: .empty)

    /// A non-owning view for the data path: plain values, so translating costs no reference
    /// counting. Valid while the table it came from is alive (the engine holds it).
    public var view: IOMMUView { IOMMUView(base: UnsafePointer(entries.baseAddress!), count: count) }
}

public struct IOMMUView: GuestMemoryAccess {
    // Safety: points into a live IOMMUTable's entry buffer; the engine keeps the table alive.
    @usableFromInline let base: UnsafePointer<IOMMUTable.Entry>
    @usableFromInline let count: Int

    @inlinable @inline(__always)
    public func hostPointer(gpa: UInt64, length: UInt64) -> UnsafeMutableRawPointer? {
        var i = 0
        while i < count {
            let e = base[i]
            if gpa >= e.iova {
                let off = gpa &- e.iova
                if off < e.size || (off == e.size && length == 0) {
                    guard length <= e.size &- off else { return nil }
                    return UnsafeMutableRawPointer(bitPattern: e.host &+ UInt(off))
                }
            }
            i &+= 1
        }
        return nil
    }
}
