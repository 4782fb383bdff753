#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims
import Platform

/// A ring as the driver programmed it (VDUSE_VQ_GET_INFO, split rings). After a reset every field
/// is zero (vduse_dev_reset clears them; the SET_STATUS 0 request comes before that, so during it
/// the old values still show).
public struct VDUSEQueueInfo: Equatable, Sendable {
    public var size: UInt32
    public var descriptorIOVA: UInt64
    public var driverIOVA: UInt64
    public var deviceIOVA: UInt64
    /// The avail index the driver set (vhost-vdpa: SET_VRING_BASE; virtio_vdpa: 0).
    public var availIndex: UInt16
    public var ready: Bool
    public init(size: UInt32, descriptorIOVA: UInt64, driverIOVA: UInt64, deviceIOVA: UInt64, availIndex: UInt16, ready: Bool) {
        self.size = size; self.descriptorIOVA = descriptorIOVA; self.driverIOVA = driverIOVA
        self.deviceIOVA = deviceIOVA; self.availIndex = availIndex; self.ready = ready
    }
}

/// One IOTLB entry (VDUSE_IOTLB_GET_FD): IOVAs [start, last] are `fd` from `offset` on.
public struct VDUSEIOTLBEntry: ~Copyable {
    public let start: UInt64
    public let last: UInt64
    public let offset: UInt64
    /// VDUSE_ACCESS_RO (1), WO (2) or RW (3).
    public let permission: UInt8
    public let fd: FileDescriptor
    public init(start: UInt64, last: UInt64, offset: UInt64, permission: UInt8, fd: consuming FileDescriptor) {
        self.start = start; self.last = last; self.offset = offset; self.permission = permission; self.fd = fd
    }
    public static let readWrite: UInt8 = 3
}

/// What the request loop, the IOTLB and the interrupt path need of an open VDUSE device
/// (/dev/vduse/NAME): its message fd and its ioctls. A protocol so that tests serve a fake device
/// (a socketpair for the messages, recorded ioctls).
public protocol VDUSEDeviceIO: AnyObject, Sendable {
    /// Carries the kernel's requests (read, one per call) and the responses (write); non-blocking.
    var messageFD: Int32 { get }
    /// VDUSE_DEV_GET_FEATURES: the features the driver wrote.
    func negotiatedFeatures() throws(SystemError) -> UInt64
    /// VDUSE_VQ_GET_INFO.
    func queueInfo(_ index: Int) throws(SystemError) -> VDUSEQueueInfo
    /// VDUSE_VQ_SETUP_KICKFD (-1: none). The kernel forgets it at every reset.
    func setKick(_ index: Int, eventfd: Int32) throws(SystemError)
    /// VDUSE_VQ_INJECT_IRQ: 0, or the errno (EINVAL before DRIVER_OK, EPERM once broken). On the
    /// data path: no allocation.
    func injectInterrupt(_ index: Int) -> Int32
    /// VDUSE_IOTLB_GET_FD: the first entry overlapping [first, last], nil when none does.
    func iotlbEntry(first: UInt64, last: UInt64) throws(SystemError) -> VDUSEIOTLBEntry?
}

/// An open VDUSE device: the real `VDUSEDeviceIO`. The fd closes when the last holder lets go
/// (the request loop, the IOTLB and the interrupt raiser share it); VDUSE_DESTROY_DEV fails until then.
public final class VDUSEDeviceFile: VDUSEDeviceIO {
    private let fd: FileDescriptor
    public let path: String

    /// Opens /dev/vduse/`name` non-blocking. The node may take a moment to appear after
    /// VDUSE_CREATE_DEV (devtmpfs): ENOENT is retried for up to a second.
    public init(name: String) throws(SystemError) {
        path = "/dev/vduse/\(name)"
        fd = FileDescriptor(owning: try Self.open(path))
    }

    private static func open(_ path: String) throws(SystemError) -> Int32 {
        let deadline = Deadline(secondsFromNow: 1)
        while true {
            do throws(SystemError) {
                return try syscallRetrying("open(\(path))") { openRaw(path) }
            } catch where error.code == .noSuchFile && !deadline.hasPassed {
                CurrentThread.sleep(milliseconds: 10)
            }
        }
    }

