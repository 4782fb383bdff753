/// A port's host link, from `link=`: loopback | sink | source[:size=B][:rate=PPS] | tap[:ifname=IF][:zerocopy=off] | wire:ID.
public enum LinkSpec: Equatable, Sendable, CustomStringConvertible {
    case loopback
    case sink
    case source(frameSize: Int, rate: UInt64)
    /// `zeroCopy: false` (`zerocopy=off`) makes the tap copy every frame through the device's
    /// buffer, as before zero-copy (for comparison, and as a fallback).
    case tap(ifname: String?, zeroCopy: Bool = true)
    case wire(peer: String)

    public static let minFrame = 60
    public static let maxFrame = 9018
    /// The largest frame with a segmentation offload (GSO): 64 KiB of IP packet plus an Ethernet
    /// header and one VLAN tag.
    public static let maxGSOFrame = 65_536 + 18

    public struct ParseError: Error, CustomStringConvertible {
        public let message: String
        public var description: String { message }
    }

    public static func parse(_ text: String) throws(ParseError) -> LinkSpec {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
        func options(_ allowed: Set<String>) throws(ParseError) -> [String: String] {
            var out: [String: String] = [:]
            for p in parts.dropFirst() {
                let kv = p.split(separator: "=", maxSplits: 1).map(String.init)
                guard kv.count == 2, allowed.contains(kv[0]), !kv[1].isEmpty else {
                    throw ParseError(message: "link=\(text): unknown option '\(p)' (allowed: \(allowed.sorted().joined(separator: ", ")))")
                }
                out[kv[0]] = kv[1]
            }
            return out
        }
        switch parts[0] {
        case "loopback":
            _ = try options([])
            return .loopback
        case "sink":
            _ = try options([])
            return .sink
        case "source":
            let o = try options(["size", "rate"])
            var size = 64
            var rate: UInt64 = 0
            if let s = o["size"] {
                guard let v = Int(s), v >= minFrame, v <= maxFrame else {
                    throw ParseError(message: "link=\(text): size=\(s) must be \(minFrame)...\(maxFrame) bytes")
                }
                size = v
            }
            if let r = o["rate"] {
                guard let v = UInt64(r) else { throw ParseError(message: "link=\(text): rate=\(r) must be frames per second") }
                rate = v
            }
            return .source(frameSize: size, rate: rate)
        case "tap":
            let o = try options(["ifname", "zerocopy"])
            if let n = o["ifname"], n.utf8.count > 15 {
                throw ParseError(message: "link=\(text): ifname '\(n)' is longer than 15 bytes")
            }
            var zeroCopy = true
            if let z = o["zerocopy"] {
                guard z == "on" || z == "off" else { throw ParseError(message: "link=\(text): zerocopy=\(z) must be on or off") }
                zeroCopy = z == "on"
            }
            return .tap(ifname: o["ifname"], zeroCopy: zeroCopy)
        case "wire":
            guard parts.count == 2, !parts[1].isEmpty else {
                throw ParseError(message: "link=\(text): expected wire:ID with the id of another port of this daemon")
            }
            return .wire(peer: parts[1])
        default:
            throw ParseError(message: "link=\(text): unknown link; use loopback, sink, source[:size=B][:rate=PPS], tap[:ifname=IF][:zerocopy=off] or wire:ID")
        }
    }

    public var description: String {
        switch self {
        case .loopback: "loopback"
        case .sink: "sink"
        case .source(let size, let rate): "source:size=\(size):rate=\(rate)"
        case .tap(let n, let z): (n.map { "tap:ifname=\($0)" } ?? "tap") + (z ? "" : ":zerocopy=off")
        case .wire(let p): "wire:\(p)"
        }
    }
}
