#if canImport(Glibc)
import Glibc
#endif
import DeviceFramework
import Logging
import Platform
import SoftNIC
import Synchronization
import Virtio

/// The device side of a VDUSE device's IOTLB: the IOVA ranges the driver mapped for the device,
/// each mapped into the daemon (VDUSE_IOTLB_GET_FD, then mmap of the file it names), and the
/// `DeviceMemory` the SoftNIC's IOMMU is built from (IOVA → host address, in place of a
/// vhost-user memory table).
///
/// The kernel tells the device of some changes only: vhost-vdpa's map updates come as
/// VDUSE_UPDATE_IOTLB (`update`), but virtio_vdpa's DMA mappings appear without a message (the
/// rings when the driver allocates them, the bounce buffer at its first DMA map, which may come
/// after DRIVER_OK). So an access that misses is looked up on demand (`resolve`, the SoftNIC's
/// `IOMMUMissResolver`, on the engine's thread). The request loop and the engine both change the
/// table: every change happens under one lock, and each snapshot is the state at one instant.
///
/// What a hostile driver could make the daemon touch: only shared memory is mapped (memfd,
/// tmpfs or hugetlbfs files wholly holding the entry, or VDUSE's own bounce/coherent domain
/// file), never a file on a disk, network or FUSE filesystem (a fault there could block the
/// engine or fill a disk) nor a device file; each mapping is registered with the SIGBUS guard (a
/// memfd shrunk later, or a domain page the kernel does not back, faults onto a zero page, the
/// window is dropped and looked up again); entries are mapped whole and at most `maxMappedBytes`
/// in all; read-only or write-only entries are not mapped at all (the SoftNIC reads and writes
/// through one mapping), so an access there faults the ring.
public final class VDUSEIOTLB: IOMMUMissResolver, Sendable {
    /// One entry mapped into the daemon. Immutable; the mapping is unmapped once, in deinit,
    /// when no snapshot holds it any more.
    final class Window: @unchecked Sendable {
        // @unchecked Sendable: every field is immutable; `mapping` is a ~Copyable owner whose
        // pointers stay valid for the object's life.
        let start: UInt64
        let last: UInt64
        let offset: UInt64
        let permission: UInt8
        let file: FileIdentity
        let mapping: GuardedFileMapping

        init(start: UInt64, last: UInt64, offset: UInt64, permission: UInt8, file: FileIdentity, mapping: consuming GuardedFileMapping) {
            self.start = start; self.last = last; self.offset = offset; self.permission = permission; self.file = file
            self.mapping = mapping
        }

        var size: UInt64 { last - start + 1 }

        func overlaps(_ first: UInt64, _ last: UInt64) -> Bool { start <= last && first <= self.last }
        func isSame(start: UInt64, last: UInt64, offset: UInt64, permission: UInt8, file: FileIdentity) -> Bool {
            self.start == start && self.last == last && self.offset == offset && self.permission == permission && self.file == file
        }
    }

    /// Which file an entry maps: its device and inode, and what /proc calls it (anonymous inodes
    /// share one inode, so for them the name is all there is).
    struct FileIdentity: Equatable {
        var device: UInt64
        var inode: UInt64
        var kind: String
    }

    /// Keeps a snapshot's windows mapped for as long as an IOMMU table holds the snapshot.
    final class Snapshot: Sendable {
        let windows: [Window]
        init(_ windows: [Window]) { self.windows = windows }
    }

    private struct State {
        var windows: [Window] = []
        var mappedBytes: UInt64 = 0
    }

    /// The anonymous inode VDUSE maps its bounce buffer and coherent (ring) memory from.
    public static let domainFileKind = "anon_inode:[vduse-domain]"

    private let state = Mutex(State())
    private let device: any VDUSEDeviceIO
    private let logger: Logger
    public let name: String
    /// At most this many bytes mapped at once (1 TiB of address space, as for vhost-user).
    public let maxMappedBytes: UInt64
    /// At most this many lookups per update or miss (the kernel keeps at most 2048 entries).
    public static let maxLookups = 4096
    /// Signalled by the SIGBUS guard when an access faulted in one of the windows.
    public let faultNotify: SharedFD
    /// Misses offered by the engine, and how many of them mapped something.
    public let misses = Atomic<UInt64>(0)
    public let resolvedMisses = Atomic<UInt64>(0)