    // Safety: the String is bridged to a NUL-terminated C string valid for the call only.
    @inline(never) static func openRaw(_ path: String) -> Int32 { Glibc.open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC) }

    public var messageFD: Int32 { fd.raw }

    /// VDUSE_VQ_SETUP: ring `index` may be at most `maxSize` entries. Every ring must be set up
    /// before the device joins the vDPA bus.
    public func setUpQueue(_ index: Int, maxSize: UInt16) throws(SystemError) {
        try syscallRetrying("ioctl(VDUSE_VQ_SETUP, \(index))") { cvdpa_vduse_vq_setup(fd.raw, UInt32(index), maxSize) }
    }

    public func negotiatedFeatures() throws(SystemError) -> UInt64 {
        var f: UInt64 = 0
        try syscallRetrying("ioctl(VDUSE_DEV_GET_FEATURES)") { cvdpa_vduse_get_features(fd.raw, &f) }
        return f
    }

    public func queueInfo(_ index: Int) throws(SystemError) -> VDUSEQueueInfo {
        var num: UInt32 = 0, desc: UInt64 = 0, driver: UInt64 = 0, device: UInt64 = 0, avail: UInt16 = 0, ready: UInt8 = 0
        try syscallRetrying("ioctl(VDUSE_VQ_GET_INFO, \(index))") {
            cvdpa_vduse_vq_get_info(fd.raw, UInt32(index), &num, &desc, &driver, &device, &avail, &ready)
        }
        return VDUSEQueueInfo(size: num, descriptorIOVA: desc, driverIOVA: driver, deviceIOVA: device, availIndex: avail, ready: ready != 0)
    }

    public func setKick(_ index: Int, eventfd: Int32) throws(SystemError) {
        try syscallRetrying("ioctl(VDUSE_VQ_SETUP_KICKFD, \(index))") { cvdpa_vduse_vq_setup_kickfd(fd.raw, UInt32(index), eventfd) }
    }

    @inline(never)
    public func injectInterrupt(_ index: Int) -> Int32 {
        cvdpa_vduse_vq_inject_irq(fd.raw, UInt32(truncatingIfNeeded: index)) == 0 ? 0 : cvdpa_errno()
    }

    public func iotlbEntry(first: UInt64, last: UInt64) throws(SystemError) -> VDUSEIOTLBEntry? {
        var start = first, end = last, offset: UInt64 = 0, perm: UInt8 = 0
        let raw: Int32
        do throws(SystemError) {
            raw = try syscallRetrying("ioctl(VDUSE_IOTLB_GET_FD, [0x\(String(first, radix: 16)), 0x\(String(last, radix: 16))])") {
                cvdpa_vduse_iotlb_get_fd(fd.raw, &start, &end, &offset, &perm)
            }
        } catch where error.code == .invalidArgument {
            return nil  // no entry overlaps the range
        }
        let entryFD = FileDescriptor(owning: raw)
        // receive_fd gives the new fd without close-on-exec.
        _ = fcntl(entryFD.raw, F_SETFD, FD_CLOEXEC)
        return VDUSEIOTLBEntry(start: start, last: end, offset: offset, permission: perm, fd: entryFD)
    }
}

/// /dev/vduse/control: creates and destroys VDUSE devices.
public struct VDUSEControl: ~Copyable {
    private let fd: FileDescriptor
    public static let path = "/dev/vduse/control"

    /// Opens the control node and sets the API version this code speaks (0: Linux 6.12's).
    public init() throws(SystemError) {
        let raw = try syscallRetrying("open(\(Self.path))") { VDUSEDeviceFile.openRaw(Self.path) }
        let owned = FileDescriptor(owning: raw)
        try syscallRetrying("ioctl(VDUSE_SET_API_VERSION, \(CVDPA_VDUSE_API_VERSION))") {
            cvdpa_vduse_set_api_version(owned.raw, CVDPA_VDUSE_API_VERSION)
        }
        fd = owned
    }

    /// VDUSE_CREATE_DEV: a device named `name` with `config` (virtio-net here).
    public func create(name: String, config: VDUSEDeviceConfig) throws(SystemError) {
        let space = config.configSpace
        try syscallRetrying("ioctl(VDUSE_CREATE_DEV, \(name))") {
            // Safety: the config bytes are valid for the call; the C side copies them.
            space.withUnsafeBytes { b in
                cvdpa_vduse_create_dev(fd.raw, name, VDUSEDeviceConfig.vendorID, VDUSEDeviceConfig.deviceID, config.features,
                                       UInt32(config.queueCount), VDUSEDeviceConfig.queueAlignment, b.baseAddress, UInt32(b.count))
            }
        }
    }

    /// VDUSE_DESTROY_DEV: fails with EBUSY while the device is on the vDPA bus or its fd is open.
    public func destroy(name: String) throws(SystemError) {
        try syscallRetrying("ioctl(VDUSE_DESTROY_DEV, \(name))") { cvdpa_vduse_destroy_dev(fd.raw, name) }
    }
}
