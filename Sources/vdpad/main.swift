import ArgumentParser
import Foundation
import Logging
import Platform
import Relay
import SoftNIC
import VhostVDPA
import VDPA
import VDPAConfig
import VDUSE

@main
struct Vdpad: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vdpad",
        abstract: "vhost-user backend daemon that hands the virtio-net data path to a vDPA device.",
        discussion: """
        Each --port binds one vhost-user socket to one vDPA NIC (the software NIC by default):
          socket=PATH[,id=NAME][,link=LINK][,queues=N][,mac=MAC][,client][,device=DEVICE][,features=LIST][,offloads=on|off]
                      [,migration=relay|iommu-dirty][,relay=used|avail+used][,log=exact|buffer|page-run]
          socket=PATH  the vhost-user socket (paths containing ',' are not supported)
          id=NAME      port name (default vdpa0, vdpa1, ... in order)
          link=LINK    loopback (default) | sink | source[:size=BYTES][:rate=PPS] | tap[:ifname=IF][:zerocopy=off] | wire:ID
          queues=N     queue pairs (default 1; a kernel device serves one)
          device=DEV   softnic (default) | vhost-vdpa:/dev/vhost-vdpa-N (a kernel vDPA NIC;
                       link= and mac= are the software NIC's)
          mac=MAC      the guest's MAC: destination of frames the source link generates
          client       connect to the frontend's socket (reconnecting with backoff) instead of listening
          features=LIST offer at most these virtio features: names joined by '+' (any case; as status
                       prints them, e.g. VERSION_1+MRG_RXBUF+EVENT_IDX) or hex bits (0x...); the port
                       offers what its device has within the list (a warning names the rest);
                       PROTOCOL_FEATURES and LOG_ALL are always offered
          offloads=off withhold the checksum and segmentation offloads (CSUM, GUEST_CSUM, HOST_TSO4/6,
                       HOST_ECN, HOST_UFO, GUEST_TSO4/6, GUEST_ECN, GUEST_UFO); on (default) offers
                       what the device and features= allow
          migration=M  how a live migration logs the device's writes: relay (default: each RX ring
                       runs through the software relay while LOG_ALL is on) | iommu-dirty (the
                       rings stay direct; the device's IOMMU records the pages it writes and the
                       daemon folds them into the log every 20 ms and before GET_VRING_BASE and
                       LOG_ALL off answer; the SoftNIC has it, vhost-vdpa devices do not: refused)
          relay=HALVES used (default): while migrating, RX rings complete into a mediated used ring;
                       avail+used: every ring is fully mediated, and the relay checks each chain the
                       guest posts before the device sees it (a bad one is completed with length 0
                       and counted as rejectedChains); the software NIC only (a port asking for it
                       on a kernel vhost-vdpa device is refused at start)
          log=G        what the relay marks per completion (migration=relay only): exact (default:
                       the bytes the device wrote), buffer (the written buffers whole), page-run
                       (the aligned 64-page runs around the written bytes)
        With no --port and no --vduse: one port vdpa0 at /run/vdpad/vdpa0.sock on a loopback link.
        Each --vduse exports a software vDPA NIC to this kernel as a VDUSE device on the vDPA bus:
          name=NAME[,link=LINK][,mac=MAC][,queues=N][,bind=vhost-vdpa|virtio-vdpa|none][,indirect=on|off]
          name=NAME    /dev/vduse/NAME and the vDPA device's name (letters, digits, '-', '_', '.')
          link=LINK    as for --port (default loopback)
          mac=MAC      the MAC in the device's config space (default: derived from the name)
          queues=N     queue pairs (default 1; more need bind=vhost-vdpa or none: the kernel's
                       virtio_net refuses several without a control queue, which VDUSE lacks)
          bind=...     the kernel driver to bind (default vhost-vdpa: /dev/vhost-vdpa-N;
                       virtio-vdpa: a netdev in this kernel; none: unbound)
          indirect=off do not offer INDIRECT_DESC (QEMU 7.2's x-svq=on refuses a device offering it)
        It needs the vduse and vdpa modules (and the driver's) and CAP_NET_ADMIN; it is removed
        from the bus and destroyed when vdpad exits.
        While the frontend logs dirty pages (VHOST_F_LOG_ALL, live migration) each RX ring runs
        through a relay that marks every page the device writes (--relay-loop picks its loop);
        with relay=avail+used every ring does, and the relay checks the chains the guest posts;
        with migration=iommu-dirty the rings stay direct while the device's IOMMU records its writes.
        """)

    @Option(name: .customLong("port"), help: "A vhost-user port (repeatable).")
    var ports: [String] = []

    @Option(name: .customLong("vduse"), help: "A SoftNIC exported as a VDUSE device (repeatable).")
    var vduse: [String] = []

    @Option(help: "A TOML configuration file: the daemon's options as top-level keys and a [[port]] table per port (dist/vdpad.toml). Command-line options override its options; --port adds ports to its own.")
    var config: String?

    @Option(help: "Check a configuration file: print the ports it resolves to, or name the file, line and key that is wrong; then exit.")
    var checkConfig: String?

    @Option(help: "Control socket path (default /run/vdpad/control.sock).")
    var control: String?

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical (default info).")
    var logLevel: String?

    @Option(help: "Log lines as text (the default) or json (one object per line: time, level, label, source, message, and the line's metadata such as port).")
    var logFormat: String?

    @Option(help: "How the migration relay waits for completions: event, poll or hybrid (default hybrid).")
    var relayLoop: String?

    @Option(help: "Group (name or number) to own the sockets.")
    var socketGroup: String?

    @Option(help: "Octal mode for the sockets, e.g. 0660.")
    var socketMode: String?

    @Option(help: "Octal mode for the control socket (default 0600; --socket-mode does not apply to it).")
    var controlMode: String?

    @Option(help: "Group (name or number) to own the control socket (default: the daemon's group).")
    var controlGroup: String?

    @Option(help: "Control clients connected at once; one more is refused with an error line (default 16).")
    var controlMaxClients: Int?

    @Option(help: "Seconds a control client may send nothing before it is closed (default 30).")
    var controlIdleTimeout: Double?

    /// The daemon's options after the configuration file: the command line's where given, else
    /// the file's, else the defaults.
    struct Resolved {
        var control = "/run/vdpad/control.sock"
        var logLevel = "info"
        var logFormat = "text"
        var relayLoop = "hybrid"
        var socketGroup: String?
        var socketMode: String?
        var controlMode = "0600"
        var controlGroup: String?
        var controlMaxClients = 16
        var controlIdleTimeout = 30.0
    }

    func resolve(_ file: ConfigFile?) throws -> Resolved {
        var r = Resolved()
        let f = file?.options ?? [:]
        func number<T: LosslessStringConvertible>(_ key: String, _ type: T.Type) throws -> T? {
            guard let v = f[key] else { return nil }
            guard let n = T(v) else { throw ValidationError("\(config ?? ""): \(key): '\(v)' is not a number") }
            return n
        }
        r.control = control ?? f["control"] ?? r.control
        r.logLevel = logLevel ?? f["log-level"] ?? r.logLevel
        r.logFormat = logFormat ?? f["log-format"] ?? r.logFormat
        r.relayLoop = relayLoop ?? f["relay-loop"] ?? r.relayLoop
        r.socketGroup = socketGroup ?? f["socket-group"]
        r.socketMode = socketMode ?? f["socket-mode"]
        r.controlMode = controlMode ?? f["control-mode"] ?? r.controlMode
        r.controlGroup = controlGroup ?? f["control-group"]
        r.controlMaxClients = try controlMaxClients ?? number("control-max-clients", Int.self) ?? r.controlMaxClients
        r.controlIdleTimeout = try controlIdleTimeout ?? number("control-idle-timeout", Double.self) ?? r.controlIdleTimeout
        guard RelayLoopMode(rawValue: r.relayLoop) != nil else {
            throw ValidationError("unknown --relay-loop '\(r.relayLoop)'; use event, poll or hybrid")
        }
        guard r.controlMaxClients >= 1 else { throw ValidationError("--control-max-clients must be at least 1") }
        guard r.controlIdleTimeout > 0, r.controlIdleTimeout <= 365 * 86400 else {
            throw ValidationError("--control-idle-timeout must be more than 0 seconds and at most a year")
        }
        guard r.logFormat == "text" || r.logFormat == "json" else {
            throw ValidationError("unknown --log-format '\(r.logFormat)'; use text or json")
        }
        guard Logger.Level(rawValue: r.logLevel) != nil else {
            throw ValidationError("unknown --log-level '\(r.logLevel)'; use trace, debug, info, notice, warning, error or critical")
        }
        return r
    }

    func run() throws {
        if let path = checkConfig {
            do {
                let file = try ConfigFile.load(path: path)
                let r = try resolve(file)
                for m in [r.socketMode, r.controlMode].compactMap({ $0 }) where UInt32(m, radix: 8).map({ $0 > 0o777 }) ?? true {
                    throw ValidationError("\(path): '\(m)' is not an octal mode like 0660")
                }
                for p in file.ports where p.device == .softnic {
                    do { _ = try LinkSpec.parse(p.link) } catch { throw ValidationError("\(path): port \(p.id): link: \(error)") }
                }
                print("\(path): ok")
                for (k, v) in file.options.sorted(by: { $0.key < $1.key }) { print("  \(k) = \(v)") }
                for p in file.ports {
                    let extra = [p.featureLimitDescription, p.migration == MigrationOptions() ? nil : "\(p.migration)"].compactMap { $0 }
                    print("  port \(p.id): socket=\(p.socketPath) \(p.client ? "client" : "server") device=\(p.device) link=\(p.link) queues=\(p.queuePairs)" + (extra.isEmpty ? "" : " " + extra.joined(separator: ",")))
                }
                return
            } catch {
                throw ValidationError("\(error)")
            }
        }
        var file: ConfigFile?
        if let path = config {
            do { file = try ConfigFile.load(path: path) } catch { throw ValidationError("\(error)") }
        }
        let r = try resolve(file)
        let level = Logger.Level(rawValue: r.logLevel) ?? .info
        let json = r.logFormat == "json"
        LoggingSystem.bootstrap { label in
            if json {
                var h = JSONLogHandler(label: label)
                h.logLevel = level
                return h
            }
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        let logger = Logger(label: "vdpad")

        var vduseSpecs: [VDUSESpec] = []
        do {
            for t in vduse { vduseSpecs.append(try VDUSESpec.parse(t)) }
        } catch {
            throw ValidationError("\(error)")
        }
        if let dup = Dictionary(grouping: vduseSpecs, by: \.name).first(where: { $0.value.count > 1 })?.key {
            throw ValidationError("two --vduse devices are named '\(dup)'")
        }
        var specs: [PortSpec] = file?.ports ?? []
        do {
            let texts = ports.isEmpty && vduse.isEmpty && specs.isEmpty ? ["socket=/run/vdpad/vdpa0.sock"] : ports
            for t in texts { specs.append(try PortSpec.parse(t, defaultID: "vdpa\(specs.count)")) }
        } catch {
            throw ValidationError("\(error)")
        }
        func group(_ g: String, _ option: String) throws -> GroupID {
            if let n = UInt32(g) { return n }
            let id: GroupID?
            do { id = try Groups.id(named: g) } catch { throw ValidationError("\(option): cannot look up group '\(g)': \(error)") }
            guard let id else { throw ValidationError("\(option): no group named '\(g)'") }
            return id
        }
        func mode(_ m: String, _ option: String) throws -> FileMode {
            guard let v = UInt32(m, radix: 8), v <= 0o777 else { throw ValidationError("\(option): '\(m)' is not an octal mode like 0660") }
            return v
        }
        var ownership = SocketOwnership()
        if let g = r.socketGroup { ownership.group = try group(g, "--socket-group") }
        if let m = r.socketMode { ownership.mode = try mode(m, "--socket-mode") }
        var controlOptions = ControlOptions(maxClients: r.controlMaxClients, idleTimeoutSeconds: r.controlIdleTimeout)
        controlOptions.ownership.mode = try mode(r.controlMode, "--control-mode")
        if let g = r.controlGroup { controlOptions.ownership.group = try group(g, "--control-group") }

        var switches = TestSwitches()
        let env = ProcessInfo.processInfo.environment
        if env["VDPAD_TEST_SKIP_BUFFER_MARKING"] == "1" {
            switches.skipBufferMarking = true
            logger.critical("TEST SWITCH VDPAD_TEST_SKIP_BUFFER_MARKING=1: the relay does NOT mark the buffers the device writes; migrations WILL lose data. For tests only.")
        }
        if env["VDPAD_TEST_SKIP_DIRTY_FOLD"] == "1" {
            switches.skipDirtyFold = true
            logger.critical("TEST SWITCH VDPAD_TEST_SKIP_DIRTY_FOLD=1: migration=iommu-dirty ports drop the device's dirty bits instead of logging them; migrations WILL lose data. For tests only.")
        }
        if let ms = env["VDPAD_TEST_DIRTY_FOLD_PERIOD_MS"], !ms.isEmpty {
            guard let v = Int(ms), v >= 0 else { throw ValidationError("VDPAD_TEST_DIRTY_FOLD_PERIOD_MS=\(ms): expected a number of milliseconds (0: no background folds)") }
            switches.dirtyFoldPeriodMillis = v
            logger.warning("TEST SWITCH VDPAD_TEST_DIRTY_FOLD_PERIOD_MS=\(v): background dirty folds every \(v) ms (0: none). For tests only.")
        }
        if let path = env["VDPAD_TEST_JOURNAL"], !path.isEmpty {
            do { switches.journal = try JournalFile(path: path) } catch { throw ValidationError("\(error)") }
            logger.warning("TEST SWITCH VDPAD_TEST_JOURNAL=\(path): every device write the relay exposes (migration=relay) or the SoftNIC writes while dirty tracking (migration=iommu-dirty) is journaled (slow). For tests only.")
        }
        let options = PortOptions(relayLoop: RelayLoopMode(rawValue: r.relayLoop) ?? .hybrid, testSwitches: switches)
        let signalFD = try SignalNotifier.installTermination()
        for s in specs where s.device == .softnic {
            do { _ = try LinkSpec.parse(s.link) } catch { throw ValidationError("--port \(s.id): \(error)") }
        }
        // VDUSE devices first: a port may drive one of them through /dev/vhost-vdpa-N.
        var vduseDevices: [VDUSEDevice] = []
        func closeVDUSE() {
            for d in vduseDevices.reversed() { d.close() }
        }
        for s in vduseSpecs {
            do { vduseDevices.append(try VDUSEDevice.create(s, logger: logger)) } catch {
                logger.critical("\(error)")
                closeVDUSE()
                throw ExitCode(1)
            }
        }
        let daemon: Daemon
        do {
            daemon = try Daemon(specs: specs, controlPath: r.control, logger: logger, options: options,
                                controlOptions: controlOptions) { spec in
                switch spec.device {
                case .softnic:
                    // Every line about a port carries its id (`port` metadata), the device's too.
                    var l = logger
                    l[metadataKey: "port"] = "\(spec.id)"
                    return try SoftNIC(portID: spec.id, queuePairs: spec.queuePairs, link: try LinkSpec.parse(spec.link), guestMAC: spec.mac,
                                       journal: options.testSwitches.journal, logger: l)
                case .vhostVDPA(let path):
                    var l = logger
                    l[metadataKey: "port"] = "\(spec.id)"
                    let device = try VhostVDPADevice(kernel: try VhostVDPAFile(path: path), path: path, logger: l)
                    if spec.queuesGiven && spec.queuePairs > device.queuePairs {
                        device.close()
                        throw ValidationError("--port \(spec.id): queues=\(spec.queuePairs): a kernel vDPA device serves \(device.queuePairs) queue pair (several need its control queue, which vdpad does not drive yet)")
                    }
                    l.info("\(device.summary): features 0x\(String(device.deviceFeatures, radix: 16)), \(device.queuePairs) queue pair(s)")
                    return device
                }
            }
        } catch {
            logger.critical("cannot create the ports' devices: \(error)")
            closeVDUSE()
            throw ExitCode(1)
        }
        do {
            try daemon.start(ownership: ownership)
        } catch {
            logger.critical("\(error)")
            closeVDUSE()
            throw ExitCode(1)
        }
        // systemd (Type=notify): ready once every socket listens (start returns after binding
        // them); a failure to tell it is logged, not fatal (systemd then times the start out).
        do {
            if try SystemdNotify.send("READY=1\nMAINPID=\(getpid())\nSTATUS=serving \(specs.count) port(s)") {
                logger.info("told systemd the daemon is ready (NOTIFY_SOCKET)")
            }
        } catch {
            logger.error("cannot tell systemd the daemon is ready: \(error)")
        }
        do { _ = try Poll.waitReadable(signalFD, until: nil) } catch {
            logger.critical("cannot wait for a signal (\(error)); closing ports")
            daemon.stop()
            closeVDUSE()
            throw ExitCode(1)
        }
        logger.info("signal received; closing ports")
        do { try SystemdNotify.send("STOPPING=1") } catch { logger.error("cannot tell systemd the daemon is stopping: \(error)") }
        daemon.stop()
        closeVDUSE()
    }
}