    public init(device: any VDUSEDeviceIO, name: String, maxMappedBytes: UInt64 = 1 << 40, logger: Logger) throws(SystemError) {
        self.device = device
        self.name = name
        self.maxMappedBytes = maxMappedBytes
        self.logger = logger
        faultNotify = SharedFD(try EventFD.make())
    }

    // MARK: the engine's thread

    public func resolve(iova: UInt64, length: UInt64) -> DeviceMemory? {
        misses.wrappingAdd(1, ordering: .relaxed)
        let (end, overflow) = iova.addingReportingOverflow(max(length, 1) - 1)
        let last = overflow ? UInt64.max : end
        return state.withLock { s -> DeviceMemory? in
            guard mapMissing(&s, first: iova, last: last) > 0 else { return nil }
            resolvedMisses.wrappingAdd(1, ordering: .relaxed)
            return Self.snapshot(s)
        }
    }

    // MARK: the request loop's thread

    /// VDUSE_UPDATE_IOTLB for [first, last]: windows there that the kernel no longer has exactly
    /// as they were are dropped, and what it has now is mapped. Returns whether anything changed
    /// (the engine then needs the new snapshot before the request is answered).
    public func update(first: UInt64, last: UInt64) -> Bool {
        state.withLock { s -> Bool in
            var changed = false
            var kept: [Window] = []
            for w in s.windows {
                if w.overlaps(first, last) && !isCurrent(w) {
                    s.mappedBytes -= w.size
                    changed = true
                } else {
                    kept.append(w)
                }
            }
            s.windows = kept
            if mapMissing(&s, first: first, last: last) > 0 { changed = true }
            return changed
        }
    }

    /// Makes sure [iova, iova + length) is mapped if the kernel has it (a ring's area before the
    /// ring starts). Returns whether it lies inside one window now.
    @discardableResult
    public func ensureMapped(iova: UInt64, length: UInt64) -> Bool {
        let (end, overflow) = iova.addingReportingOverflow(max(length, 1) - 1)
        guard !overflow else { return false }
        return state.withLock { s -> Bool in
            if !s.windows.contains(where: { $0.start <= iova && end <= $0.last }) { _ = mapMissing(&s, first: iova, last: end) }
            return s.windows.contains { $0.start <= iova && end <= $0.last }
        }
    }

    /// The device was reset: every window goes (they are unmapped once no snapshot holds them).
    public func removeAll() {
        state.withLock { s in
            s.windows = []
            s.mappedBytes = 0
        }
    }

    /// Drops the windows in which the SIGBUS guard absorbed a fault: their faulting pages were
    /// replaced by private zero pages, so they no longer show the driver's memory. They are
    /// looked up again at the next access. Returns the ranges dropped.
    public func dropFaulted() -> [ClosedRange<UInt64>] {
        state.withLock { s -> [ClosedRange<UInt64>] in
            var dropped: [ClosedRange<UInt64>] = []
            s.windows.removeAll { w in
                guard w.mapping.faults > 0 else { return false }
                dropped.append(w.start...w.last)
                s.mappedBytes -= w.size
                return true
            }
            return dropped
        }
    }

    /// The device's memory now: every window, largest first (the bounce buffer or guest RAM,
    /// where buffers lie, before the rings' small areas).
    public func snapshot() -> DeviceMemory { state.withLock { Self.snapshot($0) } }

    /// The mapped ranges, in IOVA order (for status and tests).
    public var ranges: [ClosedRange<UInt64>] { state.withLock { $0.windows.map { $0.start...$0.last } } }

    public var mappedBytes: UInt64 { state.withLock { $0.mappedBytes } }

    // MARK: under the lock

    private static func snapshot(_ s: State) -> DeviceMemory {
        let ordered = s.windows.sorted { $0.size > $1.size }
        let regions = ordered.map { GuestMemoryView.Region(gpa: $0.start, size: $0.size, host: UInt(bitPattern: $0.mapping.pointer)) }
        return DeviceMemory(regions: regions, owner: Snapshot(ordered))
    }

