#if canImport(Glibc)
import Glibc
#endif

/// This process's memory mappings as /proc/self/maps lists them: what a test reads to show that
/// a backend in the same process keeps (or no longer keeps) a frontend's files mapped.
public enum ProcessMaps {
    /// Sizes of this process's mappings of the memfd named `name` (memfd_create's name).
    public static func sizes(ofMemfdNamed name: String) -> [UInt64] {
        read("/proc/self/maps").split(separator: "\n").filter { $0.contains("/memfd:\(name) ") }.compactMap { line in
            let range = line.split(separator: " ")[0].split(separator: "-")
            guard range.count == 2, let lo = UInt64(range[0], radix: 16), let hi = UInt64(range[1], radix: 16) else { return nil }
            return hi - lo
        }
    }

    /// Reads a /proc file whole (they report a size of 0, so read until EOF). "" if unreadable.
    static func read(_ path: String) -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return "" }
        defer { close(fd) }
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            out += chunk[0..<n]
        }
        return String(decoding: out, as: UTF8.self)
    }
}
