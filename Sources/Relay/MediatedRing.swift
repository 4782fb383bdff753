import DeviceFramework
import Platform
import Virtio

/// A used ring the daemon owns, that the device completes into while a migration runs.
/// It lives in anonymous daemon memory, mapped in the device's IOMMU in a reserved IOVA range
/// above guest RAM.
public final class MediatedUsedRing: @unchecked Sendable {
    // @unchecked Sendable: the mapping is immutable and released once in deinit; its words are
    // read and written only through RingWord's atomic operations or by one thread (the relay).
    public let size: UInt16
    public let byteCount: Int
    private let mapping: MemoryMapping
    public var base: UnsafeMutableRawPointer { mapping.base }

    /// Reserved IOVA range for mediated rings: far above any guest RAM (2^46 = 64 TiB). The
    /// port's session refuses memory regions that reach it (its `guestPhysLimit`), the binding
    /// refuses such a table again before a device sees it, and the SoftNIC translates guest
    /// buffers without these mappings, so no guest descriptor can point into a mediated ring
    /// there. A kernel device has one IOTLB for rings and buffers (no separate address space is
    /// used yet), so a guest descriptor at this range would reach the mediated ring: the relay
    /// then takes at most a ring of entries at once and counts anything else as an error.
    public static let iovaBase: UInt64 = reservedIOVABase
    public static let iovaStride: UInt64 = 1 << 20

    public static func iova(forRing index: Int) -> UInt64 { iovaBase + UInt64(index) * iovaStride }

    public init(size: UInt16) throws(SystemError) {
        self.size = size
        let bytes = SplitRingLayout(queueSize: size).map { $0.usedRingBytes } ?? 4096
        byteCount = (bytes + 4095) & ~4095
        // Shared memory from a memfd, not anonymous memory: a kernel vDPA device that works on
        // virtual addresses (VDUSE's) maps only shared file-backed ranges into its IOTLB.
        let fd = try makeMemfd(name: "vdpa-mediated-used", size: byteCount)
        mapping = try MemoryMapping(fd: fd, offset: 0, length: byteCount)
    }
}

/// An avail ring the daemon owns, that the device reads while the avail relay runs
/// (`relay=avail+used`): the relay copies into it the heads of the chains it has checked. Like
/// `MediatedUsedRing`, shared memory from a memfd in the reserved IOVA range, at a second stride
/// range 512 MiB above the used rings' (512 rings of each before they could meet; a kernel device
/// needs the daemon's range to reach 1 GiB, see VhostVDPADevice).
public final class MediatedAvailRing: @unchecked Sendable {
    // @unchecked Sendable: as MediatedUsedRing (immutable mapping, words written by the relay only).
    public let size: UInt16
    public let byteCount: Int
    private let mapping: MemoryMapping
    public var base: UnsafeMutableRawPointer { mapping.base }

    public static let iovaBase: UInt64 = reservedIOVABase + (1 << 29)

    public static func iova(forRing index: Int) -> UInt64 { iovaBase + UInt64(index) * MediatedUsedRing.iovaStride }

    public init(size: UInt16) throws(SystemError) {
        self.size = size
        let bytes = SplitRingLayout(queueSize: size).map { $0.availRingBytes } ?? 4096
        byteCount = (bytes + 4095) & ~4095
        let fd = try makeMemfd(name: "vdpa-mediated-avail", size: byteCount)
        mapping = try MemoryMapping(fd: fd, offset: 0, length: byteCount)
    }
}
