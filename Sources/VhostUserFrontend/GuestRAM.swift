import Platform
import Synchronization
import VhostUser

/// One region of memfd-backed guest RAM, as QEMU's `memory-backend-memfd,share=on` provides it:
/// a guest-physical base, a size, and this process's mapping of it. The region's vhost-user
/// "user address" is the host pointer value of the mapping, as QEMU sends it.
///
/// Several regions may share one memfd at different offsets (`regions(sharingOneMemfd:)`),
/// which is how QEMU splits RAM around the PCI hole and makes `mmap_offset` non-zero.
public final class GuestRAM: @unchecked Sendable {
    // @unchecked Sendable: every stored property is immutable after init; the bytes behind the
    // mapping are shared with the backend process anyway, so users order their accesses through
    // the virtio protocol (acquire/release on ring indices), exactly as a real driver does.

    public static let pageSize: UInt64 = 4096

    /// First guest-physical address of the region.
    public let baseGPA: UInt64
    /// Size in bytes (a multiple of 4096).
    public let size: UInt64
    /// Offset of the region inside its memfd (the region's `mmap_offset`).
    public let mmapOffset: UInt64
    /// The name given to memfd_create (shows in /proc/PID/maps of both processes).
    public let name: String
    private let memfd: SharedFD
    private let mapping: MemoryMapping

    /// A fresh memfd of `size` bytes (zero-filled) mapped at guest-physical `baseGPA`.
    public convenience init(baseGPA: UInt64, size: UInt64, name: String = "guest-ram") throws(FrontendError) {
        try Self.validate(baseGPA: baseGPA, size: size)
        let fd: FileDescriptor
        do { fd = try makeMemfd(name: name, size: Int(size)) } catch { throw .system(error) }
        try self.init(memfd: SharedFD(fd), offset: 0, baseGPA: baseGPA, size: size, name: name)
    }

    private init(memfd: SharedFD, offset: UInt64, baseGPA: UInt64, size: UInt64, name: String) throws(FrontendError) {
        self.memfd = memfd
        self.mmapOffset = offset
        self.baseGPA = baseGPA
        self.size = size
        self.name = name
        do {
            mapping = try memfd.withFD { fd throws(SystemError) in try MemoryMapping(fd: fd, offset: offset, length: Int(size)) }
        } catch { throw .system(error) }
    }

    /// Several regions carved from one memfd, laid out back to back in the file in the order given
    /// (so the second region's `mmapOffset` is the first one's size, and so on).
    public static func regions(sharingOneMemfd layout: [(baseGPA: UInt64, size: UInt64)],
                               name: String = "guest-ram") throws(FrontendError) -> [GuestRAM] {
        var total: UInt64 = 0
        for r in layout {
            try validate(baseGPA: r.baseGPA, size: r.size)
            total += r.size
        }
        guard total > 0, total <= UInt64(Int.max) else { throw .invalidArgument("no regions, or too large") }
        let fd: FileDescriptor
        do { fd = try makeMemfd(name: name, size: Int(total)) } catch { throw .system(error) }
        let shared = SharedFD(fd)
        var out: [GuestRAM] = []
        var offset: UInt64 = 0
        for r in layout {
            out.append(try GuestRAM(memfd: shared, offset: offset, baseGPA: r.baseGPA, size: r.size, name: name))
            offset += r.size
        }
        return out
    }

    private static func validate(baseGPA: UInt64, size: UInt64) throws(FrontendError) {
        guard size > 0, size % pageSize == 0, size <= UInt64(Int.max) else {
            throw .invalidArgument("guest RAM size \(size) must be a non-zero multiple of 4096")
        }
        guard baseGPA % pageSize == 0 else {
            throw .invalidArgument("guest RAM base 0x\(String(baseGPA, radix: 16)) must be 4096-aligned")
        }
        guard baseGPA <= UInt64.max - size else { throw .invalidArgument("guest RAM region wraps the address space") }
    }

    /// The memfd (still owned here): pass it in SCM_RIGHTS.
    public var fd: Int32 { memfd.raw }
    /// The frontend's user address of the region: the host pointer value of our mapping.
    public var userAddress: UInt64 { UInt64(UInt(bitPattern: mapping.base)) }
    /// One past the last guest-physical address.
    public var endGPA: UInt64 { baseGPA + size }

    /// The region as SET_MEM_TABLE / ADD_MEM_REG describe it.
    public var regionDescription: MemoryRegionDescription {
        MemoryRegionDescription(guestPhysAddr: baseGPA, size: size, userAddr: userAddress, mmapOffset: mmapOffset)
    }

    public func contains(gpa: UInt64, length: UInt64 = 1) -> Bool {
        gpa >= baseGPA && length <= size && gpa - baseGPA <= size - length
    }

    /// The user address of `gpa` (what SET_VRING_ADDR carries), or nil outside the region.
    public func userAddress(ofGPA gpa: UInt64) -> UInt64? {
        contains(gpa: gpa) ? userAddress + (gpa - baseGPA) : nil
    }

