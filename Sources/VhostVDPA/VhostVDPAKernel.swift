#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims
import DeviceFramework
import Platform

/// One message of the device's IOTLB protocol (vhost_msg_v2 written to the character device).
public enum IOTLBMessage: Equatable, Sendable {
    /// Maps [iova, iova+size) to daemon memory at `uaddr` (for devices that use virtual
    /// addresses, such as VDUSE's, the memory must be a shared file mapping: a memfd).
    case update(iova: UInt64, size: UInt64, uaddr: UInt64, writable: Bool)
    case invalidate(iova: UInt64, size: UInt64)
    case batchBegin
    case batchEnd
}

/// Virtio device status bits (virtio spec 2.1).
public enum VirtioStatus {
    public static let acknowledge: UInt8 = 1
    public static let driver: UInt8 = 2
    public static let driverOK: UInt8 = 4
    public static let featuresOK: UInt8 = 8
    public static let needsReset: UInt8 = 0x40
    public static let failed: UInt8 = 0x80
}

/// Backend feature bits of vhost-vdpa (VHOST_GET_BACKEND_FEATURES), as masks.
public enum VhostBackendFeature {
    public static let iotlbMsgV2: UInt64 = 1 << UInt64(CVDPA_VHOST_BACKEND_F_IOTLB_MSG_V2)
    public static let iotlbBatch: UInt64 = 1 << UInt64(CVDPA_VHOST_BACKEND_F_IOTLB_BATCH)
    public static let iotlbASID: UInt64 = 1 << UInt64(CVDPA_VHOST_BACKEND_F_IOTLB_ASID)
    public static let suspend: UInt64 = 1 << UInt64(CVDPA_VHOST_BACKEND_F_SUSPEND)
    public static let resume: UInt64 = 1 << UInt64(CVDPA_VHOST_BACKEND_F_RESUME)
    public static let enableAfterDriverOK: UInt64 = 1 << UInt64(CVDPA_VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK)
    public static let descASID: UInt64 = 1 << UInt64(CVDPA_VHOST_BACKEND_F_DESC_ASID)
    public static let iotlbPersist: UInt64 = 1 << UInt64(CVDPA_VHOST_BACKEND_F_IOTLB_PERSIST)

    /// The names status output uses.
    public static func names(_ bits: UInt64) -> [String] {
        let all: [(UInt64, String)] = [
            (iotlbMsgV2, "IOTLB_MSG_V2"), (iotlbBatch, "IOTLB_BATCH"), (iotlbASID, "IOTLB_ASID"),
            (suspend, "SUSPEND"), (resume, "RESUME"), (enableAfterDriverOK, "ENABLE_AFTER_DRIVER_OK"),
            (descASID, "DESC_ASID"), (iotlbPersist, "IOTLB_PERSIST"),
        ]
        return all.filter { bits & $0.0 != 0 }.map(\.1)
    }
}

/// The vhost-vdpa character device's operations, one method per ioctl (or IOTLB write). The
/// driver (`VhostVDPADevice`) talks to a device only through this, so that its logic can be
/// exercised against a model of the kernel's rules on a host without vDPA (the tests do).
/// Every method throws the failed call with its errno.
public protocol VhostVDPAKernel: AnyObject {
    func setOwner() throws(SystemError)
    func deviceID() throws(SystemError) -> UInt32
    func deviceFeatures() throws(SystemError) -> UInt64
    func setFeatures(_ features: UInt64) throws(SystemError)
    func backendFeatures() throws(SystemError) -> UInt64
    func setBackendFeatures(_ features: UInt64) throws(SystemError)
    func queueCount() throws(SystemError) -> UInt32
    func maxQueueSize() throws(SystemError) -> UInt16
    func configSize() throws(SystemError) -> UInt32
    func readConfig(offset: UInt32, length: UInt32) throws(SystemError) -> [UInt8]
    func status() throws(SystemError) -> UInt8
    func setStatus(_ status: UInt8) throws(SystemError)
    func iovaRange() throws(SystemError) -> (first: UInt64, last: UInt64)
    func send(_ messages: [IOTLBMessage]) throws(SystemError)
    func setRingSize(_ index: Int, _ size: UInt16) throws(SystemError)
    func setRingAddress(_ index: Int, desc: UInt64, avail: UInt64, used: UInt64) throws(SystemError)
    func setRingBase(_ index: Int, _ base: UInt16) throws(SystemError)
    func ringBase(_ index: Int) throws(SystemError) -> UInt16
    /// fd -1 unbinds.
    func setRingKick(_ index: Int, fd: Int32) throws(SystemError)
    func setRingCall(_ index: Int, fd: Int32) throws(SystemError)
    func setRingEnabled(_ index: Int, _ enabled: Bool) throws(SystemError)
    func suspend() throws(SystemError)
    func resume() throws(SystemError)
    /// Per-queue counters the device keeps (vendor statistics), or nil when none are read.
    func vendorCounters() -> [QueueCounters]?
    /// Gives the device up (closes the character device: the kernel resets the device and
    /// another process may open it). Later calls fail.
    func release()
}

