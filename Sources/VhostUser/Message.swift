/// The fixed 12-byte vhost-user header: request, flags, payload size (all little-endian u32).
public struct VhostUserHeader: Equatable, Sendable {
    public static let size = 12
    /// Largest payload this backend accepts; every request it handles fits well below it.
    public static let maxPayload = 4096

    public static let versionMask: UInt32 = 0x3
    public static let version: UInt32 = 0x1
    public static let replyFlag: UInt32 = 1 << 2
    public static let needReplyFlag: UInt32 = 1 << 3

    public var request: UInt32
    public var flags: UInt32
    public var size: UInt32

    public init(request: UInt32, flags: UInt32, size: UInt32) {
        self.request = request
        self.flags = flags
        self.size = size
    }

    public var needReply: Bool { flags & Self.needReplyFlag != 0 }

    public func encode() -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(Self.size)
        out.appendLE(request)
        out.appendLE(flags)
        out.appendLE(size)
        return out
    }
}

/// A validation failure: names the request and the field at fault.
public struct VhostUserError: Error, CustomStringConvertible, Equatable, Sendable {
    public enum Layer: String, Sendable {
        case header, body, fds, features, semantics
        /// The device or the relay could not apply what the message asked.
        case device
    }
    public let layer: Layer
    public let request: String
    public let field: String
    public let reason: String

    public init(_ layer: Layer, _ request: String, field: String, _ reason: String) {
        self.layer = layer
        self.request = request
        self.field = field
        self.reason = reason
    }

    public var description: String { "\(request): \(field): \(reason)" }
}

// MARK: payloads

public struct VringState: Equatable, Sendable {
    public var index: UInt32
    public var num: UInt32
    public init(index: UInt32, num: UInt32) { self.index = index; self.num = num }
}

public struct VringAddress: Equatable, Sendable {
    /// VHOST_VRING_F_LOG: log used-ring writes at `logGuestAddr`.
    public static let logFlag: UInt32 = 1 << 0
    public var index: UInt32
    public var flags: UInt32
    public var descUserAddr: UInt64
    public var usedUserAddr: UInt64
    public var availUserAddr: UInt64
    public var logGuestAddr: UInt64
    public init(index: UInt32, flags: UInt32, descUserAddr: UInt64, usedUserAddr: UInt64, availUserAddr: UInt64, logGuestAddr: UInt64) {
        self.index = index; self.flags = flags; self.descUserAddr = descUserAddr
        self.usedUserAddr = usedUserAddr; self.availUserAddr = availUserAddr; self.logGuestAddr = logGuestAddr
    }
}

public struct MemoryRegionDescription: Equatable, Sendable {
    public var guestPhysAddr: UInt64
    public var size: UInt64
    public var userAddr: UInt64
    public var mmapOffset: UInt64
    public init(guestPhysAddr: UInt64, size: UInt64, userAddr: UInt64, mmapOffset: UInt64) {
        self.guestPhysAddr = guestPhysAddr; self.size = size; self.userAddr = userAddr; self.mmapOffset = mmapOffset
    }
}

public struct LogDescription: Equatable, Sendable {
    public var size: UInt64
    public var offset: UInt64
    public init(size: UInt64, offset: UInt64) { self.size = size; self.offset = offset }
}

/// A decoded request body.
public enum VhostUserPayload: Equatable, Sendable {
    case none
    case u64(UInt64)
    case vringState(VringState)
    case vringAddress(VringAddress)
    case memoryTable([MemoryRegionDescription])
    case memoryRegion(MemoryRegionDescription)
    case log(LogDescription)
    /// SET_VRING_KICK/CALL/ERR: ring index and whether an fd accompanies it.
    case vringFile(index: UInt32, hasFD: Bool)
}

/// A whole decoded message (fds travel beside it, owned by the caller).
public struct VhostUserMessage: Equatable, Sendable {
    public var request: VhostUserRequest
    public var header: VhostUserHeader
    public var payload: VhostUserPayload
    public init(request: VhostUserRequest, header: VhostUserHeader, payload: VhostUserPayload) {
        self.request = request; self.header = header; self.payload = payload
    }
}

extension Array where Element == UInt8 {
    @inlinable mutating func appendLE(_ v: UInt32) {
        for i in 0..<4 { append(UInt8(truncatingIfNeeded: v >> (8 * UInt32(i)))) }
    }
    @inlinable mutating func appendLE(_ v: UInt64) {
        for i in 0..<8 { append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) }
    }
}

/// Little-endian reads from a byte buffer with bounds already checked by the caller.
struct LEReader {
    let bytes: UnsafeRawBufferPointer
    func u32(_ at: Int) -> UInt32 { UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: at, as: UInt32.self)) }
    func u64(_ at: Int) -> UInt64 { UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: at, as: UInt64.self)) }
}
