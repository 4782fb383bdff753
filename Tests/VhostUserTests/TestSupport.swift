import Logging
import Platform
import XCTest
@testable import VhostUser
import Virtio

/// Drives a BackendSession in-process: each request is encoded, decoded through the codec's
/// layers exactly as the socket path does, then handled.
final class SessionDriver {
    let session: BackendSession

    init(queuePairs: Int = 2) {
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        session = BackendSession(config: BackendConfig(queuePairs: queuePairs, virtioFeatures: Self.offered), logger: logger)
    }

    /// Sends one request; returns the reply payload (nil when no reply was sent).
    @discardableResult
    func send(_ request: VhostUserRequest, _ payload: VhostUserPayload = .none, fds: [Int32] = [], needReply: Bool = false) throws -> [UInt8]? {
        let bytes = VhostUserCodec.encodeRequest(request, needReply: needReply, payload: payload)
        var received = ReceivedFDs(owning: fds)
        let message: VhostUserMessage = try bytes.withUnsafeBytes { raw in
            let (req, header) = try VhostUserCodec.decodeHeader(UnsafeRawBufferPointer(rebasing: raw[0..<12]))
            let body = UnsafeRawBufferPointer(rebasing: raw[12...])
            let payload = try VhostUserCodec.decodeBody(req, header: header, body: body, fdCount: received.count)
            return VhostUserMessage(request: req, header: header, payload: payload)
        }
        guard let reply = try session.handle(message, fds: &received) else { return nil }
        XCTAssertGreaterThanOrEqual(reply.count, 12)
        let flags = reply.withUnsafeBytes { VhostUserCodec.readU32(UnsafeRawBufferPointer($0), at: 4) }
        XCTAssertEqual(flags, VhostUserHeader.version | VhostUserHeader.replyFlag)
        return Array(reply[12...])
    }

    func u64(_ reply: [UInt8]?) -> UInt64? {
        guard let reply, reply.count == 8 else { return nil }
        return reply.withUnsafeBytes { VhostUserCodec.readU64(UnsafeRawBufferPointer($0)) }
    }

    /// What the session offers in these tests: a virtio-net device's split-ring set (the port
    /// takes it from its device) plus vhost-user's own bits.
    static let offered: UInt64 = VirtioFeature.version1 | VirtioNetFeature.mrgRxbuf | VirtioNetFeature.mq | VirtioNetFeature.mtu
        | VirtioFeature.ringEventIdx | VirtioFeature.ringIndirectDesc | VirtioNetFeature.guestAnnounce | BackendConfig.vhostUserFeatures

    /// Negotiates everything offered (protocol features first, as QEMU does).
    func negotiate(protocolFeatures: UInt64 = BackendConfig.offeredProtocolFeatures, features: UInt64 = SessionDriver.offered & ~VirtioFeatureBits.logAll) throws {
        try send(.setOwner)
        try send(.setProtocolFeatures, .u64(protocolFeatures))
        try send(.setFeatures, .u64(features))
    }
}

enum VirtioFeatureBits {
    static let logAll: UInt64 = 1 << 26
}

/// A memfd of `size` bytes, returned as a raw fd the caller hands over.
func memfd(_ size: Int) throws -> Int32 {
    try makeMemfd(name: "test-ram", size: size).take()
}

let testUserBase: UInt64 = 0x7f00_0000_0000

func region(gpa: UInt64, size: UInt64, uva: UInt64? = nil, offset: UInt64 = 0) -> MemoryRegionDescription {
    MemoryRegionDescription(guestPhysAddr: gpa, size: size, userAddr: uva ?? (testUserBase + gpa), mmapOffset: offset)
}

func assertRejected(_ layer: VhostUserError.Layer, field: String? = nil, file: StaticString = #filePath, line: UInt = #line,
                    _ body: () throws -> Void) {
    do {
        try body()
        XCTFail("expected a \(layer) rejection", file: file, line: line)
    } catch let e as VhostUserError {
        XCTAssertEqual(e.layer, layer, "\(e)", file: file, line: line)
        if let field { XCTAssertTrue(e.field.contains(field), "field '\(e.field)' should name '\(field)': \(e)", file: file, line: line) }
    } catch {
        XCTFail("unexpected error \(error)", file: file, line: line)
    }
}
