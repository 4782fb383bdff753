#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims
import DeviceFramework
import Logging
import Platform
import Synchronization
import XCTest
@testable import VDUSE

/// A VDUSE device without the kernel: the messages go over a SOCK_SEQPACKET socketpair (one
/// request per read, like /dev/vduse/NAME), the ioctls are answered from tables the test fills
/// and recorded. The test plays the kernel on `kernelFD`.
final class FakeVDUSEDevice: VDUSEDeviceIO, @unchecked Sendable {
    // @unchecked Sendable: every mutable table is behind its mutex; the fds are immutable.
    struct Entry {
        var start: UInt64
        var last: UInt64
        var offset: UInt64
        var permission: UInt8 = VDUSEIOTLBEntry.readWrite
        var file: SharedFD
    }

    let kernelFD: Int32
    let deviceFD: Int32
    let features = Mutex<UInt64>(0)
    let queues = Mutex<[Int: VDUSEQueueInfo]>([:])
    let entries = Mutex<[Entry]>([])
    let kicks = Mutex<[Int: Int32]>([:])
    let injected = Mutex<[Int]>([])
    let lookups = Atomic<Int>(0)
    /// What VDUSE_VQ_INJECT_IRQ answers (0, or an errno).
    let injectResult = Atomic<Int32>(0)

