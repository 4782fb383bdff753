import Relay
import Virtio

/// How a port keeps a live migration's dirty log (`relay=`, `migration=`, `log=`).
public struct MigrationOptions: Equatable, Sendable, CustomStringConvertible {
    /// `relay=`: which halves of the rings the relay mediates while logging is on.
    public enum RelayHalves: String, Equatable, Sendable, CaseIterable {
        /// The device completes into a mediated used ring; the relay copies completions to the
        /// guest and logs what they expose.
        case used
        /// As `used`, and the device reads a mediated avail ring: the relay checks each chain the
        /// guest posts before the device may see it.
        case availUsed = "avail+used"
    }
    /// `migration=`: how the device's writes reach the log.
    public enum Method: String, Equatable, Sendable, CaseIterable {
        /// The relay (`relay=`, `log=`).
        case relay
        /// The rings stay direct; the device's IOMMU records the pages it writes, and the daemon
        /// folds its dirty bitmap into the log.
        case iommuDirty = "iommu-dirty"
    }
    public var relay: RelayHalves
    public var method: Method
    public var log: LogGranularity

    public init(relay: RelayHalves = .used, method: Method = .relay, log: LogGranularity = .exact) {
        self.relay = relay
        self.method = method
        self.log = log
    }

    /// As `--port` options, or nil for the defaults.
    public var description: String {
        var parts: [String] = []
        if method != .relay { parts.append("migration=\(method.rawValue)") }
        if relay != .used { parts.append("relay=\(relay.rawValue)") }
        if log != .exact { parts.append("log=\(log.rawValue)") }
        return parts.isEmpty ? "migration=relay,relay=used,log=exact" : parts.joined(separator: ",")
    }
}

/// One `--port` option:
/// `socket=PATH[,id=NAME][,link=LINK][,queues=N][,mac=MAC][,client][,device=DEVICE][,features=LIST][,offloads=on|off]`
/// `[,relay=used|avail+used][,migration=relay|iommu-dirty][,log=exact|buffer|page-run]`.
public struct PortSpec: Equatable, Sendable {
    /// Which vDPA device serves the port (`device=`).
    public enum Device: Equatable, Sendable, CustomStringConvertible {
        /// The software NIC (the default); `link=` and `mac=` configure it.
        case softnic
        /// A kernel vDPA device bound to vhost_vdpa: `device=vhost-vdpa:/dev/vhost-vdpa-N`.
        case vhostVDPA(path: String)
        public var description: String {
            switch self {
            case .softnic: "softnic"
            case .vhostVDPA(let p): "vhost-vdpa:\(p)"
            }
        }
    }

    public var id: String
    public var socketPath: String
    public var client: Bool
    public var queuePairs: Int
    /// The host link, as given to `link=` (the device parses it).
    public var link: String
    /// The guest's MAC (`mac=`), used as the destination of generated frames.
    public var mac: [UInt8]?
    public var device: Device
    /// Whether `queues=` was given (a kernel device otherwise offers all its queue pairs).
    public var queuesGiven: Bool
    /// `features=`: the virtio feature bits the port may offer at most (nil: no list). The port
    /// offers its device's features within the migratable set and this list; vhost-user's own
    /// bits (PROTOCOL_FEATURES, LOG_ALL) are always offered.
    public var featureLimit: UInt64?
    /// `offloads=off` (false) withholds the checksum and segmentation offloads
    /// (`VirtioNetFeature.offloads`) whatever the device and `features=` allow.
    public var offloads: Bool
    /// `relay=`, `migration=`, `log=`: how a live migration is logged.
    public var migration: MigrationOptions

    public static let maxQueuePairs = 64

    public init(id: String, socketPath: String, client: Bool = false, queuePairs: Int = 1, link: String = "loopback", mac: [UInt8]? = nil,
                device: Device = .softnic, queuesGiven: Bool = false, featureLimit: UInt64? = nil, offloads: Bool = true,
                migration: MigrationOptions = MigrationOptions()) {
        self.migration = migration
        self.featureLimit = featureLimit
        self.offloads = offloads
        self.device = device
        self.queuesGiven = queuesGiven
        self.id = id
        self.socketPath = socketPath
        self.client = client
        self.queuePairs = queuePairs
        self.link = link
        self.mac = mac
    }

