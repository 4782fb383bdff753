import DeviceFramework
import Logging
import Platform
import SoftNIC
import Synchronization

/// A SoftNIC exported to the kernel as a VDUSE device: created with `create`, removed with
/// `close`. In between the kernel's vDPA bus has it as device `spec.name`, bound to the driver
/// `spec.bind` names (vhost_vdpa: /dev/vhost-vdpa-N; virtio_vdpa: a netdev in this kernel).
///
/// `create`: VDUSE_CREATE_DEV (virtio-net: `VDUSEDeviceConfig`), /dev/vduse/NAME opened,
/// VDUSE_VQ_SETUP for every ring, the SoftNIC and the request loop (`VDUSEServer`) started, the
/// device added to the bus (VDPA_CMD_DEV_NEW over generic netlink, as `vdpa dev add name NAME
/// mgmtdev vduse` does; the driver the kernel binds at once probes the device, which the loop
/// already serves), then bound as asked (`VDPABus`). Any failure undoes what was done.
/// `close`: VDPA_CMD_DEV_DEL (the driver's remove resets the device, still served), the loop
/// and the SoftNIC stopped, the device's fd closed, VDUSE_DESTROY_DEV.
public final class VDUSEDevice: Sendable {
    /// What runs while the device exists.
    final class Running: Sendable {
        let file: VDUSEDeviceFile
        let iotlb: VDUSEIOTLB
        let interrupts: VDUSEInterrupts
        let nic: SoftNIC
        let server: VDUSEServer
        let worker: ConfinedWorker<VDUSEServer>

        init(file: VDUSEDeviceFile, iotlb: VDUSEIOTLB, interrupts: VDUSEInterrupts, nic: SoftNIC, server: VDUSEServer,
             worker: ConfinedWorker<VDUSEServer>) {
            self.file = file; self.iotlb = iotlb; self.interrupts = interrupts; self.nic = nic; self.server = server
            self.worker = worker
        }

        func stop(logger: Logger) {
            if !worker.stop() {
                logger.error("VDUSE \(server.name): the request loop did not stop within \(2 * worker.timeoutSeconds) s; abandoning it")
            }
            nic.close()
        }
    }

    public let spec: VDUSESpec
    public let config: VDUSEDeviceConfig
    private let running: Mutex<Running?>
    private let bus: VDPABus
    private let logger: Logger

    private init(spec: VDUSESpec, config: VDUSEDeviceConfig, running: Running, bus: VDPABus, logger: Logger) {
        self.spec = spec
        self.config = config
        self.running = Mutex(running)
        self.bus = bus
        self.logger = logger
    }

    /// The SoftNIC behind the device (nil once closed).
    public var nic: SoftNIC? { running.withLock { $0?.nic } }

    public var summary: String {
        "vduse \(spec.name) bind=\(spec.bind.rawValue) queues=\(spec.queuePairs) link=\(spec.link) mac=\(spec.configMAC.map { String(format2: $0) }.joined(separator: ":"))"
    }

    /// Creates the device, serves it, adds it to the vDPA bus and binds the driver `spec.bind` names.
    public static func create(_ spec: VDUSESpec, logger: Logger, bus: VDPABus = VDPABus()) throws(VDUSEError) -> VDUSEDevice {
        let name = spec.name
        let config = VDUSEDeviceConfig(spec)
        let link: LinkSpec
        do { link = try LinkSpec.parse(spec.link) } catch { throw VDUSEError("--vduse \(name): \(error)") }
        do {
            let control = try VDUSEControl()
            try control.create(name: name, config: config)
        } catch {
            throw VDUSEError("VDUSE device \(name): \(explainCreate(error, config))")
        }
        // From here on, a failure destroys the device again.
        do throws(VDUSEError) {
            let r = try start(spec, config: config, link: link, logger: logger)
            do throws(VDUSEError) {
                try addToBus(name)
            } catch {
                r.stop(logger: logger)
                throw error
            }
            do throws(VDUSEError) {
                try bus.bind(name, to: spec.bind)
            } catch {
                removeFromBus(name, logger: logger)
                r.stop(logger: logger)
                throw error
            }
            let device = VDUSEDevice(spec: spec, config: config, running: r, bus: bus, logger: logger)
            logger.info("\(device.summary): on the vDPA bus, driver \(bus.driverName(of: name))")
            return device
        } catch {
            destroy(name, logger: logger)
            throw error
        }
    }

