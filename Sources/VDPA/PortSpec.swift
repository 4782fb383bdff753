/// One `--port` option: `socket=PATH[,id=NAME][,client][,queues=N]`.
public struct PortSpec: Equatable, Sendable {
    public var id: String
    public var socketPath: String
    public var client: Bool
    public var queuePairs: Int

    public static let maxQueuePairs = 64

    public init(id: String, socketPath: String, client: Bool = false, queuePairs: Int = 1) {
        self.id = id
        self.socketPath = socketPath
        self.client = client
        self.queuePairs = queuePairs
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
            case ("client", nil):
                client = true
            case ("queues", let v?):
                guard let n = Int(v), n >= 1, n <= maxQueuePairs else {
                    throw ParseError(message: "--port \(text): queues=\(v) must be a number of queue pairs in 1...\(maxQueuePairs)")
                }
                queues = n
            case ("", nil):
                throw ParseError(message: "--port \(text): empty option (note: socket paths containing ',' are not supported)")
            default:
                if socket != nil && value == nil {
                    throw ParseError(message: "--port \(text): unknown option '\(key)' (socket paths containing ',' are not supported)")
                }
                throw ParseError(message: "--port \(text): unknown or malformed option '\(item)'; expected socket=PATH[,id=NAME][,client][,queues=N]")
            }
        }
        guard let socket else { throw ParseError(message: "--port \(text): socket=PATH is required") }
        return PortSpec(id: id ?? defaultID, socketPath: socket, client: client, queuePairs: queues)
    }
}
