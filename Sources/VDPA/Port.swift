import DeviceFramework
import Logging
import Platform
import Relay
import Synchronization
import VhostUser
import Virtio

/// Daemon-wide settings every port uses.
public struct PortOptions: Sendable {
    public var relayLoop: RelayLoopMode
    public var testSwitches: TestSwitches
    public init(relayLoop: RelayLoopMode = .hybrid, testSwitches: TestSwitches = TestSwitches()) {
        self.relayLoop = relayLoop
        self.testSwitches = testSwitches
    }
}

/// A port binds one vhost-user socket to one device instance. Each port runs its own thread, so
/// a frontend that misbehaves (or stalls mid-message) affects only its own port.
public final class Port: Sendable {
    public let spec: PortSpec
    public let config: BackendConfig
    public let device: (any VDPADevice)?
    public let options: PortOptions
    public let migration = MigrationStatsTable()
    private let logger: Logger
    private let state: Mutex<PortStatus>
    private let wake: SharedFD
    private let thread = Mutex<OSThread?>(nil)

    /// How long a frontend may take to send a whole message, from its first byte (a deadline
    /// for the message, not per read: bytes that trickle in do not extend it).
    static let messageTimeoutSeconds = 5.0
    /// How long a reply may wait for the frontend to make room for it; a frontend that does
    /// not read its replies is disconnected after this, not allowed to hold the port thread.
    static let replyTimeoutSeconds = 5.0
    /// SCHED_FIFO priority for answering a LOG_ALL toggle (above the event relay loop's 1).
    static let logToggleRealTimePriority: Int32 = 2
    /// The shortest interval between two LOG_ALL toggles answered at real-time priority.
    static let logToggleBoostIntervalNanos: UInt64 = 100_000_000

    public init(spec: PortSpec, device: (any VDPADevice)?, options: PortOptions = PortOptions(), logger: Logger) throws(SystemError) {
        self.spec = spec
        self.device = device
        self.options = options
        // A device offers at most its own queue pairs; a kernel device offers them all unless
        // `queues=` asked for fewer (vdpad refuses more than it has).
        let pairs = device.map { spec.queuesGiven ? min(spec.queuePairs, $0.queuePairs) : $0.queuePairs } ?? spec.queuePairs
        config = Self.backendConfig(queuePairs: pairs, device: device, featureMask: spec.featureMask)
        var l = logger
        l[metadataKey: "port"] = "\(spec.id)"
        self.logger = l
        if let limit = spec.featureLimitDescription {
            l.info("\(limit): offers \(describeFeatures(config.virtioFeatures))")
        }
        for warning in Self.featureWarnings(spec: spec, device: device, config: config) { l.warning("\(warning)") }
        var initial = PortStatus(spec: spec, config: config)
        if let device { initial.device = device.summary }
        state = Mutex(initial)
        wake = SharedFD(try EventFD.make())
    }

    /// What a port offers: it asks its device, and offers the device's features the relay can
    /// migrate and `featureMask` (the port's `features=` and `offloads=`) allows, plus vhost-user's
    /// own bits, which no mask removes (a port without a device offers the migratable set).
    /// Guest memory stays below the IOVA range the daemon maps its own rings in.
    public static func backendConfig(queuePairs: Int, device: (any VDPADevice)?, featureMask: UInt64 = ~0) -> BackendConfig {
        BackendConfig(queuePairs: queuePairs,
                      virtioFeatures: ((device?.virtioFeatures ?? VirtioNetFeatureSet.migratable) & VirtioNetFeatureSet.migratable & featureMask)
                          | BackendConfig.vhostUserFeatures,
                      guestPhysLimit: reservedIOVABase)
    }

    /// What the operator asked for that the port will not give (logged as warnings at start):
    /// features in the `features=` list (and not withheld by `offloads=off`) that the port does
    /// not offer, because the device lacks them or the relay cannot migrate them, and several
    /// queue pairs without MQ.
    static func featureWarnings(spec: PortSpec, device: (any VDPADevice)?, config: BackendConfig) -> [String] {
        guard let list = spec.featureLimit, let limit = spec.featureLimitDescription else { return [] }
        var out: [String] = []
        let missing = list & spec.featureMask & ~config.virtioFeatures
        let deviceHas = device?.virtioFeatures ?? VirtioNetFeatureSet.migratable
        var reasons: [String] = []
        if missing & ~deviceHas != 0 { reasons.append("\(describeFeatures(missing & ~deviceHas)) (missing from the device)") }
        if missing & deviceHas != 0 { reasons.append("\(describeFeatures(missing & deviceHas)) (outside what the migration relay supports)") }
        if !reasons.isEmpty { out.append("\(limit): the port will not offer \(reasons.joined(separator: " or "))") }
        if config.queuePairs > 1 && config.virtioFeatures & VirtioNetFeature.mq == 0 {
            out.append("\(limit): the port does not offer MQ: the guest can use only one of its \(config.queuePairs) queue pairs")
        }
        return out
    }