    /// Removes the device from the bus, stops its threads and destroys it. Idempotent.
    public func close() {
        let name = spec.name
        weak var file: VDUSEDeviceFile?
        do {
            guard let r = running.withLock({ $0.take() }) else { return }
            file = r.file
            Self.removeFromBus(name, logger: logger)
            r.stop(logger: logger)
            let failed = r.interrupts.failed.load(ordering: .relaxed)
            for c in r.nic.counters() {
                let drops = c.drops.filter { $0.value > 0 }.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")
                logger.info("VDUSE \(name): queue \(c.index) (\(c.index % 2 == 0 ? "rx" : "tx")): packets \(c.packets) bytes \(c.bytes) drops \(drops.isEmpty ? "0" : drops) faults \(c.faults) interrupts \(c.interrupts) doorbells \(c.doorbells)\(c.error.map { " error: \($0)" } ?? "")")
            }
            logger.info("VDUSE \(name): \(r.server.answered.load(ordering: .relaxed)) requests answered, \(r.server.refused.load(ordering: .relaxed)) refused; \(r.interrupts.raised.load(ordering: .relaxed)) interrupts raised, \(failed) refused by the kernel\(failed > 0 ? " (last errno \(r.interrupts.lastErrno.load(ordering: .relaxed)))" : ""); IOMMU misses \(r.iotlb.misses.load(ordering: .relaxed)), \(r.iotlb.resolvedMisses.load(ordering: .relaxed)) mapped")
        }
        // Every holder of the device's fd is gone once its threads stopped: the fd is closed.
        if file != nil {
            logger.error("VDUSE \(name): its fd is still held (a thread did not stop); the device is left in place")
            return
        }
        Self.destroy(name, logger: logger)
    }

    // MARK: steps

    private static func start(_ spec: VDUSESpec, config: VDUSEDeviceConfig, link: LinkSpec, logger: Logger) throws(VDUSEError) -> Running {
        let name = spec.name
        let file: VDUSEDeviceFile
        var kicks: [SharedFD] = []
        let iotlb: VDUSEIOTLB
        do throws(SystemError) {
            file = try VDUSEDeviceFile(name: name)
            for i in 0..<config.queueCount { try file.setUpQueue(i, maxSize: VDUSEDeviceConfig.maxQueueSize) }
            for _ in 0..<config.queueCount { kicks.append(SharedFD(try EventFD.make())) }
            iotlb = try VDUSEIOTLB(device: file, name: name, logger: logger)
        } catch {
            throw VDUSEError("VDUSE device \(name): \(error)")
        }
        let interrupts = VDUSEInterrupts(device: file)
        let nic: SoftNIC
        do {
            nic = try SoftNIC(portID: name, queuePairs: spec.queuePairs, link: link, guestMAC: spec.configMAC,
                              raiser: interrupts, missResolver: iotlb, logger: logger)
        } catch {
            throw VDUSEError("VDUSE device \(name): cannot start its SoftNIC: \(error)")
        }
        let server = VDUSEServer(name: name, device: file, nic: nic, iotlb: iotlb, interrupts: interrupts, kicks: kicks,
                                 offeredFeatures: config.features, maxQueueSize: VDUSEDeviceConfig.maxQueueSize, logger: logger)
        let worker: ConfinedWorker<VDUSEServer>
        do throws(SystemError) {
            worker = try ConfinedWorker(name: "vduse-\(name)")
            try worker.start(server)
        } catch {
            nic.close()
            throw VDUSEError("VDUSE device \(name): cannot start its request loop: \(error)")
        }
        return Running(file: file, iotlb: iotlb, interrupts: interrupts, nic: nic, server: server, worker: worker)
    }

