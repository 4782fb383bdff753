import Foundation
import Logging
import Platform
import Synchronization

/// A request on the control socket: one JSON object per line, e.g. `{"command":"status"}`.
public struct ControlRequest: Codable, Sendable {
    public var command: String
    public init(command: String) { self.command = command }
}

public struct ControlErrorReply: Codable, Sendable {
    public var ok: Bool
    public var error: String
}

/// Limits and permissions of the control socket (`--control-mode`, `--control-group`,
/// `--control-max-clients`, `--control-idle-timeout`).
public struct ControlOptions: Sendable, Equatable {
    /// Mode and group of the control socket; independent of the ports' `--socket-mode`.
    public var ownership: SocketOwnership
    /// Clients connected at once; one more gets an error line and is closed.
    public var maxClients: Int
    /// A client that sends nothing for this long is closed.
    public var idleTimeoutSeconds: Double
    /// Reply bytes a client may leave unread; a client over it is closed.
    public var maxUnreadReplyBytes: Int

    public static let defaultMode: FileMode = 0o600

    public init(ownership: SocketOwnership = SocketOwnership(mode: ControlOptions.defaultMode), maxClients: Int = 16,
                idleTimeoutSeconds: Double = 30, maxUnreadReplyBytes: Int = 1 << 20) {
        self.ownership = ownership
        self.maxClients = maxClients
        self.idleTimeoutSeconds = idleTimeoutSeconds
        self.maxUnreadReplyBytes = maxUnreadReplyBytes
    }
}

/// The control socket: one JSON request per line in, one JSON reply per line out.
/// One thread serves every client and never blocks on one: replies go out without blocking
/// (what the client does not take yet waits in a bounded buffer), clients beyond
/// `maxClients` are refused with an error line, and idle clients are closed.
public final class ControlServer: Sendable {
    public let path: String
    public let options: ControlOptions
    private let logger: Logger
    private let handler: @Sendable (ControlRequest) -> Data
    private let wake: SharedFD
    private let thread = Mutex<OSThread?>(nil)
    static let maxLine = 64 * 1024

    public init(path: String, logger: Logger, options: ControlOptions = ControlOptions(),
                handler: @escaping @Sendable (ControlRequest) -> Data) throws(SystemError) {
        self.path = path
        self.logger = logger
        self.options = options
        self.handler = handler
        wake = SharedFD(try EventFD.make())
    }

    /// Binds the control socket with `options.ownership` and starts its thread.
    public func start() throws {
        let (listener, file) = try createListeningSocket(path, ownership: options.ownership)
        let t = try OSThread(name: "control") { [self] in
            run(listener)
            file.remove()
        }
        thread.withLock { $0 = t }
        logger.info("control socket at \(path) (mode 0\(String(options.ownership.mode ?? 0o777, radix: 8)), at most \(options.maxClients) clients)")
    }

    public func stop() {
        EventFD.signal(wake.raw)
        let t = thread.withLock { t -> OSThread? in let x = t; t = nil; return x }
        t?.join()
    }

