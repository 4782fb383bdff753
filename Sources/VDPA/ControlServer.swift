#if canImport(Glibc)
import Glibc
#endif
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

/// The control socket: one JSON request per line in, one JSON reply per line out.
public final class ControlServer: Sendable {
    public let path: String
    private let logger: Logger
    private let handler: @Sendable (ControlRequest) -> Data
    private let wake: SharedFD
    private let thread = Mutex<OSThread?>(nil)
    static let maxLine = 64 * 1024

    public init(path: String, logger: Logger, handler: @escaping @Sendable (ControlRequest) -> Data) throws(SystemError) {
        self.path = path
        self.logger = logger
        self.handler = handler
        wake = SharedFD(try EventFD.make())
    }

    public func start(ownership: SocketOwnership) throws {
        try prepareSocketPath(path)
        let listener: SharedFD
        do { listener = SharedFD(try UnixSocket.listen(path: path)) } catch {
            throw SocketPathError(message: "cannot listen on control socket \(path): \(error)")
        }
        try applyOwnership(path, ownership)
        let t = try OSThread(name: "control") { [self] in run(listener) }
        thread.withLock { $0 = t }
        logger.info("control socket at \(path)")
    }

    public func stop() {
        EventFD.signal(wake.raw)
        let t = thread.withLock { t -> OSThread? in let x = t; t = nil; return x }
        t?.join()
    }

    /// Encodes a reply (or an error) as one line.
    public static func encode<T: Encodable>(_ value: T) -> Data {
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        var d = (try? enc.encode(value)) ?? Data(#"{"ok":false,"error":"encoding failed"}"#.utf8)
        d.append(0x0A)
        return d
    }

    private func run(_ listener: SharedFD) {
        guard let epoll = try? Epoll(capacity: 16) else { return }
        try? epoll.add(wake.raw, token: 0)
        try? epoll.add(listener.raw, token: 1)
        var clients: [Int32: (SharedFD, [UInt8])] = [:]
        var running = true
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
        defer { buffer.deallocate() }
        while running {
            _ = try? epoll.wait(timeoutMillis: -1) { ev in
                if ev.token == 0 { running = false; return }
                if ev.token == 1 {
                    guard let fd = try? listener.withFD({ l throws(SystemError) in try UnixSocket.accept(l) }) else { return }
                    let shared = SharedFD(fd)
                    if (try? epoll.add(shared.raw, token: UInt64(shared.raw) + 2)) != nil {
                        clients[shared.raw] = (shared, [])
                    }
                    return
                }
                let raw = Int32(ev.token - 2)
                guard let (client, oldPending) = clients[raw] else { return }
                let n = read(raw, buffer.baseAddress, buffer.count)
                if n <= 0 {
                    epoll.remove(raw)
                    clients[raw] = nil
                    return
                }
                var pending = oldPending
                pending.append(contentsOf: buffer[0..<n])
                while let nl = pending.firstIndex(of: 0x0A) {
                    let line = Array(pending[..<nl])
                    pending.removeSubrange(...nl)
                    let reply: Data
                    if let req = try? JSONDecoder().decode(ControlRequest.self, from: Data(line)) {
                        reply = handler(req)
                    } else {
                        reply = Self.encode(ControlErrorReply(ok: false, error: "malformed request: expected one JSON object like {\"command\":\"status\"} per line"))
                    }
                    do { try client.withFD { fd throws(SocketError) in try UnixSocket.send(fd, Array(reply)) } } catch {
                        pending.removeAll()
                        break
                    }
                }
                if pending.count > Self.maxLine {
                    logger.warning("control client sent a line over \(Self.maxLine) bytes; closing it")
                    epoll.remove(raw)
                    clients[raw] = nil
                    return
                }
                clients[raw] = (client, pending)
            }
        }
        for (raw, _) in clients { epoll.remove(raw) }
        clients.removeAll()
        unlink(path)
    }
}

/// Client side of the control socket (used by vdpactl and tests).
public enum ControlClient {
    public static func request(_ command: String, controlPath: String, timeoutSeconds: Int = 5) throws -> Data {
        let fd = try UnixSocket.connect(path: controlPath)
        UnixSocket.setReceiveTimeout(fd, seconds: timeoutSeconds)
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
