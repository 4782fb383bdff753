/// One `--port` option: `socket=PATH[,id=NAME][,link=LINK][,queues=N][,mac=MAC][,client][,device=DEVICE]`.
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

    public static let maxQueuePairs = 64

    public init(id: String, socketPath: String, client: Bool = false, queuePairs: Int = 1, link: String = "loopback", mac: [UInt8]? = nil,
                device: Device = .softnic, queuesGiven: Bool = false) {
        self.device = device
        self.queuesGiven = queuesGiven
        self.id = id
        self.socketPath = socketPath
        self.client = client
        self.queuePairs = queuePairs
        self.link = link
        self.mac = mac
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
            case ("relay", "used"):
                break
            case ("relay", "avail+used"):
                throw ParseError(message: "--port \(text): relay=avail+used (the avail relay that checks chains before the device sees them) is not implemented yet; use relay=used (the default)")
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
                throw ParseError(message: "--port \(text): unknown or malformed option '\(item)'; expected socket=PATH[,id=NAME][,link=LINK][,queues=N][,mac=MAC][,client][,device=DEVICE]")
            }
        }
        guard let socket else { throw ParseError(message: "--port \(text): socket=PATH is required") }
        if case .vhostVDPA = device, linkGiven || mac != nil {
            throw ParseError(message: "--port \(text): link= and mac= configure the software NIC; a vhost-vdpa device has its own link and MAC")
        }
        return PortSpec(id: id ?? defaultID, socketPath: socket, client: client, queuePairs: queues, link: link, mac: mac,
                        device: device, queuesGiven: queuesGiven)
    }
}