/// `/dev/vhost-vdpa-N`, opened read-write. The raw ioctls live here and nowhere else.
public final class VhostVDPAFile: VhostVDPAKernel, @unchecked Sendable {
    // @unchecked Sendable: the driver serialises every call that touches the fd, release included
    // (the port thread); `vendorCounters`, which the control thread reaches, touches nothing.
    public let path: String
    /// The open character device; -1 once released.
    private var fd: Int32

    public init(path: String) throws(SystemError) {
        self.path = path
        fd = try syscallRetrying("open \(path)") { open(path, O_RDWR | O_CLOEXEC) }
    }

    deinit { release() }

    public func release() {
        if fd >= 0 { _ = Glibc.close(fd) }
        fd = -1
    }

    private func call<T>(_ name: String, _ request: UInt, _ value: inout T) throws(SystemError) {
        // Safety: `value` is a plain C-layout value of the size the request's _IOC encodes.
        try syscallRetrying(name) { withUnsafeMutablePointer(to: &value) { cvdpa_ioctl_ptr(fd, request, $0) } }
    }

    public func setOwner() throws(SystemError) {
        try syscallRetrying("VHOST_SET_OWNER") { cvdpa_ioctl_none(fd, CVDPA_VHOST_SET_OWNER) }
    }
    public func deviceID() throws(SystemError) -> UInt32 {
        var v: UInt32 = 0; try call("VHOST_VDPA_GET_DEVICE_ID", CVDPA_VHOST_VDPA_GET_DEVICE_ID, &v); return v
    }
    public func deviceFeatures() throws(SystemError) -> UInt64 {
        var v: UInt64 = 0; try call("VHOST_GET_FEATURES", CVDPA_VHOST_GET_FEATURES, &v); return v
    }
    public func setFeatures(_ features: UInt64) throws(SystemError) {
        var v = features; try call("VHOST_SET_FEATURES", CVDPA_VHOST_SET_FEATURES, &v)
    }
    public func backendFeatures() throws(SystemError) -> UInt64 {
        var v: UInt64 = 0; try call("VHOST_GET_BACKEND_FEATURES", CVDPA_VHOST_GET_BACKEND_FEATURES, &v); return v
    }
    public func setBackendFeatures(_ features: UInt64) throws(SystemError) {
        var v = features; try call("VHOST_SET_BACKEND_FEATURES", CVDPA_VHOST_SET_BACKEND_FEATURES, &v)
    }
    public func queueCount() throws(SystemError) -> UInt32 {
        var v: UInt32 = 0; try call("VHOST_VDPA_GET_VQS_COUNT", CVDPA_VHOST_VDPA_GET_VQS_COUNT, &v); return v
    }
    public func maxQueueSize() throws(SystemError) -> UInt16 {
        var v: UInt16 = 0; try call("VHOST_VDPA_GET_VRING_NUM", CVDPA_VHOST_VDPA_GET_VRING_NUM, &v); return v
    }
    public func configSize() throws(SystemError) -> UInt32 {
        var v: UInt32 = 0; try call("VHOST_VDPA_GET_CONFIG_SIZE", CVDPA_VHOST_VDPA_GET_CONFIG_SIZE, &v); return v
    }
    public func readConfig(offset: UInt32, length: UInt32) throws(SystemError) -> [UInt8] {
        // struct vhost_vdpa_config { u32 off; u32 len; u8 buf[len]; }
        var raw = [UInt8](repeating: 0, count: 8 + Int(length))
        withUnsafeBytes(of: offset.littleEndian) { raw.replaceSubrange(0..<4, with: $0) }
        withUnsafeBytes(of: length.littleEndian) { raw.replaceSubrange(4..<8, with: $0) }
        // Safety: `raw` holds the 8-byte header plus `length` bytes, as the request reads and writes.
        try syscallRetrying("VHOST_VDPA_GET_CONFIG") {
            raw.withUnsafeMutableBytes { cvdpa_ioctl_ptr(fd, CVDPA_VHOST_VDPA_GET_CONFIG, $0.baseAddress) }
        }
        return Array(raw[8...])
    }
    public func status() throws(SystemError) -> UInt8 {
        var v: UInt8 = 0; try call("VHOST_VDPA_GET_STATUS", CVDPA_VHOST_VDPA_GET_STATUS, &v); return v
    }
    public func setStatus(_ status: UInt8) throws(SystemError) {
        var v = status; try call("VHOST_VDPA_SET_STATUS", CVDPA_VHOST_VDPA_SET_STATUS, &v)
    }
    public func iovaRange() throws(SystemError) -> (first: UInt64, last: UInt64) {
        var r = vhost_vdpa_iova_range(first: 0, last: 0)
        try call("VHOST_VDPA_GET_IOVA_RANGE", CVDPA_VHOST_VDPA_GET_IOVA_RANGE, &r)
        return (r.first, r.last)
    }