    /// The virtio feature bits `features=` and `offloads=` let the port offer (all bits without either).
    public var featureMask: UInt64 {
        (featureLimit ?? ~0) & (offloads ? ~0 : ~VirtioNetFeature.offloads)
    }

    /// `features=` and `offloads=` as `--port` options (names in the canonical case, bits without
    /// a name as hex), or nil when neither restricts the port.
    public var featureLimitDescription: String? {
        var parts: [String] = []
        if let featureLimit {
            let names = VirtioFeatureName.names(of: featureLimit)
            parts.append("features=" + (names.isEmpty ? "0x0" : names.joined(separator: "+")))
        }
        if !offloads { parts.append("offloads=off") }
        return parts.isEmpty ? nil : parts.joined(separator: ",")
    }

    public struct ParseError: Error, CustomStringConvertible, Equatable {
        public let message: String
        public var description: String { message }
    }

    /// Parses one `--port` value; `defaultID` names the port when `id=` is absent.
    /// Paths containing `,` are not supported: the comma separates options.
    public static func parse(_ text: String, defaultID: String) throws(ParseError) -> PortSpec {
        var id: String?
        var socket: String?
        var client = false
        var queues = 1
        var link = "loopback"
        var mac: [UInt8]?
        var device = Device.softnic
        var linkGiven = false
        var queuesGiven = false
        var featureLimit: UInt64?
        var offloads: Bool?
        var relay: MigrationOptions.RelayHalves?
        var method: MigrationOptions.Method?
        var log: LogGranularity?
        for item in text.split(separator: ",", omittingEmptySubsequences: false) {
            let parts = item.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let key = String(parts[0])
            let value = parts.count > 1 ? String(parts[1]) : nil
            switch (key, value) {
            case ("socket", let v?) where !v.isEmpty:
                socket = v
            case ("id", let v?):
                guard !v.isEmpty, v.utf8.count <= 64, v.allSatisfy({ $0.isLetter || $0.isNumber || "-_.".contains($0) }) else {
                    throw ParseError(message: "--port \(text): id '\(v)' must be 1-64 letters, digits, '-', '_' or '.'")
                }
                id = v
            case ("link", let v?) where !v.isEmpty:
                link = v
                linkGiven = true
            case ("device", "softnic"):
                device = .softnic
            case ("device", let v?) where v.hasPrefix("vhost-vdpa:"):
                let path = String(v.dropFirst("vhost-vdpa:".count))
                guard path.hasPrefix("/"), path.utf8.count < 4096 else {
                    throw ParseError(message: "--port \(text): device=\(v): give the vhost-vdpa character device's absolute path, e.g. device=vhost-vdpa:/dev/vhost-vdpa-0")
                }
                device = .vhostVDPA(path: path)
            case ("device", let v?):
                throw ParseError(message: "--port \(text): device=\(v) is not a device; expected device=softnic or device=vhost-vdpa:/dev/vhost-vdpa-N")
            case ("mac", let v?):
                let parts = v.split(separator: ":", omittingEmptySubsequences: false)
                let bytes = parts.compactMap { $0.count == 2 ? UInt8($0, radix: 16) : nil }
                guard parts.count == 6, bytes.count == 6, bytes[0] & 1 == 0 else {
                    throw ParseError(message: "--port \(text): mac=\(v) must be a unicast MAC like 52:54:00:12:34:56")
                }
                mac = bytes
            case ("relay", let v):
                guard let r = v.flatMap(MigrationOptions.RelayHalves.init(rawValue:)) else {
                    throw ParseError(message: "--port \(text): relay=\(v ?? ""): expected relay=used (the default) or relay=avail+used")
                }
                guard relay == nil || relay == r else { throw ParseError(message: "--port \(text): relay= given twice") }
                relay = r
            case ("migration", let v):
                guard let m = v.flatMap(MigrationOptions.Method.init(rawValue:)) else {
                    throw ParseError(message: "--port \(text): migration=\(v ?? ""): expected migration=relay (the default) or migration=iommu-dirty")
                }
                guard method == nil || method == m else { throw ParseError(message: "--port \(text): migration= given twice") }
                method = m
            case ("log", let v):
                guard let g = v.flatMap(LogGranularity.init(rawValue:)) else {
                    throw ParseError(message: "--port \(text): log=\(v ?? ""): expected log=exact (the default), log=buffer or log=page-run")
                }
                guard log == nil || log == g else { throw ParseError(message: "--port \(text): log= given twice") }
                log = g
            case ("features", let v?):
                guard featureLimit == nil else { throw ParseError(message: "--port \(text): features= given twice; give one '+'-separated list") }
                featureLimit = try parseFeatureList(v, option: text)
            case ("offloads", let v?) where v == "on" || v == "off":
                guard offloads == nil else { throw ParseError(message: "--port \(text): offloads= given twice") }
                offloads = v == "on"
            case ("offloads", let v):
                throw ParseError(message: "--port \(text): offloads=\(v ?? ""): expected offloads=on or offloads=off")
            case ("features", nil):
                throw ParseError(message: "--port \(text): features needs a list, e.g. features=VERSION_1+MRG_RXBUF+EVENT_IDX")
            case ("client", nil):
                client = true
            case ("queues", let v?):
                guard let n = Int(v), n >= 1, n <= maxQueuePairs else {
                    throw ParseError(message: "--port \(text): queues=\(v) must be a number of queue pairs in 1...\(maxQueuePairs)")
                }
                queues = n
                queuesGiven = true
            case ("", nil):
                throw ParseError(message: "--port \(text): empty option (note: socket paths containing ',' are not supported)")
            default:
                if socket != nil && value == nil {
                    throw ParseError(message: "--port \(text): unknown option '\(key)' (socket paths containing ',' are not supported)")
                }
                throw ParseError(message: "--port \(text): unknown or malformed option '\(item)'; expected socket=PATH[,id=NAME][,link=LINK][,queues=N][,mac=MAC][,client][,device=DEVICE][,features=LIST][,offloads=on|off][,relay=used|avail+used][,migration=relay|iommu-dirty][,log=exact|buffer|page-run]")
            }
        }
        guard let socket else { throw ParseError(message: "--port \(text): socket=PATH is required") }
        if case .vhostVDPA = device, linkGiven || mac != nil {
            throw ParseError(message: "--port \(text): link= and mac= configure the software NIC; a vhost-vdpa device has its own link and MAC")
        }
        let options = MigrationOptions(relay: relay ?? .used, method: method ?? .relay, log: log ?? .exact)
        if options.method == .iommuDirty && (relay != nil || log != nil) {
            throw ParseError(message: "--port \(text): migration=iommu-dirty keeps the rings direct (the device's IOMMU records what it writes): relay= and log= apply to migration=relay only")
        }
        return PortSpec(id: id ?? defaultID, socketPath: socket, client: client, queuePairs: queues, link: link, mac: mac,
                        device: device, queuesGiven: queuesGiven, featureLimit: featureLimit, offloads: offloads ?? true,
                        migration: options)
    }

