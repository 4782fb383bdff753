import Foundation
import TOMLKit
import VDPA

/// `vdpad --config PATH`: a TOML file with the daemon's options as top-level keys (their
/// command-line names without the dashes: `control`, `log-level`, ...) and one `[[port]]` table
/// per port whose keys are the `--port` options (`socket`, `id`, `link`, `queues`, `mac`,
/// `client`, `device`, `features`, `offloads`, `relay`, `migration`, `log`). Each port table is
/// turned into the `--port` text and parsed by `PortSpec.parse`, so both say the same. Errors name
/// the file, the line and the key.
public struct ConfigFile: Sendable {
    /// Daemon options given in the file, by their command-line name.
    public var options: [String: String]
    public var ports: [PortSpec]

    /// The daemon options a file may set (vdpad's long option names).
    public static let daemonKeys = ["control", "log-level", "log-format", "relay-loop", "socket-group", "socket-mode",
                                    "control-mode", "control-group", "control-max-clients", "control-idle-timeout"]
    /// The keys of a `[[port]]` table, in the order the `--port` text is built.
    public static let portKeys = ["socket", "id", "link", "queues", "mac", "client", "device", "features", "offloads",
                                  "relay", "migration", "log"]

    public struct Error: Swift.Error, CustomStringConvertible, Equatable {
        public let file: String
        public let line: Int?
        public let key: String?
        public let message: String
        public var description: String {
            "\(file)" + (line.map { ":\($0)" } ?? "") + (key.map { ": \($0)" } ?? "") + ": " + message
        }
    }

    public static func load(path: String) throws(Error) -> ConfigFile {
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw Error(file: path, line: nil, key: nil, message: "cannot read the configuration file (\(error.localizedDescription))")
        }
        return try parse(text, file: path)
    }

    public static func parse(_ text: String, file: String) throws(Error) -> ConfigFile {
        let table: TOMLTable
        do { table = try TOMLTable(string: text) } catch let e as TOMLParseError {
            throw Error(file: file, line: e.source.begin.line, key: nil, message: "not TOML: \(e.description)")
        } catch {
            throw Error(file: file, line: nil, key: nil, message: "not TOML: \(error)")
        }
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        var options: [String: String] = [:]
        for key in table.keys.sorted() where key != "port" {
            let line = Self.line(of: key, portTable: nil, in: lines)
            guard daemonKeys.contains(key) else {
                throw Error(file: file, line: line, key: key, message: "unknown option; the daemon's are \(daemonKeys.joined(separator: ", ")), and [[port]] tables")
            }
            guard let value = table[key].flatMap(Self.scalar) else {
                throw Error(file: file, line: line, key: key, message: "expected a string or a number")
            }
            options[key] = value
        }
        var ports: [PortSpec] = []
        if let node = table["port"] {
            guard let array = node.array else {
                throw Error(file: file, line: Self.line(of: "port", portTable: nil, in: lines), key: "port",
                            message: "ports are [[port]] tables (an array of tables)")
            }
            for (n, element) in array.enumerated() {
                let header = Self.portHeaderLine(n, in: lines)
                guard let t = element.table else {
                    throw Error(file: file, line: header, key: "port", message: "port \(n + 1) is not a table")
                }
                ports.append(try Self.port(t, number: n, lines: lines, header: header, file: file))
            }
        }
        return ConfigFile(options: options, ports: ports)
    }

    /// One `[[port]]` table as a PortSpec, through the `--port` text.
    static func port(_ t: TOMLTable, number n: Int, lines: [String], header: Int?, file: String) throws(Error) -> PortSpec {
        for key in t.keys where !portKeys.contains(key) {
            throw Error(file: file, line: Self.line(of: key, portTable: n, in: lines), key: key,
                        message: "unknown port option; known: \(portKeys.joined(separator: ", "))")
        }
        var items: [(key: String, text: String)] = []
        for key in portKeys {
            guard let v = t[key] else { continue }
            let line = Self.line(of: key, portTable: n, in: lines)
            if key == "client" || key == "offloads", let b = v.bool {
                if key == "client" { if b { items.append((key, "client")) } } else { items.append((key, "offloads=\(b ? "on" : "off")")) }
                continue
            }
            guard let s = Self.scalar(v) else {
                throw Error(file: file, line: line, key: key, message: "expected a string or a number")
            }
            guard !s.contains(",") else {
                throw Error(file: file, line: line, key: key, message: "'\(s)' contains ',', which separates the --port options")
            }
            items.append((key, key == "client" ? "client=\(s)" : "\(key)=\(s)"))
        }
        let textOf = items.map(\.text).joined(separator: ",")
        do {
            return try PortSpec.parse(textOf, defaultID: "vdpa\(n)")
        } catch {
            // Which key: the first that is refused on its own (with a socket to make it a port);
            // otherwise a combination, reported at the table's header.
            for item in items where item.key != "socket" {
                do { _ = try PortSpec.parse("socket=/x," + item.text, defaultID: "x") } catch {
                    // Without the probe's own `--port socket=/x,...:` prefix.
                    let message = error.message.replacingOccurrences(of: "--port socket=/x,\(item.text): ", with: "")
                    throw Error(file: file, line: Self.line(of: item.key, portTable: n, in: lines), key: item.key, message: message)
                }
            }
            throw Error(file: file, line: header, key: "port", message: error.message)
        }
    }

    /// A string, integer or float value as text.
    static func scalar(_ v: TOMLValueConvertible) -> String? {
        if let s = v.string { return s }
        if let i = v.int { return String(i) }
        if let d = v.double { return String(d) }
        return nil
    }

    /// The 1-based line of the `n`th `[[port]]` header.
    static func portHeaderLine(_ n: Int, in lines: [String]) -> Int? {
        var seen = -1
        for (i, l) in lines.enumerated() where isPortHeader(l) {
            seen += 1
            if seen == n { return i + 1 }
        }
        return nil
    }

    static func isPortHeader(_ l: String) -> Bool {
        l.trimmingCharacters(in: .whitespaces).replacingOccurrences(of: " ", with: "").hasPrefix("[[port]]")
    }

    /// The 1-based line where `key` is set: among the top-level keys (`portTable` nil: before any
    /// table header) or in the `n`th `[[port]]` table. Nil if it cannot be found (a quoted or
    /// dotted key: the error then names the key without a line).
    static func line(of key: String, portTable n: Int?, in lines: [String]) -> Int? {
        var start = 0
        if let n {
            guard let h = portHeaderLine(n, in: lines) else { return nil }
            start = h
        }
        for i in start..<lines.count {
            let t = lines[i].trimmingCharacters(in: .whitespaces)
            if t.hasPrefix("[") { return nil }
            if t.hasPrefix(key) {
                let rest = t.dropFirst(key.count).trimmingCharacters(in: .whitespaces)
                if rest.hasPrefix("=") { return i + 1 }
            }
        }
        return nil
    }
}
