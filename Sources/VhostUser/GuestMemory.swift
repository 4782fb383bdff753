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
    private let mapping: GuardedFileMapping

    public var guestPhysAddr: UInt64 { description.guestPhysAddr }
    public var size: UInt64 { description.size }
    public var userAddr: UInt64 { description.userAddr }
    public var guestPhysEnd: UInt64 { description.guestPhysAddr &+ description.size }
    /// Bytes of address space the mapping takes (the region rounded out to whole pages).
    public var mappedBytes: Int { mapping.mappedBytes }
    /// SIGBUS faults absorbed in this region (the frontend shrank its file).
    public var faults: UInt64 { mapping.faults }

    /// Maps the pages of `fd` that hold `desc.size` bytes at `desc.mmapOffset` (an offset that is
    /// not page aligned, as DPDK sends, maps from the page below it). The file must be a regular
    /// file that long; `faultNotify` is signalled if it shrinks later (GuardedFileMapping).
    public init(_ desc: MemoryRegionDescription, fd: consuming FileDescriptor, faultNotify: SharedFD? = nil,
                request: String = "memory region") throws(VhostUserError) {
        let m: GuardedFileMapping
        do { m = try GuardedFileMapping(fd: fd, offset: desc.mmapOffset, length: desc.size, notify: faultNotify) } catch {
            throw VhostUserError(.semantics, request, field: "fd", "region at guest 0x\(String(desc.guestPhysAddr, radix: 16)) (mmap_offset \(desc.mmapOffset), size \(desc.size)): \(error)")
        }
        self.host = m.pointer
        self.mapping = m
        self.description = desc
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

    /// The regions as `view` translates through them (guest-physical address, size, host
    /// address), as values; the host addresses are valid while this table is alive.
    public var viewRegions: [GuestMemoryView.Region] { Array(flat.prefix(regions.count)) }

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