    /// A host pointer to `length` bytes at `gpa`, for ring code that works on raw memory.
    /// Valid as long as this object lives.
    public func hostPointer(gpa: UInt64, length: UInt64) throws(FrontendError) -> UnsafeMutableRawPointer {
        guard contains(gpa: gpa, length: length) else { throw .unmappedAddress(gpa: gpa, length: length) }
        // Safety: the range was just checked to lie inside the mapping, which lives as long as self.
        return mapping.base + Int(gpa - baseGPA)
    }

    // MARK: byte access

    public func write(_ bytes: [UInt8], at gpa: UInt64) throws(FrontendError) {
        let p = try hostPointer(gpa: gpa, length: UInt64(bytes.count))
        // Safety: p points at bytes.count bytes inside the mapping (checked by hostPointer).
        bytes.withUnsafeBytes { src in if let s = src.baseAddress { p.copyMemory(from: s, byteCount: src.count) } }
    }

    public func read(at gpa: UInt64, count: Int) throws(FrontendError) -> [UInt8] {
        let p = try hostPointer(gpa: gpa, length: UInt64(count))
        // Safety: p points at count bytes inside the mapping (checked by hostPointer).
        return [UInt8](UnsafeRawBufferPointer(start: p, count: count))
    }

    public func fill(_ byte: UInt8, at gpa: UInt64, count: Int) throws(FrontendError) {
        let p = try hostPointer(gpa: gpa, length: UInt64(count))
        // Safety: p points at count bytes inside the mapping (checked by hostPointer).
        p.initializeMemory(as: UInt8.self, repeating: byte, count: count)
    }

    /// A little-endian integer at `gpa` (any alignment).
    public func load<T: FixedWidthInteger>(_ type: T.Type, at gpa: UInt64) throws(FrontendError) -> T {
        let p = try hostPointer(gpa: gpa, length: UInt64(MemoryLayout<T>.size))
        // Safety: the integer's bytes lie inside the mapping (checked by hostPointer).
        return T(littleEndian: p.loadUnaligned(as: T.self))
    }

    /// Stores a little-endian integer at `gpa` (any alignment).
    public func store<T: FixedWidthInteger>(_ value: T, at gpa: UInt64) throws(FrontendError) {
        let p = try hostPointer(gpa: gpa, length: UInt64(MemoryLayout<T>.size))
        // Safety: the integer's bytes lie inside the mapping (checked by hostPointer).
        p.storeBytes(of: value.littleEndian, as: T.self)
    }

    // MARK: ring indices shared with the backend

    /// Publishes a 16-bit ring index (avail.idx) with release ordering: every earlier store to
    /// the ring and buffers is visible to the backend before the new index (virtio_ring.c's
    /// virtio_wmb before writing avail->idx).
    public func storeRelease(_ value: UInt16, at gpa: UInt64) throws(FrontendError) {
        try atomic16(gpa).pointee.store(value.littleEndian, ordering: .releasing)
    }

    /// Reads a 16-bit ring index (used.idx) with acquire ordering: the used entries and buffer
    /// bytes the backend wrote before publishing it are visible after (virtio_rmb after reading used->idx).
    public func loadAcquire(_ type: UInt16.Type, at gpa: UInt64) throws(FrontendError) -> UInt16 {
        UInt16(littleEndian: try atomic16(gpa).pointee.load(ordering: .acquiring))
    }

    private func atomic16(_ gpa: UInt64) throws(FrontendError) -> UnsafePointer<Atomic<UInt16>> {
        guard gpa % 2 == 0 else { throw .invalidArgument("ring index at 0x\(String(gpa, radix: 16)) is not 2-aligned") }
        let p = try hostPointer(gpa: gpa, length: 2)
        // Safety: 2 aligned bytes inside a shared mapping; Atomic<UInt16> has UInt16's layout.
        return UnsafePointer(p.assumingMemoryBound(to: Atomic<UInt16>.self))
    }
}

// MARK: a guest's RAM as a list of regions

extension Array where Element == GuestRAM {
    /// The region holding all of `[gpa, gpa+length)`, if one does.
    public func region(containing gpa: UInt64, length: UInt64 = 1) -> GuestRAM? {
        first { $0.contains(gpa: gpa, length: length) }
    }

    /// The frontend user address of `gpa` (the range must lie inside one region).
    public func userAddress(ofGPA gpa: UInt64, length: UInt64 = 1) throws(FrontendError) -> UInt64 {
        guard let r = region(containing: gpa, length: length), let ua = r.userAddress(ofGPA: gpa) else {
            throw .unmappedAddress(gpa: gpa, length: length)
        }
        return ua
    }

    /// One past the highest guest-physical address of any region (what the dirty log must cover).
    public var endGPA: UInt64 { map(\.endGPA).max() ?? 0 }

    public func write(_ bytes: [UInt8], at gpa: UInt64) throws(FrontendError) {
        guard let r = region(containing: gpa, length: UInt64(bytes.count)) else {
            throw .unmappedAddress(gpa: gpa, length: UInt64(bytes.count))
        }
        try r.write(bytes, at: gpa)
    }

    public func read(at gpa: UInt64, count: Int) throws(FrontendError) -> [UInt8] {
        guard let r = region(containing: gpa, length: UInt64(count)) else {
            throw .unmappedAddress(gpa: gpa, length: UInt64(count))
        }
        return try r.read(at: gpa, count: count)
    }
}