    init() throws {
        var fds: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | CVDPA_SOCK_CLOEXEC, 0, &fds) == 0 else {
            throw SystemError("socketpair", errno: cvdpa_errno())
        }
        kernelFD = fds[0]
        deviceFD = fds[1]
        _ = fcntl(deviceFD, F_SETFL, fcntl(deviceFD, F_GETFL) | O_NONBLOCK)
    }

    deinit {
        close(kernelFD)
        close(deviceFD)
    }

    var messageFD: Int32 { deviceFD }

    func negotiatedFeatures() throws(SystemError) -> UInt64 { features.withLock { $0 } }

    func queueInfo(_ index: Int) throws(SystemError) -> VDUSEQueueInfo {
        guard let q = queues.withLock({ $0[index] }) else {
            return VDUSEQueueInfo(size: 0, descriptorIOVA: 0, driverIOVA: 0, deviceIOVA: 0, availIndex: 0, ready: false)
        }
        return q
    }

    func setKick(_ index: Int, eventfd: Int32) throws(SystemError) { kicks.withLock { $0[index] = eventfd } }

    func injectInterrupt(_ index: Int) -> Int32 {
        injected.withLock { $0.append(index) }
        return injectResult.load(ordering: .relaxed)
    }

    func iotlbEntry(first: UInt64, last: UInt64) throws(SystemError) -> VDUSEIOTLBEntry? {
        lookups.wrappingAdd(1, ordering: .relaxed)
        // Like vhost_iotlb_itree_first: the lowest entry overlapping [first, last].
        guard let e = entries.withLock({ $0.filter { $0.start <= last && first <= $0.last }.min { $0.start < $1.start } }) else {
            return nil
        }
        let dup = try e.file.withFD { (fd: borrowing FileDescriptor) throws(SystemError) -> FileDescriptor in try fd.duplicate() }
        return VDUSEIOTLBEntry(start: e.start, last: e.last, offset: e.offset, permission: e.permission, fd: dup)
    }

    // MARK: playing the kernel

    /// A request laid out at the C header's offsets (so the Swift decoder is checked against them).
    static func request(type: UInt32, id: UInt32, queue: UInt32 = 0, status: UInt8 = 0, start: UInt64 = 0, last: UInt64 = 0) -> [UInt8] {
        var r = [UInt8](repeating: 0, count: Int(CVDPA_VDUSE_REQUEST_SIZE))
        func put<T: FixedWidthInteger>(_ v: T, _ at: Int) { withUnsafeBytes(of: v.littleEndian) { r.replaceSubrange(at..<(at + $0.count), with: $0) } }
        put(type, Int(CVDPA_VDUSE_REQ_OFF_TYPE))
        put(id, Int(CVDPA_VDUSE_REQ_OFF_ID))
        switch type {
        case CVDPA_VDUSE_GET_VQ_STATE: put(queue, Int(CVDPA_VDUSE_REQ_OFF_VQ_INDEX))
        case CVDPA_VDUSE_SET_STATUS: r[Int(CVDPA_VDUSE_REQ_OFF_STATUS)] = status
        case CVDPA_VDUSE_UPDATE_IOTLB:
            put(start, Int(CVDPA_VDUSE_REQ_OFF_IOVA_START))
            put(last, Int(CVDPA_VDUSE_REQ_OFF_IOVA_LAST))
        default: break
        }
        return r
    }

    struct Response: Equatable {
        var id: UInt32
        var ok: Bool
        var availIndex: UInt16
    }

    /// Sends a request and waits (at most 5 s) for its response, read at the C header's offsets.
    func send(_ request: [UInt8], file: StaticString = #filePath, line: UInt = #line) throws -> Response {
        let n = request.withUnsafeBytes { write(kernelFD, $0.baseAddress, $0.count) }
        XCTAssertEqual(n, request.count, file: file, line: line)
        guard try Poll.waitReadable(kernelFD, until: Deadline(secondsFromNow: 5)) else {
            XCTFail("no response within 5 s", file: file, line: line)
            throw SystemError("response", errno: ETIMEDOUT)
        }
        var buf = [UInt8](repeating: 0xee, count: 512)
        let got = buf.withUnsafeMutableBytes { read(kernelFD, $0.baseAddress, $0.count) }
        XCTAssertEqual(got, Int(CVDPA_VDUSE_RESPONSE_SIZE), "one response of the kernel's size", file: file, line: line)
        func u32(_ at: Int) -> UInt32 { buf[at..<(at + 4)].enumerated().reduce(0) { $0 | UInt32($1.element) << (8 * UInt32($1.offset)) } }
        let reserved = buf[Int(CVDPA_VDUSE_RESP_OFF_RESERVED)..<(Int(CVDPA_VDUSE_RESP_OFF_RESERVED) + 16)]
        XCTAssertTrue(reserved.allSatisfy { $0 == 0 }, "the kernel refuses responses with reserved words set", file: file, line: line)
        let a = Int(CVDPA_VDUSE_RESP_OFF_AVAIL_INDEX)
        return Response(id: u32(Int(CVDPA_VDUSE_RESP_OFF_ID)),
                        ok: u32(Int(CVDPA_VDUSE_RESP_OFF_RESULT)) == CVDPA_VDUSE_REQ_RESULT_OK,
                        availIndex: UInt16(buf[a]) | UInt16(buf[a + 1]) << 8)
    }

    func setStatus(_ s: UInt8, id: UInt32) throws -> Response {
        try send(Self.request(type: CVDPA_VDUSE_SET_STATUS, id: id, status: s))
    }
    func queueState(_ q: UInt32, id: UInt32) throws -> Response {
        try send(Self.request(type: CVDPA_VDUSE_GET_VQ_STATE, id: id, queue: q))
    }
    func updateIOTLB(_ start: UInt64, _ last: UInt64, id: UInt32) throws -> Response {
        try send(Self.request(type: CVDPA_VDUSE_UPDATE_IOTLB, id: id, start: start, last: last))
    }

    /// Adds an IOTLB entry backed by `file` from `offset`.
    func map(_ start: UInt64, size: UInt64, file: SharedFD, offset: UInt64 = 0, permission: UInt8 = VDUSEIOTLBEntry.readWrite) {
        entries.withLock { $0.append(Entry(start: start, last: start + size - 1, offset: offset, permission: permission, file: file)) }
    }
    func unmapAll() { entries.withLock { $0.removeAll() } }
}

/// Shared memory the test writes and the device maps: a memfd and the test's own mapping of it.
final class TestMemory: @unchecked Sendable {
    // @unchecked Sendable: the mapping is immutable; tests touch the bytes from one thread.
    let file: SharedFD
    let mapping: MemoryMapping
    var base: UnsafeMutableRawPointer { mapping.base }
    let size: Int

    init(size: Int) throws {
        let fd = try makeMemfd(name: "vduse-test", size: size)
        mapping = try MemoryMapping(fd: fd, offset: 0, length: size)
        file = SharedFD(fd)
        self.size = size
    }
}

var quietLogger: Logger {
    var l = Logger(label: "vduse-test")
    l.logLevel = .critical
    return l
}

/// Waits (at most 5 s) until `condition` holds; false if it never did.
func eventually(_ condition: () -> Bool) -> Bool {
    let deadline = Deadline(secondsFromNow: 5)
    while !condition() {
        if deadline.hasPassed { return false }
        CurrentThread.sleep(milliseconds: 1)
    }
    return true
}