    /// Whether the kernel still has window `w` as it was.
    private func isCurrent(_ w: Window) -> Bool {
        let found: VDUSEIOTLBEntry?
        do { found = try device.iotlbEntry(first: w.start, last: w.last) } catch {
            logger.warning("VDUSE \(name): \(error)")
            return false
        }
        guard let e = found else { return false }
        guard let id = identity(of: e.fd) else { return false }
        return w.isSame(start: e.start, last: e.last, offset: e.offset, permission: e.permission, file: id)
    }

    /// Maps every entry overlapping [first, last] that is not mapped as the kernel has it now.
    /// Returns how many windows were added.
    private func mapMissing(_ s: inout State, first: UInt64, last: UInt64) -> Int {
        var cursor = first
        var added = 0
        for _ in 0..<Self.maxLookups {
            let found: VDUSEIOTLBEntry?
            do { found = try device.iotlbEntry(first: cursor, last: last) } catch {
                logger.warning("VDUSE \(name): \(error)")
                break
            }
            guard let entry = found else { break }
            let entryLast = entry.last
            if install(&s, entry) { added += 1 }
            if entryLast >= last || entryLast == .max { break }
            cursor = entryLast + 1
        }
        return added
    }

    /// Maps one entry unless it is mapped already or refused (see the type's comment). True when added.
    private func install(_ s: inout State, _ e: consuming VDUSEIOTLBEntry) -> Bool {
        let range = "IOTLB entry [0x\(String(e.start, radix: 16)), 0x\(String(e.last, radix: 16))]"
        guard e.start <= e.last else { return false }
        guard let file = identity(of: e.fd) else {
            logger.warning("VDUSE \(name): \(range): cannot inspect its file; not mapped")
            return false
        }
        if s.windows.contains(where: { $0.isSame(start: e.start, last: e.last, offset: e.offset, permission: e.permission, file: file) }) {
            return false
        }
        guard e.permission == VDUSEIOTLBEntry.readWrite else {
            logger.warning("VDUSE \(name): \(range) is \(e.permission == 1 ? "read-only" : "write-only (or unknown permission \(e.permission))") for the device; not mapped, so an access there faults the ring")
            return false
        }
        guard e.last - e.start < maxMappedBytes else {
            logger.warning("VDUSE \(name): \(range) is larger than the \(maxMappedBytes)-byte limit; not mapped")
            return false
        }
        let size = e.last - e.start + 1
        let replaced = s.windows.filter { $0.overlaps(e.start, e.last) }.reduce(UInt64(0)) { $0 + $1.size }
        guard s.mappedBytes - replaced + size <= maxMappedBytes else {
            logger.warning("VDUSE \(name): \(range) would take the device's mappings over \(maxMappedBytes) bytes; not mapped")
            return false
        }
        let mapping: GuardedFileMapping
        do {
            mapping = try GuardedFileMapping(sharedMemoryOf: e.fd, offset: e.offset, length: size, notify: faultNotify,
                                             anonymousInodes: [Self.domainFileKind])
        } catch {
            logger.warning("VDUSE \(name): \(range) at offset \(e.offset) of its file: \(error); not mapped")
            return false
        }
        // The kernel's table is the truth: a window it has replaced goes.
        s.windows.removeAll { $0.overlaps(e.start, e.last) }
        s.mappedBytes = s.mappedBytes - replaced + size
        let w = Window(start: e.start, last: e.last, offset: e.offset, permission: e.permission, file: file, mapping: mapping)
        let at = s.windows.firstIndex { $0.start > w.start } ?? s.windows.count
        s.windows.insert(w, at: at)
        return true
    }

    private func identity(of fd: borrowing FileDescriptor) -> FileIdentity? {
        var st = stat()
        guard fstat(fd.raw, &st) == 0 else { return nil }
        let kind: String
        do { kind = try FileSystem.linkTarget("/proc/self/fd/\(fd.raw)") ?? "?" } catch { return nil }
        return FileIdentity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino), kind: kind)
    }
}
