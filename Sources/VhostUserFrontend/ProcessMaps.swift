import Platform

/// This process's memory mappings as /proc/self/maps lists them: what a test reads to show that
/// a backend in the same process keeps (or no longer keeps) a frontend's files mapped.
public enum ProcessMaps {
    /// Sizes of this process's mappings of the memfd named `name` (memfd_create's name). Throws
    /// when /proc/self/maps cannot be read, so that "no mapping left" is never concluded from an
    /// empty read.
    public static func sizes(ofMemfdNamed name: String) throws(SystemError) -> [UInt64] {
        try FileSystem.readText("/proc/self/maps").split(separator: "\n").filter { $0.contains("/memfd:\(name) ") }.compactMap { line in
            let range = line.split(separator: " ")[0].split(separator: "-")
            guard range.count == 2, let lo = UInt64(range[0], radix: 16), let hi = UInt64(range[1], radix: 16) else { return nil }
            return hi - lo
        }
    }
}