    private static func addToBus(_ name: String) throws(VDUSEError) {
        do {
            try busRequest(name, { VDPANetlink.addDeviceRequest(family: $0, name: $1, sequence: $2) },
                           "adding VDUSE device \(name) to the vDPA bus (vdpa dev add name \(name) mgmtdev vduse)")
        } catch {
            throw VDUSEError("VDUSE device \(name): \(error)")
        }
    }

    private static func removeFromBus(_ name: String, logger: Logger) {
        do {
            try busRequest(name, { VDPANetlink.deleteDeviceRequest(family: $0, name: $1, sequence: $2) }, "removing vDPA device \(name) from the bus (vdpa dev del \(name))")
        } catch {
            logger.error("VDUSE \(name): \(error)")
        }
    }

    /// One request to the vdpa generic-netlink family about device `name`, acknowledged or thrown
    /// with `what` and the kernel's reason.
    private static func busRequest(_ name: String, _ build: (UInt16, String, UInt32) -> [UInt8], _ what: String) throws {
        let netlink = try GenericNetlinkClient()
        let family = try netlink.family(VDPANetlink.familyName, purpose: "the vDPA bus's management interface, from the vdpa module")
        let seq = netlink.nextSequence()
        try netlink.transact(build(family, name, seq), sequence: seq) { code, text in
            "\(what): \(GenericNetlinkClient.describe(code, text))"
        }
    }

    /// VDUSE_DESTROY_DEV, retried briefly while the kernel still counts the device busy.
    private static func destroy(_ name: String, logger: Logger) {
        let deadline = Deadline(secondsFromNow: 2)
        while true {
            do throws(SystemError) {
                let control = try VDUSEControl()
                try control.destroy(name: name)
                logger.info("VDUSE \(name): destroyed")
                return
            } catch where error.errno == 16 && !deadline.hasPassed {  // EBUSY
                CurrentThread.sleep(milliseconds: 20)
            } catch {
                logger.error("VDUSE \(name): VDUSE_DESTROY_DEV: \(error)\(error.errno == 16 ? " (still on the vDPA bus, or its fd still open)" : "")")
                return
            }
        }
    }

    static func explainCreate(_ error: SystemError, _ config: VDUSEDeviceConfig) -> String {
        switch error.errno {
        case 2 where error.call.contains("/dev/vduse/control"):  // ENOENT
            return "\(VDUSEControl.path) does not exist: load the vduse module (modprobe vduse)"
        case 17:  // EEXIST
            return "a VDUSE device with this name exists already (left behind by a daemon that did not remove it? `vdpa dev del NAME` takes it off the bus; it can be destroyed once no process holds /dev/vduse/NAME open)"
        case 1 where error.call.contains("CREATE_DEV"):  // EPERM
            return "creating a VDUSE network device needs CAP_NET_ADMIN (\(error))"
        case 22 where error.call.contains("CREATE_DEV"):  // EINVAL
            return "the kernel refused the device's configuration (features \(config.features), \(config.queueCount) queues, \(VDUSEDeviceConfig.configSize)-byte config space): \(error)"
        default:
            return "\(error)"
        }
    }
}

extension VDPABus {
    /// The bound driver's name for a log line ("none" when unbound or unreadable).
    func driverName(of name: String) -> String {
        do { return try driver(of: name) ?? "none" } catch { return "unknown (\(error))" }
    }
}

extension String {
    /// Two lower-case hex digits.
    init(format2 byte: UInt8) {
        let s = String(byte, radix: 16)
        self = s.count == 1 ? "0" + s : s
    }
}