    public var status: PortStatus {
        var s = state.withLock { $0 }
        s.deviceDetails = device?.details
        return s
    }

    /// Binds the socket (server mode) and starts the port's thread. Errors here are start-up
    /// errors: the socket path cannot be used.
    public func start(ownership: SocketOwnership = SocketOwnership()) throws {
        var listener: SharedFD?
        var socketFile: SocketFile?
        if !spec.client {
            (listener, socketFile) = try createListeningSocket(spec.socketPath, ownership: ownership)
            logger.info("listening on \(spec.socketPath) (\(spec.queuePairs) queue pair(s))")
        } else {
            logger.info("client mode: connecting to \(spec.socketPath)")
        }
        let boundListener = listener, boundFile = socketFile
        let t = try OSThread(name: "port-\(spec.id)") { [self] in
            run(listener: boundListener)
            boundFile?.remove()
        }
        thread.withLock { $0 = t }
    }

    /// Asks the port's thread to close (without waiting): the daemon asks every port at once,
    /// then waits for each, so ports that take long to stop do not add up.
    public func requestStop() { EventFD.signal(wake.raw) }

    /// Closes the connection and the socket, and waits for the port's thread.
    public func stop() {
        EventFD.signal(wake.raw)
        let t = thread.withLock { t -> OSThread? in let x = t; t = nil; return x }
        t?.join()
    }

    // MARK: the port loop (runs on the port's own thread)

    private enum Token: UInt64 { case wake = 0, listener = 1, connection = 2, memoryFault = 3 }

