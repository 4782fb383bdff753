import Platform
import Virtio
import VhostUser

/// A reply (or any message) read from the backend: its header and payload bytes.
public struct Reply: Equatable, Sendable {
    public let header: VhostUserHeader
    public let payload: [UInt8]
    /// File descriptors that came with it (closed on arrival: no reply should carry any).
    public let fdCount: Int

    public init(header: VhostUserHeader, payload: [UInt8], fdCount: Int = 0) {
        self.header = header; self.payload = payload; self.fdCount = fdCount
    }

    public var request: VhostUserRequest? { VhostUserRequest(rawValue: header.request) }
    public var hasReplyFlag: Bool { header.flags & VhostUserHeader.replyFlag != 0 }
    /// The payload as a u64 (GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, REPLY_ACK status), if 8 bytes.
    public var u64: UInt64? {
        // Safety: the 8-byte read happens only when the payload has exactly 8 bytes.
        payload.count == 8 ? payload.withUnsafeBytes { VhostUserCodec.readU64($0) } : nil
    }
    /// The payload as a vring state (GET_VRING_BASE), if 8 bytes.
    public var vringState: VringState? {
        // Safety: both 4-byte reads happen only when the payload has exactly 8 bytes.
        payload.count == 8 ? payload.withUnsafeBytes { VringState(index: VhostUserCodec.readU32($0), num: VhostUserCodec.readU32($0, at: 4)) } : nil
    }
}

/// When the convenience steps set need_reply (only ever when REPLY_ACK was negotiated).
public enum AckPolicy: Sendable {
    /// As QEMU 7.2: SET_MEM_TABLE, ADD/REM_MEM_REG, and the logging switch-on (SET_FEATURES with
    /// LOG_ALL, SET_VRING_ADDR with the log flag). Without REPLY_ACK, the logging switch-on is
    /// followed by GET_FEATURES as a barrier, as QEMU's enforce_reply does.
    case likeQEMU
    /// need_reply on every request that has no reply of its own: errors surface at the request at fault.
    case always
    /// Never: pure fire-and-forget, as the oldest frontends.
    case never
}

/// The driver side of vhost-user: connects to (or accepts) a backend, sends requests, reads
/// replies, and keeps what a driver keeps: negotiated features, the memory table, the rings'
/// addresses and eventfds, the dirty log. Single-threaded: use it from one thread at a time.
public final class VhostUserFrontend {
    private let socket: FileDescriptor
    /// How long to wait for each reply.
    public var replyTimeout: Duration
    public var ackPolicy: AckPolicy = .likeQEMU

    /// GET_FEATURES's answer (0 until asked).
    public internal(set) var offeredFeatures: UInt64 = 0
    /// The device features last sent with SET_FEATURES, without VHOST_F_LOG_ALL.
    public internal(set) var ackedFeatures: UInt64 = 0
    /// Whether the last SET_FEATURES carried VHOST_F_LOG_ALL.
    public internal(set) var logAllSet = false
    public internal(set) var offeredProtocolFeatures: UInt64 = 0
    /// The protocol features last sent with SET_PROTOCOL_FEATURES.
    public internal(set) var ackedProtocolFeatures: UInt64 = 0
    /// GET_QUEUE_NUM's answer, when MQ was negotiated.
    public internal(set) var queueCount: UInt64?
    /// The regions the backend was last told about (SET_MEM_TABLE, ADD/REM_MEM_REG).
    public internal(set) var memoryTable: [GuestRAM] = []
    /// Rings set up with `setupVring`, by index.
    public internal(set) var rings: [UInt32: ConfiguredRing] = [:]
    /// The log shared with the last SET_LOG_BASE.
    public internal(set) var log: DirtyLogBuffer?
    /// The reply the backend sent to the last SET_LOG_BASE (its size tells u64 from empty).
    public internal(set) var lastLogBaseReply: Reply?

    init(socket: consuming FileDescriptor, replyTimeout: Duration) {
        self.socket = socket
        self.replyTimeout = replyTimeout
    }

    // MARK: connecting

    /// Connects to a backend listening at `path` (QEMU's default: backend is the server),
    /// retrying while the socket does not exist or does not listen yet.
    public convenience init(connectingTo path: String, timeout: Duration = .seconds(10),
                            replyTimeout: Duration = .seconds(5)) throws(FrontendError) {
        let deadline = ContinuousClock.now + timeout
        var last = "none"
        while true {
            do {
                let fd = try UnixSocket.connect(path: path)
                self.init(socket: fd, replyTimeout: replyTimeout)
                return
            } catch {
                switch error {
                case .system(let e) where [.noSuchFile, .connectionRefused, .wouldBlock].contains(e.code):
                    last = e.description
                case .pathTooLong:
                    throw .invalidArgument(error.description)
                default:
                    throw .connectTimedOut(path: path, seconds: 0, lastError: error.description)
                }
            }
            if ContinuousClock.now >= deadline {
                throw .connectTimedOut(path: path, seconds: timeout.seconds, lastError: last)
            }
            MonotonicClock.sleep(seconds: 0.01)
        }
    }

