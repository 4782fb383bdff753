import Foundation
import Logging
import Platform
import Synchronization

/// The daemon: its ports and the control socket.
public final class Daemon: Sendable {
    public let ports: [Port]
    public let controlPath: String?
    private let control = Mutex<ControlServer?>(nil)
    private let logger: Logger

    public init(specs: [PortSpec], controlPath: String?, logger: Logger) throws {
        var seenIDs = Set<String>()
        var seenPaths = Set<String>()
        for s in specs {
            guard seenIDs.insert(s.id).inserted else { throw PortSpec.ParseError(message: "two ports are named '\(s.id)'") }
            guard seenPaths.insert(s.socketPath).inserted else {
                throw PortSpec.ParseError(message: "two ports use the socket \(s.socketPath)")
            }
        }
        ports = try specs.map { try Port(spec: $0, logger: logger) }
        self.controlPath = controlPath
        self.logger = logger
    }

    /// Binds every socket and starts every port; on failure nothing is left running.
    public func start(ownership: SocketOwnership = SocketOwnership()) throws {
        var started: [Port] = []
        do {
            if let controlPath {
                let server = try ControlServer(path: controlPath, logger: logger) { [weak self] req in
                    self?.handleControl(req) ?? ControlServer.encode(ControlErrorReply(ok: false, error: "daemon stopping"))
                }
                try server.start(ownership: ownership)
                control.withLock { $0 = server }
            }
            for p in ports {
                try p.start(ownership: ownership)
                started.append(p)
            }
        } catch {
            for p in started { p.stop() }
            control.withLock { $0 }?.stop()
            throw error
        }
    }

    public func stop() {
        for p in ports { p.stop() }
        let c = control.withLock { c -> ControlServer? in let x = c; c = nil; return x }
        c?.stop()
        logger.info("all ports closed")
    }

    public func status() -> DaemonStatus {
        DaemonStatus(ok: true, ports: ports.map(\.status))
    }

    func handleControl(_ req: ControlRequest) -> Data {
        switch req.command {
        case "status":
            return ControlServer.encode(status())
        default:
            return ControlServer.encode(ControlErrorReply(ok: false, error: "unknown command '\(req.command)'; known: status"))
        }
    }
}
