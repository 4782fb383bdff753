import Foundation
import Logging
import Synchronization

/// `vdpad --log-format json`: one JSON object per line on standard error, for log collectors:
/// `time` (RFC 3339, UTC, microseconds), `level`, `label`, `source` (the module), `message`, and
/// every metadata key as a string (`port` on every line about a port). Keys are sorted; a line
/// is written whole with one write(2), so lines from several threads never interleave.
public struct JSONLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level = .info
    public let label: String
    private let write: @Sendable (String) -> Void

    public init(label: String, write: @escaping @Sendable (String) -> Void = JSONLogHandler.standardError) {
        self.label = label
        self.write = write
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(level: Logger.Level, message: Logger.Message, metadata explicit: Logger.Metadata?, source: String,
                    file: String, function: String, line: UInt) {
        var fields: [String: String] = [:]
        for (k, v) in metadata { fields[k] = "\(v)" }
        if let explicit { for (k, v) in explicit { fields[k] = "\(v)" } }
        fields["time"] = Self.timestamp()
        fields["level"] = level.rawValue
        fields["label"] = label
        fields["source"] = source
        fields["message"] = message.description
        write(Self.encode(fields) + "\n")
    }

    /// One JSON object with the keys sorted, every value a string.
    static func encode(_ fields: [String: String]) -> String {
        "{" + fields.keys.sorted().map { "\(quote($0)):\(quote(fields[$0]!))" }.joined(separator: ",") + "}"
    }

    /// A JSON string literal (RFC 8259: quote, backslash and control characters escaped).
    static func quote(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where u.value < 0x20:
                let hex = String(u.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(u)
            }
        }
        return out + "\""
    }

    static func timestamp() -> String {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var t = time_t(ts.tv_sec)
        var tmv = tm()
        gmtime_r(&t, &tmv)
        return String(format: "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ", Int(tmv.tm_year) + 1900, Int(tmv.tm_mon) + 1, Int(tmv.tm_mday),
                      Int(tmv.tm_hour), Int(tmv.tm_min), Int(tmv.tm_sec), Int(ts.tv_nsec / 1000))
    }

    /// Writes a whole line to standard error with one write(2).
    public static let standardError: @Sendable (String) -> Void = { line in
        var bytes = Array(line.utf8)
        bytes.withUnsafeMutableBytes { raw in
            var done = 0
            while done < raw.count {
                let n = Glibc.write(2, raw.baseAddress! + done, raw.count - done)
                if n <= 0 { if n < 0 && errno == EINTR { continue }; return }
                done += n
            }
        }
    }
}