    /// `features=`'s list: feature names as `describeFeatures` prints them (any case) or hex bits
    /// (`0x...`), separated by '+' (',' separates the `--port` options). Repeated names are fine.
    static func parseFeatureList(_ list: String, option text: String) throws(ParseError) -> UInt64 {
        var bits: UInt64 = 0
        for item in list.split(separator: "+", omittingEmptySubsequences: false) {
            if item.isEmpty {
                throw ParseError(message: "--port \(text): features=\(list): empty name in the list (names are separated by one '+')")
            }
            if item.hasPrefix("0x") || item.hasPrefix("0X") {
                let digits = item.dropFirst(2)
                guard !digits.isEmpty, digits.count <= 16, digits.allSatisfy(\.isHexDigit), let v = UInt64(digits, radix: 16) else {
                    throw ParseError(message: "--port \(text): features=: '\(item)' is not a 64-bit hex number like 0x100000000")
                }
                bits |= v
            } else if let bit = VirtioFeatureName.bit(named: item) {
                bits |= bit
            } else {
                let known = VirtioFeatureName.all.map(\.name).joined(separator: ", ")
                throw ParseError(message: "--port \(text): features=: unknown feature '\(item)'; known: \(known) (or hex bits like 0x100000000)")
            }
        }
        return bits
    }
}