    /// Listens at `path` and accepts one backend (a backend in client mode, as with QEMU's
    /// `server=on`). A stale socket file is removed first; the file is removed again once a
    /// backend is connected.
    public static func acceptOne(listeningAt path: String, timeout: Duration = .seconds(10),
                                 replyTimeout: Duration = .seconds(5)) throws(FrontendError) -> VhostUserFrontend {
        do { try FileSystem.removeIfPresent(path) } catch { throw .system(error) }
        let listener: FileDescriptor
        do { listener = try UnixSocket.listen(path: path, backlog: 1) } catch { throw Self.mapSocket(error, during: "listening at \(path)") }
        let accepted: Result<FileDescriptor, FrontendError>
        do throws(FrontendError) {
            guard try waitReadable(listener.raw, timeout: timeout) else {
                throw .acceptTimedOut(path: path, seconds: timeout.seconds)
            }
            do { accepted = .success(try UnixSocket.accept(listener)) } catch { throw .system(error) }
        } catch {
            accepted = .failure(error)
        }
        // The socket file goes whatever happened, and a failure to remove it is reported.
        do { try FileSystem.removeIfPresent(path) } catch { throw .system(error) }
        return VhostUserFrontend(socket: try accepted.get(), replyTimeout: replyTimeout)
    }

    /// Shuts the connection down (both directions), as a frontend that goes away would; the fd
    /// itself closes when this object goes away.
    public func disconnect() {
        do { try UnixSocket.shutdown(socket) } catch {
            // ENOTCONN: the connection is already down, which is what was asked. Nothing else can
            // fail on a connected socket this object owns.
            precondition(error.code == .notConnected, "disconnect: \(error)")
        }
    }

    // MARK: the message API

    /// Sends `request` and reads its reply when there is one: requests that always have a reply
    /// (GET_*, and SET_LOG_BASE once LOG_SHMFD was negotiated), and any request sent with
    /// `needReply` once REPLY_ACK was negotiated (the reply is the u64 status; non-zero throws
    /// `.rejected`). Returns nil for requests without a reply. The need_reply flag is sent as
    /// asked even without REPLY_ACK; no reply is awaited then.
    @discardableResult
    public func request(_ request: VhostUserRequest, payload: VhostUserPayload = .none, fds: [Int32] = [],
                        needReply: Bool = false) throws(FrontendError) -> Reply? {
        let bytes = VhostUserCodec.encodeRequest(request, needReply: needReply, payload: payload)
        try send(bytes, fds: fds, during: "sending \(request.name)")
        let ownReply = request == .setLogBase ? ackedProtocolFeatures & VhostUserProtocolFeature.logShmfd != 0 : request.hasReply
        let ack = !ownReply && needReply && ackedProtocolFeatures & VhostUserProtocolFeature.replyAck != 0
        var reply: Reply?
        if ownReply || ack {
            let r = try readReply(timeout: replyTimeout, during: "waiting for the reply to \(request.name)")
            guard r.hasReplyFlag else {
                throw .malformedReply(request: request.name, reason: "reply flag not set (flags 0x\(String(r.header.flags, radix: 16)))")
            }
            guard r.header.request == request.rawValue else {
                let got = VhostUserRequest(rawValue: r.header.request)?.name ?? "request \(r.header.request)"
                throw .malformedReply(request: request.name, reason: "reply is for \(got)")
            }
            if ack {
                guard let status = r.u64 else {
                    throw .malformedReply(request: request.name, reason: "REPLY_ACK payload of \(r.payload.count) bytes, expected 8")
                }
                if status != 0 { throw .rejected(request: request.name, status: status) }
            }
            reply = r
        }
        noteAccepted(request, payload)
        return reply
    }

    /// Sends bytes as they are, with `fds` attached: for malformed or hostile messages.
    public func sendRaw(bytes: [UInt8], fds: [Int32] = []) throws(FrontendError) {
        try send(bytes, fds: fds, during: "sending raw bytes")
    }

    /// Reads one message from the backend (header, then `size` payload bytes), whatever it is.
    /// Throws `.backendClosed` on EOF and `.timedOut` when nothing complete arrives in time.
    public func readReply(timeout: Duration) throws(FrontendError) -> Reply {
        try readReply(timeout: timeout, during: "waiting for a message")
    }

