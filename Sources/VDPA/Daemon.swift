import Foundation
import DeviceFramework
import Logging
import Platform
import Relay
import Synchronization

/// The daemon: its ports and the control socket.
public final class Daemon: Sendable {
    public let ports: [Port]
    public let controlPath: String?
    public let controlOptions: ControlOptions
    private let control = Mutex<ControlServer?>(nil)
    private let logger: Logger

    public typealias DeviceFactory = (PortSpec) throws -> (any VDPADevice)?

    /// `makeDevice` creates each port's device (nil: a port with no device, control path only).
    public init(specs: [PortSpec], controlPath: String?, logger: Logger, options: PortOptions = PortOptions(),
                controlOptions: ControlOptions = ControlOptions(), makeDevice: DeviceFactory = { _ in nil }) throws {
        var seenIDs = Set<String>()
        var seenPaths = Set<String>()
        for s in specs {
            guard seenIDs.insert(s.id).inserted else { throw PortSpec.ParseError(message: "two ports are named '\(s.id)'") }
            guard seenPaths.insert(s.socketPath).inserted else {
                throw PortSpec.ParseError(message: "two ports use the socket \(s.socketPath)")
            }
        }
        var made: [Port] = []
        do {
            for s in specs {
                let device = try makeDevice(s)
                if let device { try Self.checkMigrationSupport(s, device) }
                made.append(try Port(spec: s, device: device, options: options, logger: logger))
            }
        } catch {
            for p in made { p.device?.close() }
            throw error
        }
        ports = made
        self.controlPath = controlPath
        self.controlOptions = controlOptions
        self.logger = logger
    }

    /// Binds every socket and starts every port; on failure nothing is left running.
    /// `ownership` is the ports' (`--socket-group`, `--socket-mode`); the control socket has its
    /// own, in `controlOptions`.
    /// A port's `migration=` must be one its device can do: refused when the port is made, not
    /// when a migration starts.
    static func checkMigrationSupport(_ spec: PortSpec, _ device: any VDPADevice) throws {
        if spec.migration.method == .iommuDirty && device.dirtyTracking == nil {
            device.close()
            throw PortSpec.ParseError(message: "port '\(spec.id)': migration=iommu-dirty needs a device whose IOMMU tracks dirty pages, and \(device.summary) has none; use migration=relay (the default)")
        }
        if spec.migration.method == .relay && spec.migration.relay == .availUsed && !device.canRedirectAvailRing {
            device.close()
            throw PortSpec.ParseError(message: "port '\(spec.id)': relay=avail+used needs a device that can move a running ring's avail ring and doorbell, and \(device.summary) cannot; use relay=used (the default)")
        }
    }

    public func start(ownership: SocketOwnership = SocketOwnership()) throws {
        var started: [Port] = []
        do {
            if let controlPath {
                let server = try ControlServer(path: controlPath, logger: logger, options: controlOptions) { [weak self] req in
                    self?.handleControl(req) ?? ControlServer.encode(ControlErrorReply(ok: false, error: "daemon stopping"))
                }
                try server.start()
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
        for p in ports { p.requestStop() }
        for p in ports { p.stop() }
        let c = control.withLock { c -> ControlServer? in let x = c; c = nil; return x }
        c?.stop()
        logger.info("all ports closed")
    }

    public func status() -> DaemonStatus {
        DaemonStatus(ok: true, ports: ports.map(\.status))
    }

    public func stats() -> DaemonStats {
        DaemonStats(ok: true, ports: ports.map { p in
            let st = p.status
            let counters = p.device?.counters() ?? []
            let mig = p.migration.snapshot
            let relay = p.migration.relay.withLock { $0 }
            let busy = relay?.busyNanos.load(ordering: .relaxed) ?? 0
            let moved = relay?.busyElements.load(ordering: .relaxed) ?? 0
            // Every queue of the port, whether or not its device counts it.
            let indices = Array(0..<(2 * p.config.queuePairs))
            return PortStats(id: p.spec.id, device: st.device, queues: indices.map { i in
                let counted = counters.first { $0.index == i }
                let c = counted ?? QueueCounters(index: i)
                let m = mig[c.index]
                let running = st.queues.indices.contains(c.index) && st.queues[c.index].started
                return QueueStats(index: c.index, direction: c.index % 2 == 0 ? "rx" : "tx",
                           mode: running ? (m?.mode ?? .direct).rawValue : "stopped",
                           packets: c.packets, bytes: c.bytes, drops: c.drops, faults: c.faults, error: c.error,
                           interrupts: c.interrupts, doorbells: c.doorbells,
                           relayed: m?.counters?.relayed.load(ordering: .relaxed) ?? 0,
                           pagesMarked: m?.counters?.pagesMarked.load(ordering: .relaxed) ?? 0,
                           switchovers: m?.switchovers ?? 0, lastSwitchoverGapMicros: m?.lastSwitchoverGapMicros ?? 0,
                           deviceCounters: counted != nil,
                           relayErrors: m?.counters?.errors.load(ordering: .relaxed) ?? 0,
                           rejectedChains: m?.counters?.rejectedChains.load(ordering: .relaxed) ?? 0)
            }, relay: relay.map { r in
                RelayStats(loop: r.mode.rawValue, cpuMillis: r.cpuNanos.load(ordering: .relaxed) / 1_000_000,
                           busyNanos: busy, busyElements: moved,
                           busyNanosPerElement: moved > 0 ? Double(busy) / Double(moved) : 0)
            }, logAllReplies: p.migration.logAllReplies.withLock { $0 },
               dirtyTracking: p.migration.dirtyTracking.withLock { $0 })
        })
    }

    func handleControl(_ req: ControlRequest) -> Data {
        switch req.command {
        case "status":
            return ControlServer.encode(status())
        case "stats":
            return ControlServer.encode(stats())
        default:
            return ControlServer.encode(ControlErrorReply(ok: false, error: "unknown command '\(req.command)'; known: status, stats"))
        }
    }
}
