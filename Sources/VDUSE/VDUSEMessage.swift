/// The control messages of a VDUSE device (/dev/vduse/NAME): the kernel's requests, read(2) one
/// at a time, and the device's responses, written back. Pure, so tests pin the bytes; the offsets
/// are struct vduse_dev_request's and vduse_dev_response's (linux/vduse.h; VDUSEMessageTests
/// checks them against the C header).
public enum VDUSEMessage {
    /// sizeof(struct vduse_dev_request) and sizeof(struct vduse_dev_response).
    public static let requestSize = 152
    public static let responseSize = 152

    /// VDUSE_SET_STATUS's status bits (virtio_config.h).
    public static let statusDriverOK: UInt8 = 4

    /// What the kernel asks.
    public enum Request: Equatable, Sendable {
        /// VDUSE_GET_VQ_STATE: the ring's next avail index (split rings).
        case getQueueState(index: UInt32)
        /// VDUSE_SET_STATUS: the driver wrote the device status (0 = reset).
        case setStatus(UInt8)
        /// VDUSE_UPDATE_IOTLB: mappings in [start, last] changed; look them up again.
        case updateIOTLB(start: UInt64, last: UInt64)
        /// A request type this device does not know: it is answered FAILED.
        case unknown(type: UInt32)
    }

    public struct Decoded: Equatable, Sendable {
        public var id: UInt32
        public var request: Request
    }

    /// Decodes one request; nil when `bytes` is not one whole request.
    public static func decode(_ bytes: UnsafeRawBufferPointer) -> Decoded? {
        guard bytes.count == requestSize else { return nil }
        // Safety: every field read below ends by byte 40 of the 152 checked above.
        func u32(_ o: Int) -> UInt32 { UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: o, as: UInt32.self)) }
        func u64(_ o: Int) -> UInt64 { UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: o, as: UInt64.self)) }
        let type = u32(0)
        let request: Request
        switch type {
        case 0: request = .getQueueState(index: u32(24))
        case 1: request = .setStatus(bytes[24])
        case 2: request = .updateIOTLB(start: u64(24), last: u64(32))
        default: request = .unknown(type: type)
        }
        return Decoded(id: u32(4), request: request)
    }

    /// Encodes a response: `ok` gives VDUSE_REQ_RESULT_OK, else FAILED; `availIndex` answers
    /// VDUSE_GET_VQ_STATE for ring `queue` (split state). Reserved words stay zero (the kernel
    /// refuses a response whose reserved words are not).
    public static func response(id: UInt32, ok: Bool, queue: UInt32 = 0, availIndex: UInt16 = 0) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: responseSize)
        func put32(_ v: UInt32, _ o: Int) { for i in 0..<4 { out[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) } }
        put32(id, 0)
        put32(ok ? 0 : 1, 4)
        put32(queue, 24)
        out[28] = UInt8(availIndex & 0xff)
        out[29] = UInt8(availIndex >> 8)
        return out
    }
}