    /// Whether the backend closes the connection within `timeout` (true) or stays connected (false).
    /// A message that arrives meanwhile is left unread and counts as "still connected".
    public func backendClosesConnection(within timeout: Duration) throws(FrontendError) -> Bool {
        guard try Self.waitReadable(socket.raw, timeout: timeout) else { return false }
        do { return try UnixSocket.peerState(socket) == .closed } catch { throw .system(error) }
    }

    // MARK: plumbing

    private func send(_ bytes: [UInt8], fds: [Int32], during: String) throws(FrontendError) {
        do {
            // Safety: the buffer pointer is used only inside the closure, by the synchronous sendmsg.
            try bytes.withUnsafeBytes { raw in try UnixSocket.send(socket, bytes: raw, fds: fds) }
        } catch {
            throw Self.mapAny(error, during: during)
        }
    }

    private func readReply(timeout: Duration, during: String) throws(FrontendError) -> Reply {
        do { try UnixSocket.setReceiveTimeout(socket, seconds: timeout.seconds) } catch { throw .system(error) }
        var fds = ReceivedFDs()
        let headerBytes: [UInt8]
        do {
            headerBytes = try receive(count: VhostUserHeader.size, fds: &fds)
        } catch { throw Self.mapAny(error, during: during, timeout: timeout) }
        // Safety: headerBytes holds exactly VhostUserHeader.size (12) bytes; reads stop at 12.
        let header = headerBytes.withUnsafeBytes { raw in
            VhostUserHeader(request: VhostUserCodec.readU32(raw), flags: VhostUserCodec.readU32(raw, at: 4),
                            size: VhostUserCodec.readU32(raw, at: 8))
        }
        guard header.size <= UInt32(VhostUserHeader.maxPayload) else {
            let name = VhostUserRequest(rawValue: header.request)?.name ?? "request \(header.request)"
            throw .malformedReply(request: name, reason: "payload size \(header.size) exceeds \(VhostUserHeader.maxPayload)")
        }
        let payload: [UInt8]
        do {
            payload = try receive(count: Int(header.size), fds: &fds)
        } catch { throw Self.mapAny(error, during: during, timeout: timeout) }
        let count = fds.count
        fds.closeAll()
        return Reply(header: header, payload: payload, fdCount: count)
    }

    private func receive(count: Int, fds: inout ReceivedFDs) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        if count == 0 { return out }
        // Safety: the buffer pointer is used only inside the closure, by the synchronous recvmsg.
        try out.withUnsafeMutableBytes { raw in try UnixSocket.receiveExactly(socket, into: raw, fds: &fds) }
        return out
    }

    static func waitReadable(_ fd: Int32, timeout: Duration) throws(FrontendError) -> Bool {
        do { return try Poll.waitReadable(fd, until: Deadline(secondsFromNow: timeout.seconds)) } catch { throw .system(error) }
    }

    static func mapSocket(_ error: SocketError, during: String, timeout: Duration? = nil) -> FrontendError {
        switch error {
        case .closed:
            return .backendClosed(during: during)
        case .system(let e) where e.code == .wouldBlock:
            return .timedOut(during: during, seconds: timeout?.seconds ?? 0)
        case .system(let e) where e.isPeerGone:
            return .backendClosed(during: during)
        case .system(let e):
            return .system(e)
        case .timedOut(_, let seconds, _, _):
            return .timedOut(during: during, seconds: timeout?.seconds ?? seconds)
        case .cancelled:
            return .backendClosed(during: during)
        case .truncatedControl, .tooManyFDs, .pathTooLong:
            return .malformedReply(request: during, reason: error.description)
        }
    }

    static func mapAny(_ error: any Error, during: String, timeout: Duration? = nil) -> FrontendError {
        if let e = error as? SocketError { return mapSocket(e, during: during, timeout: timeout) }
        if let e = error as? FrontendError { return e }
        if let e = error as? SystemError { return .system(e) }
        return .invalidArgument("\(during): \(error)")
    }

    /// Keeps the negotiated state in step with what the backend accepted, whichever API sent it.
    private func noteAccepted(_ request: VhostUserRequest, _ payload: VhostUserPayload) {
        switch (request, payload) {
        case (.setFeatures, .u64(let v)):
            ackedFeatures = v & ~VirtioFeature.vhostLogAll
            logAllSet = v & VirtioFeature.vhostLogAll != 0
        case (.setProtocolFeatures, .u64(let v)):
            ackedProtocolFeatures = v
        default:
            break
        }
    }
}
