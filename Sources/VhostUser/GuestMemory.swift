#if canImport(Glibc)
import Glibc
#endif
import Platform
import Synchronization
import Virtio

/// One region of guest memory the frontend shared with us: its fd, where it sits in
/// guest-physical and frontend-virtual space, and our mapping of it.
public final class MemoryRegion: @unchecked Sendable {
    // @unchecked Sendable: every field is immutable after init; the mapping is released once, in
    // deinit, when the last table holding this region goes away, so no thread can still use it.
    public let description: MemoryRegionDescription
    /// Host address of guest-physical `description.guestPhysAddr`.
    public let host: UnsafeMutableRawPointer
    private let fd: FileDescriptor
    private let mapping: MemoryMapping

    public var guestPhysAddr: UInt64 { description.guestPhysAddr }
    public var size: UInt64 { description.size }
    public var userAddr: UInt64 { description.userAddr }
    public var guestPhysEnd: UInt64 { description.guestPhysAddr &+ description.size }

    /// Maps `desc.size` bytes at `desc.mmapOffset` of `fd`. The mapping starts at offset 0 of the
    /// fd so that an offset that is not page aligned (DPDK sends such) still maps.
    public init(_ desc: MemoryRegionDescription, fd: consuming FileDescriptor) throws(VhostUserError) {
        let (end, overflow) = desc.mmapOffset.addingReportingOverflow(desc.size)
        guard !overflow, end <= UInt64(Int.max) else {
            throw VhostUserError(.semantics, "memory region", field: "mmap_offset+memory_size", "overflows")
        }
        var st = stat()
        var length = Int(end)
        if fstat(fd.raw, &st) == 0 {
            // hugetlbfs needs whole huge pages; st_blksize is the page size there.
            let align = max(Int(st.st_blksize), 4096)
            length = (length + align - 1) / align * align
        }
        let m: MemoryMapping
        do { m = try MemoryMapping(fd: fd, offset: 0, length: length) } catch {
            throw VhostUserError(.semantics, "memory region", field: "fd", "mmap of \(length) bytes failed: \(error)")
        }
        self.description = desc
        self.host = m.base + Int(desc.mmapOffset)
        self.mapping = m
        self.fd = fd
    }

    func contains(gpa: UInt64, length: UInt64) -> Bool {
        guard gpa >= guestPhysAddr else { return false }
        let off = gpa - guestPhysAddr
        return off <= size && length <= size - off
    }
}

/// An immutable snapshot of the memory table. Data-path threads hold one and
/// translate through it; a new table replaces it as a whole.
public final class GuestMemoryTable: @unchecked Sendable {
    // @unchecked Sendable: immutable after init; `flat` is written only in init and freed in deinit.
    public let regions: [MemoryRegion]
    private let flat: UnsafeMutableBufferPointer<GuestMemoryView.Region>

    public init(regions: [MemoryRegion]) {
        self.regions = regions.sorted { $0.guestPhysAddr < $1.guestPhysAddr }
        flat = .allocate(capacity: max(regions.count, 1))
        for (i, r) in self.regions.enumerated() {
            flat[i] = GuestMemoryView.Region(gpa: r.guestPhysAddr, size: r.size, host: UInt(bitPattern: r.host))
        }
    }

    deinit { flat.deallocate() }

    /// A plain-value view for data-path threads: translation without reference counting.
    /// Valid while this table is alive (the thread holds the table).
    public var view: GuestMemoryView { GuestMemoryView(base: UnsafePointer(flat.baseAddress!), count: regions.count) }

    public static let empty = GuestMemoryTable(regions: [])

    /// End of the highest region (guest-physical), 0 when empty.
    public var guestPhysEnd: UInt64 { regions.map(\.guestPhysEnd).max() ?? 0 }

    /// Host pointer for [gpa, gpa+length) when it lies wholly inside one region; nil otherwise.
    @inlinable
    public func hostPointer(gpa: UInt64, length: UInt64) -> UnsafeMutableRawPointer? {
        for r in regions where gpa >= r.guestPhysAddr {
            let off = gpa - r.guestPhysAddr
            if off < r.size || (off == r.size && length == 0) {
                guard length <= r.size - off else { return nil }
                return r.host + Int(off)
            }
        }
        return nil
    }

    /// Translates a frontend virtual address range to a guest-physical address (same region rule).
    public func guestPhysAddr(userAddr: UInt64, length: UInt64) -> UInt64? {
        for r in regions where userAddr >= r.userAddr {
            let off = userAddr - r.userAddr
            if off < r.size {
                guard length <= r.size - off else { return nil }
                return r.guestPhysAddr + off
            }
        }
        return nil
    }

    /// Host pointer for a frontend virtual address range.
    public func hostPointer(userAddr: UInt64, length: UInt64) -> UnsafeMutableRawPointer? {
        guard let gpa = guestPhysAddr(userAddr: userAddr, length: length) else { return nil }
        return hostPointer(gpa: gpa, length: length)
    }
}

/// See `GuestMemoryTable.view`.
public struct GuestMemoryView: GuestMemoryAccess {
    public struct Region: Sendable {
        public var gpa: UInt64
        public var size: UInt64
        /// Host address of `gpa` (a live mapping, kept alive by whoever owns the region buffer).
        public var host: UInt
        public init(gpa: UInt64, size: UInt64, host: UInt) { self.gpa = gpa; self.size = size; self.host = host }
    }
    // Safety: points into a live region buffer (a GuestMemoryTable's, or a device IOMMU table's);
    // holders keep that owner alive while they use the view.
    @usableFromInline let base: UnsafePointer<Region>
    @usableFromInline let count: Int

    public init(base: UnsafePointer<Region>, count: Int) {
        self.base = base
        self.count = count
    }

    @inlinable @inline(__always)
    public func hostPointer(gpa: UInt64, length: UInt64) -> UnsafeMutableRawPointer? {
        var i = 0
        while i < count {
            let r = base[i]
            if gpa >= r.gpa {
                let off = gpa &- r.gpa
                if off < r.size || (off == r.size && length == 0) {
                    guard length <= r.size &- off else { return nil }
                    return UnsafeMutableRawPointer(bitPattern: r.host &+ UInt(off))
                }
            }
            i &+= 1
        }
        return nil
    }
}

extension GuestMemoryTable: GuestMemoryAccess {}

/// The current memory table, replaced atomically. Readers on data-path threads check the
/// generation (one relaxed-cost atomic load per batch) and reload the table only when it moved.
public final class GuestMemoryHandle: Sendable {
    private let table: Mutex<GuestMemoryTable>
    private let generationCounter = Atomic<UInt64>(0)

    public init(_ initial: GuestMemoryTable = .empty) { table = Mutex(initial) }

    public var generation: UInt64 {
        // Acquire pairs with the release in `replace`: a reader that sees the new number
        // then takes the lock and sees the new table.
        generationCounter.load(ordering: .acquiring)
    }

    public func current() -> GuestMemoryTable { table.withLock { $0 } }

    public func replace(_ new: GuestMemoryTable) {
        table.withLock { $0 = new }
        generationCounter.wrappingAdd(1, ordering: .releasing)
    }
}