    private func run(listener: SharedFD?) {
        let epoll: Epoll
        do { epoll = try Epoll(capacity: 8) } catch {
            logger.error("port loop cannot start: \(error)")
            return
        }
        do {
            try epoll.add(wake.raw, token: Token.wake.rawValue)
            if let listener { try epoll.add(listener.raw, token: Token.listener.rawValue) }
        } catch {
            logger.error("port loop cannot start: \(error)")
            return
        }
        let reader = MessageReader()
        let binding = device.map {
            DeviceBinding(device: $0, portID: spec.id, relayMode: options.relayLoop, options: spec.migration, migration: migration,
                          testSwitches: options.testSwitches, logger: logger)
        }
        var connection: SharedFD?
        var session: BackendSession?
        var backoffMillis: Int32 = 0
        /// When the last LOG_ALL toggle was answered at real-time priority (see serveOne).
        var lastBoostNanos: UInt64 = 0
        var running = true
        var tryConnectPending = false

        func attach(_ fd: consuming FileDescriptor) {
            let shared = SharedFD(fd)
            // Signalled by the SIGBUS guard if the frontend shrinks a file the session mapped.
            let fault: SharedFD
            do {
                fault = SharedFD(try EventFD.make())
                try epoll.add(shared.raw, events: Epoll.readable | Epoll.readHangup, token: Token.connection.rawValue)
                do { try epoll.add(fault.raw, token: Token.memoryFault.rawValue) } catch {
                    epoll.remove(shared.raw)
                    throw error
                }
            } catch {
                logger.error("cannot watch the new connection: \(error)")
                return
            }
            connection = shared
            session = BackendSession(config: config, logger: logger, faultNotify: fault)
            session?.hooks = binding
            state.withLock {
                $0.connection = "connected"
                $0.connections += 1
                $0.lastError = nil
            }
            logger.info("frontend connected")
        }

        func detach(reason: String, isError: Bool) {
            if isError { logger.error("closing connection: \(reason)") } else { logger.info("frontend disconnected") }
            if let f = session?.faultNotify { epoll.remove(f.raw) }
            session?.close()
            session = nil
            if let c = connection { epoll.remove(c.raw) }
            connection = nil
            let role = spec.client
            state.withLock {
                $0.clearSession(spec: spec, config: config)
                $0.connection = role ? "connecting" : "listening"
                if isError { $0.lastError = reason }
            }
        }

        func serveOne() {
            guard let c = connection, let s = session else { return }
            var fds = ReceivedFDs()
            let message: VhostUserMessage
            do {
                // The first byte is there (epoll said so): the whole message is due by the deadline.
                let deadline = Deadline(secondsFromNow: Self.messageTimeoutSeconds)
                message = try c.withFD { fd throws(MessageReader.ReadError) in
                    try reader.read(from: fd, fds: &fds, deadline: deadline, cancel: wake.raw)
                }
            } catch {
                switch error {
                case .socket(.closed(partial: 0)): detach(reason: "peer closed", isError: false)
                case .socket(.cancelled): detach(reason: "daemon stopping", isError: false)
                case .socket(.timedOut): detach(reason: "no whole message within the deadline: \(error)", isError: true)
                default: detach(reason: "\(error)", isError: true)
                }
                return
            }
            logger.trace("\(message.request.name) \(message.payload)")
            let received = MonotonicClock.nanoseconds
            let loggingBefore = s.ackedFeatures & VirtioFeature.vhostLogAll
            do {
                // A LOG_ALL toggle is answered at real-time priority (when permitted), lent to the
                // device and relay threads it waits on: QEMU waits for this reply holding its main
                // loop, and on a busy machine each handoff to a thread waiting for a CPU would
                // otherwise cost milliseconds (issue 11, item 4).
                // At most one boosted toggle per `logToggleBoostIntervalNanos`: QEMU toggles a few
                // times per migration, and a frontend that toggles in a loop must not keep a thread
                // real-time (it would starve the other threads of its core).
                var boost = false
                if message.request == .setFeatures, case .u64(let f) = message.payload, f & VirtioFeature.vhostLogAll != loggingBefore,
                   received &- lastBoostNanos >= Self.logToggleBoostIntervalNanos {
                    boost = true
                    lastBoostNanos = received
                }
                let reply = boost
                    ? try CurrentThread.withRealTimePriority(Self.logToggleRealTimePriority) { () throws in try s.handle(message, fds: &fds) }
                    : try s.handle(message, fds: &fds)
                if fds.count > 0 {
                    logger.warning("\(message.request.name): closing \(fds.count) fd(s) the request did not use")
                    fds.closeAll()
                }
                // Status first: once the frontend has its reply, status must already show the change.
                state.withLock {
                    $0.update(from: s)
                    if let binding { for i in $0.queues.indices where $0.queues[i].started { $0.queues[i].mode = binding.mode(ofRing: i).rawValue } }
                }
                let loggingAfter = s.ackedFeatures & VirtioFeature.vhostLogAll
                if message.request == .setFeatures && loggingAfter != loggingBefore {
                    // Handled, the reply about to go (what QEMU waits for); recorded before it goes,
                    // so that a frontend that reads stats after its reply finds it counted.
                    let micros = (MonotonicClock.nanoseconds - received) / 1000
                    migration.logAllReplies.withLock { loggingAfter != 0 ? $0.on.record(micros) : $0.off.record(micros) }
                    logger.debug("LOG_ALL \(loggingAfter != 0 ? "on" : "off"): answered in \(micros) µs")
                }
                if let reply {
                    let deadline = Deadline(secondsFromNow: Self.replyTimeoutSeconds)
                    try c.withFD { fd throws(SocketError) in try UnixSocket.send(fd, reply, deadline: deadline, cancel: wake.raw) }
                }
            } catch let e as VhostUserError {
                detach(reason: e.description, isError: true)
            } catch SocketError.cancelled {
                detach(reason: "daemon stopping", isError: false)
            } catch {
                detach(reason: "sending reply: \(error)", isError: true)
            }
        }

        while running {
            var timeout: Int32 = -1
            if spec.client && connection == nil {
                // Client mode: try to connect now, or after the backoff.
                if backoffMillis == 0 || tryConnectPending {
                    tryConnectPending = false
                    do {
                        // Non-blocking: a frontend that listens but never accepts (full backlog)
                        // makes this fail with EAGAIN and retry, instead of holding the port thread.
                        let fd = try UnixSocket.connect(path: spec.socketPath, nonBlocking: true)
                        backoffMillis = 0
                        attach(fd)
                    } catch {
                        backoffMillis = backoffMillis == 0 ? 100 : min(backoffMillis * 2, 5000)
                        state.withLock { $0.lastError = "connect: \(error)" }
                        logger.debug("connect failed (\(error)); retrying in \(backoffMillis) ms")
                    }
                }
                if connection == nil { timeout = backoffMillis }
            }
            do {
                let n = try epoll.wait(timeoutMillis: timeout) { ev in
                    switch Token(rawValue: ev.token) {
                    case .wake:
                        running = false
                    case .listener:
                        guard let listener else { return }
                        let fd: FileDescriptor
                        do { fd = try listener.withFD { l throws(SystemError) in try UnixSocket.accept(l) } } catch {
                            logger.warning("accept: \(error)")
                            return
                        }
                        if connection != nil {
                            // One frontend at a time: refuse the newcomer, leave the first alone.
                            logger.warning("refused a second frontend: the port already has one connected")
                            state.withLock { $0.rejectedConnections += 1 }
                            _ = consume fd
                        } else {
                            attach(fd)
                        }
                    case .connection:
                        serveOne()
                    case .memoryFault:
                        guard let s = session, let f = s.faultNotify, EventFD.drain(f.raw) > 0 else { return }
                        detach(reason: "the frontend shrank a shared memory or log file under the daemon's mapping (\(s.memoryFaults) SIGBUS fault(s) absorbed; the faulting pages now read as zero); session closed",
                               isError: true)
                    case nil:
                        break
                    }
                }
                if n == 0 && spec.client && connection == nil { tryConnectPending = true }
            } catch {
                logger.error("epoll: \(error)")
                running = false
            }
        }
        if connection != nil { detach(reason: "daemon stopping", isError: false) }
        device?.close()
        state.withLock { $0.connection = "closed" }
        logger.info("port closed")
    }
}
