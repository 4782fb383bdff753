import SoftNIC

/// The kernel driver a VDUSE device is bound to on the vDPA bus.
public enum VDPABusDriver: String, Sendable, CaseIterable {
    /// `vhost_vdpa`: the device becomes /dev/vhost-vdpa-N, for a user-space driver (vdpad's
    /// vhost-vdpa ports, QEMU's `-netdev vhost-vdpa`).
    case vhostVDPA = "vhost-vdpa"
    /// `virtio_vdpa`: the kernel's own virtio-net driver takes it: a netdev in this kernel.
    case virtioVDPA = "virtio-vdpa"
    /// Whatever the kernel bound when the device appeared is unbound; nothing is bound.
    case none

    /// The driver's name under /sys/bus/vdpa/drivers (nil for `none`).
    public var sysfsName: String? {
        switch self {
        case .vhostVDPA: "vhost_vdpa"
        case .virtioVDPA: "virtio_vdpa"
        case .none: nil
        }
    }
}

/// One `--vduse` option: `name=NAME[,link=LINK][,mac=MAC][,queues=N][,bind=vhost-vdpa|virtio-vdpa|none][,indirect=on|off]`.
public struct VDUSESpec: Equatable, Sendable {
    /// The VDUSE device's name: /dev/vduse/NAME, and the vDPA device's name on the bus.
    public var name: String
    /// The SoftNIC's host link, as given to `link=` (checked by `LinkSpec.parse`).
    public var link: String
    /// The MAC in the device's config space (the driver's MAC); nil: derived from the name.
    public var mac: [UInt8]?
    public var queuePairs: Int
    public var bind: VDPABusDriver
    /// Whether the device offers VIRTIO_F_INDIRECT_DESC (`indirect=off` leaves it out: QEMU 7.2's
    /// shadow virtqueue, `-netdev vhost-vdpa,x-svq=on`, refuses a device that offers it).
    public var indirect: Bool

    public static let maxQueuePairs = 64
    public static let maxNameLength = 64

    public init(name: String, link: String = "loopback", mac: [UInt8]? = nil, queuePairs: Int = 1, bind: VDPABusDriver = .vhostVDPA,
                indirect: Bool = true) {
        self.name = name
        self.link = link
        self.mac = mac
        self.queuePairs = queuePairs
        self.bind = bind
        self.indirect = indirect
    }

    public struct ParseError: Error, CustomStringConvertible, Equatable {
        public let message: String
        public var description: String { message }
    }

    /// Parses one `--vduse` value.
    public static func parse(_ text: String) throws(ParseError) -> VDUSESpec {
        func fail(_ why: String) -> ParseError { ParseError(message: "--vduse \(text): \(why)") }
        var name: String?
        var link = "loopback"
        var mac: [UInt8]?
        var queues = 1
        var bind = VDPABusDriver.vhostVDPA
        var indirect = true
        var seen = Set<String>()
        for item in text.split(separator: ",", omittingEmptySubsequences: false) {
            let parts = item.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let key = String(parts[0])
            guard parts.count == 2 else {
                throw fail(item.isEmpty ? "empty option" : "option '\(item)' needs a value (KEY=VALUE)")
            }
            let value = String(parts[1])
            guard seen.insert(key).inserted else { throw fail("\(key)= is given twice") }
            switch key {
            case "name":
                // /dev/vduse/NAME and /sys/bus/vdpa/devices/NAME: a plain file name; "control" is
                // VDUSE's own node.
                guard !value.isEmpty, value.utf8.count <= maxNameLength,
                      value.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.".contains($0)) }),
                      value != ".", value != ".." else {
                    throw fail("name '\(value)' must be 1-\(maxNameLength) ASCII letters, digits, '-', '_' or '.'")
                }
                guard value != "control" else { throw fail("name 'control' is taken by /dev/vduse/control") }
                name = value
            case "link":
                do { _ = try LinkSpec.parse(value) } catch { throw fail("\(error)") }
                link = value
            case "mac":
                let octets = value.split(separator: ":", omittingEmptySubsequences: false)
                let bytes = octets.compactMap { $0.count == 2 ? UInt8($0, radix: 16) : nil }
                guard octets.count == 6, bytes.count == 6, bytes[0] & 1 == 0 else {
                    throw fail("mac=\(value) must be a unicast MAC like 52:54:00:12:34:56")
                }
                mac = bytes
            case "queues":
                guard let n = Int(value), n >= 1, n <= maxQueuePairs else {
                    throw fail("queues=\(value) must be a number of queue pairs in 1...\(maxQueuePairs)")
                }
                queues = n
            case "bind":
                guard let b = VDPABusDriver(rawValue: value) else {
                    throw fail("bind=\(value): use vhost-vdpa, virtio-vdpa or none")
                }
                bind = b
            case "indirect":
                switch value {
                case "on": indirect = true
                case "off": indirect = false
                default: throw fail("indirect=\(value): use on or off")
                }
            default:
                throw fail("unknown option '\(key)'; expected name=NAME[,link=LINK][,mac=MAC][,queues=N][,bind=vhost-vdpa|virtio-vdpa|none][,indirect=on|off]")
            }
        }
        guard let name else { throw fail("name=NAME is required") }
        if queues > 1 && bind == .virtioVDPA {
            // VDUSE refuses a net device with a control queue, and Linux's virtio_net refuses MQ
            // without one (virtnet_validate_features): the kernel's driver cannot take it.
            throw fail("queues=\(queues) with bind=virtio-vdpa: the kernel's virtio_net driver refuses several queue pairs without a control queue, which VDUSE cannot offer; use queues=1, or bind=vhost-vdpa")
        }
        return VDUSESpec(name: name, link: link, mac: mac, queuePairs: queues, bind: bind, indirect: indirect)
    }

    /// The config-space MAC: `mac=`, or a locally administered unicast address derived from the
    /// name (stable across restarts, distinct from the SoftNIC's own link-side MAC).
    public var configMAC: [UInt8] {
        if let mac { return mac }
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in "vduse:\(name)".utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        return [0x02] + (0..<5).map { UInt8(truncatingIfNeeded: h >> (8 * UInt64($0))) }
    }
}