    /// Writes each message as a struct vhost_msg_v2 (72 bytes: type, asid, then the iotlb
    /// message of 32 bytes padded to 64). The kernel takes one message per write.
    public func send(_ messages: [IOTLBMessage]) throws(SystemError) {
        for m in messages {
            let bytes = Self.encode(m)
            let n = try syscallRetrying("write IOTLB message to \(path)") {
                // Safety: `bytes` is 72 bytes long and stays alive for the call.
                bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            }
            guard n == bytes.count else { throw SystemError("short IOTLB write (\(n) of \(bytes.count) bytes)", errno: EIO) }
        }
    }

    /// The wire form of one message (struct vhost_msg_v2; ASID 0).
    public static func encode(_ m: IOTLBMessage) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 72)
        func put<T: FixedWidthInteger>(_ v: T, at o: Int) {
            withUnsafeBytes(of: v.littleEndian) { for (i, x) in $0.enumerated() { b[o + i] = x } }
        }
        put(CVDPA_VHOST_IOTLB_MSG_V2, at: 0)
        // struct vhost_iotlb_msg at offset 8: iova u64, size u64, uaddr u64, perm u8, type u8.
        switch m {
        case .update(let iova, let size, let uaddr, let writable):
            put(iova, at: 8); put(size, at: 16); put(uaddr, at: 24)
            b[32] = writable ? CVDPA_VHOST_ACCESS_RW : CVDPA_VHOST_ACCESS_RO
            b[33] = CVDPA_VHOST_IOTLB_UPDATE
        case .invalidate(let iova, let size):
            put(iova, at: 8); put(size, at: 16)
            b[33] = CVDPA_VHOST_IOTLB_INVALIDATE
        case .batchBegin: b[33] = CVDPA_VHOST_IOTLB_BATCH_BEGIN
        case .batchEnd: b[33] = CVDPA_VHOST_IOTLB_BATCH_END
        }
        return b
    }

    public func setRingSize(_ index: Int, _ size: UInt16) throws(SystemError) {
        var s = vhost_vring_state(index: UInt32(index), num: UInt32(size))
        try call("VHOST_SET_VRING_NUM(\(index))", CVDPA_VHOST_SET_VRING_NUM, &s)
    }
    public func setRingAddress(_ index: Int, desc: UInt64, avail: UInt64, used: UInt64) throws(SystemError) {
        var a = vhost_vring_addr(index: UInt32(index), flags: 0, desc_user_addr: desc, used_user_addr: used,
                                 avail_user_addr: avail, log_guest_addr: 0)
        try call("VHOST_SET_VRING_ADDR(\(index))", CVDPA_VHOST_SET_VRING_ADDR, &a)
    }
    public func setRingBase(_ index: Int, _ base: UInt16) throws(SystemError) {
        var s = vhost_vring_state(index: UInt32(index), num: UInt32(base))
        try call("VHOST_SET_VRING_BASE(\(index))", CVDPA_VHOST_SET_VRING_BASE, &s)
    }
    public func ringBase(_ index: Int) throws(SystemError) -> UInt16 {
        var s = vhost_vring_state(index: UInt32(index), num: 0)
        try call("VHOST_GET_VRING_BASE(\(index))", CVDPA_VHOST_GET_VRING_BASE, &s)
        return UInt16(truncatingIfNeeded: s.num)
    }
    public func setRingKick(_ index: Int, fd kick: Int32) throws(SystemError) {
        var f = vhost_vring_file(index: UInt32(index), fd: kick)
        try call("VHOST_SET_VRING_KICK(\(index))", CVDPA_VHOST_SET_VRING_KICK, &f)
    }
    public func setRingCall(_ index: Int, fd callFD: Int32) throws(SystemError) {
        var f = vhost_vring_file(index: UInt32(index), fd: callFD)
        try call("VHOST_SET_VRING_CALL(\(index))", CVDPA_VHOST_SET_VRING_CALL, &f)
    }
    public func setRingEnabled(_ index: Int, _ enabled: Bool) throws(SystemError) {
        var s = vhost_vring_state(index: UInt32(index), num: enabled ? 1 : 0)
        try call("VHOST_VDPA_SET_VRING_ENABLE(\(index))", CVDPA_VHOST_VDPA_SET_VRING_ENABLE, &s)
    }
    public func suspend() throws(SystemError) {
        try syscallRetrying("VHOST_VDPA_SUSPEND") { cvdpa_ioctl_none(fd, CVDPA_VHOST_VDPA_SUSPEND) }
    }
    public func resume() throws(SystemError) {
        try syscallRetrying("VHOST_VDPA_RESUME") { cvdpa_ioctl_none(fd, CVDPA_VHOST_VDPA_RESUME) }
    }
    /// Vendor statistics come over the vdpa netlink family (VDPA_CMD_DEV_VSTATS_GET), which
    /// this driver does not read yet: nil, and the stats say the device reported no counters.
    public func vendorCounters() -> [QueueCounters]? { nil }
}