    /// Encodes a reply (or an error) as one line. A reply that cannot be encoded (a non-finite
    /// number in it, say) becomes an error line that says why, so the client is never left waiting.
    public static func encode<T: Encodable>(_ value: T) -> Data {
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        var d: Data
        do { d = try enc.encode(value) } catch {
            // Kept to characters that need no escaping, so that this line is valid JSON whatever the error says.
            let why = String(String.UnicodeScalarView(summary(error).unicodeScalars.filter {
                $0.isASCII && $0.value >= 0x20 && $0 != "\"" && $0 != "\\"
            }))
            d = Data(#"{"error":"the daemon could not encode its reply: \#(why)","ok":false}"#.utf8)
        }
        d.append(0x0A)
        return d
    }

    /// What went wrong in a JSON encoding or decoding, in a line (not the whole coding path dump).
    static func summary(_ error: any Error) -> String {
        switch error {
        case DecodingError.dataCorrupted(let c): return c.debugDescription
        case DecodingError.keyNotFound(let key, _): return "no \"\(key.stringValue)\" field"
        case DecodingError.typeMismatch(_, let c), DecodingError.valueNotFound(_, let c): return c.debugDescription
        case EncodingError.invalidValue(_, let c): return c.debugDescription
        default: return "\(error)"
        }
    }

    private static let wakeToken: UInt64 = 0
    private static let listenerToken: UInt64 = 1

    /// One client: bytes of a request line not complete yet, replies the client has not taken yet.
    private struct Client {
        let fd: SharedFD
        var input: [UInt8] = []
        var output: [UInt8] = []
        var lastHeard: UInt64
        var watchingWritable = false
    }

    private func run(_ listener: SharedFD) {
        let epoll: Epoll
        do { epoll = try Epoll(capacity: 16) } catch {
            logger.error("control socket loop cannot start: \(error)")
            return
        }
        do {
            try epoll.add(wake.raw, token: Self.wakeToken)
            try epoll.add(listener.raw, token: Self.listenerToken)
        } catch {
            logger.error("control socket loop cannot start: \(error)")
            return
        }
        var clients: [Int32: Client] = [:]
        var running = true
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
        defer { buffer.deallocate() }
        // Clamped (1 ms to a year; NaN means the default) so that no value can trap the conversion.
        let idle = options.idleTimeoutSeconds.isNaN ? 30 : max(0.001, min(options.idleTimeoutSeconds, 365 * 86400))
        let idleNanos = UInt64(idle * 1e9)

        func close(_ raw: Int32, _ why: String?) {
            if let why { logger.warning("control client closed: \(why)") }
            epoll.remove(raw)
            clients[raw] = nil
        }

        /// Hands queued replies to the socket without blocking; watches for room when some are left.
        func flush(_ raw: Int32) {
            guard var c = clients[raw] else { return }
            while !c.output.isEmpty {
                let sent: Int
                do {
                    sent = try c.fd.withFD { fd throws(SocketError) in try UnixSocket.sendAvailable(fd, c.output) }
                } catch {
                    close(raw, nil)  // the client went away
                    return
                }
                if sent == 0 { break }
                c.output.removeFirst(sent)
            }
            if c.output.count > options.maxUnreadReplyBytes {
                close(raw, "it left more than \(options.maxUnreadReplyBytes) bytes of replies unread")
                return
            }
            let wantWritable = !c.output.isEmpty
            if wantWritable != c.watchingWritable {
                do {
                    try epoll.modify(raw, events: Epoll.readable | Epoll.readHangup | (wantWritable ? Epoll.writable : 0),
                                     token: UInt64(raw) + 2)
                } catch {
                    close(raw, "\(error)")
                    return
                }
                c.watchingWritable = wantWritable
            }
            clients[raw] = c
        }

        func accept() {
            let fd: FileDescriptor
            do { fd = try listener.withFD { l throws(SystemError) in try UnixSocket.accept(l) } } catch {
                logger.warning("control socket accept: \(error)")
                return
            }
            if clients.count >= options.maxClients {
                logger.warning("refused a control client: \(options.maxClients) already connected (--control-max-clients)")
                let line = Self.encode(ControlErrorReply(ok: false, error: "too many control clients (limit \(options.maxClients)); try again later"))
                do { _ = try UnixSocket.sendAvailable(fd, Array(line)) } catch {
                    logger.debug("refused control client went away first: \(error)")
                }
                return
            }
            let raw = fd.raw
            let shared = SharedFD(fd)
            do { try epoll.add(raw, events: Epoll.readable | Epoll.readHangup, token: UInt64(raw) + 2) } catch {
                logger.warning("cannot watch a control client: \(error)")
                return
            }
            clients[raw] = Client(fd: shared, lastHeard: MonotonicClock.nanoseconds)
        }

        func readFrom(_ raw: Int32) {
            guard var c = clients[raw] else { return }
            let n: Int?
            do { n = try c.fd.withFD { fd throws(SocketError) in try UnixSocket.receiveAvailable(fd, into: buffer) } } catch {
                close(raw, nil)
                return
            }
            guard let n else { return }  // nothing yet
            if n == 0 { close(raw, nil); return }
            c.input.append(contentsOf: buffer[0..<n])
            while let nl = c.input.firstIndex(of: 0x0A) {
                // Only a whole request counts as activity: a client that trickles a line one byte
                // at a time is closed after the idle timeout like a silent one.
                c.lastHeard = MonotonicClock.nanoseconds
                let line = Array(c.input[..<nl])
                c.input.removeSubrange(...nl)
                let reply: Data
                do {
                    reply = handler(try JSONDecoder().decode(ControlRequest.self, from: Data(line)))
                } catch {
                    reply = Self.encode(ControlErrorReply(ok: false, error: "malformed request (\(Self.summary(error))): expected one JSON object like {\"command\":\"status\"} per line"))
                }
                c.output.append(contentsOf: reply)
            }
            if c.input.count > Self.maxLine {
                close(raw, "it sent a line over \(Self.maxLine) bytes")
                return
            }
            clients[raw] = c
            flush(raw)
        }

        while running {
            // Wake up for the first client to reach its idle timeout.
            var timeout: Int32 = -1
            if let oldest = clients.values.map(\.lastHeard).min() {
                let now = MonotonicClock.nanoseconds
                let due = oldest &+ idleNanos
                timeout = due <= now ? 0 : Int32(clamping: (due - now + 999_999) / 1_000_000)
            }
            do {
                try epoll.wait(timeoutMillis: timeout) { ev in
                    switch ev.token {
                    case Self.wakeToken: running = false
                    case Self.listenerToken: accept()
                    default:
                        let raw = Int32(truncatingIfNeeded: ev.token - 2)
                        if ev.writable { flush(raw) }
                        if ev.readable || ev.hangup { readFrom(raw) }
                    }
                }
            } catch {
                logger.error("control socket: \(error)")
                running = false
            }
            let now = MonotonicClock.nanoseconds
            for (raw, c) in clients where now &- c.lastHeard >= idleNanos {
                close(raw, "idle for \(options.idleTimeoutSeconds) s (--control-idle-timeout)")
            }
        }
        for raw in clients.keys { epoll.remove(raw) }
        clients.removeAll()
    }
}

/// Client side of the control socket (used by vdpactl and tests).
public enum ControlClient {
    public static func request(_ command: String, controlPath: String, timeoutSeconds: Int = 5) throws -> Data {
        let fd = try UnixSocket.connect(path: controlPath)
        try UnixSocket.setReceiveTimeout(fd, seconds: Double(timeoutSeconds))
        let line = ControlServer.encode(ControlRequest(command: command))
        try UnixSocket.send(fd, Array(line))
        var out: [UInt8] = []
        var fds = ReceivedFDs()
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 8)
        defer { buf.deallocate() }
        while !out.contains(0x0A) {
            let n = try UnixSocket.receive(fd, into: buf, fds: &fds)
            if n == 0 { break }
            out.append(contentsOf: buf[0..<n])
        }
        fds.closeAll()
        guard let nl = out.firstIndex(of: 0x0A) else { throw SocketError.closed(partial: out.count) }
        return Data(out[..<nl])
    }
}
