// This process's fds and threads, counted before the first input and after each one
// (session-engine fuzz target: see main.swift).

#if canImport(Glibc)
import Glibc
#endif

/// The fds of the kinds the session, the device and the relay open (memfds, eventfds, epoll
/// instances, mappings' files, sockets), by number and target. Other fds are left out: the
/// sanitizer runtime opens pipes to its symbolizer the first time libFuzzer prints a new function.
func ownFDs() -> [String] {
    var out: [String] = []
    guard let d = opendir("/proc/self/fd") else { return ["?"] }
    defer { closedir(d) }
    let ownDir = dirfd(d)
    while let e = readdir(d) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
        guard name != ".", name != "..", Int32(name) != ownDir else { continue }
        var buf = [CChar](repeating: 0, count: 256)
        let n = readlink("/proc/self/fd/\(name)", &buf, 255)
        let target = n > 0 ? String(cString: buf) : "?"
        if target.hasPrefix("anon_inode:") || target.hasPrefix("/memfd:") || target.hasPrefix("socket:") {
            out.append("\(name)=\(target)")
        }
    }
    return out.sorted()
}

/// The names of this process's threads.
func threadNames() -> [String] {
    var out: [String] = []
    guard let d = opendir("/proc/self/task") else { return ["?"] }
    defer { closedir(d) }
    while let e = readdir(d) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
        guard name != ".", name != ".." else { continue }
        var comm = "?"
        if let f = fopen("/proc/self/task/\(name)/comm", "r") {
            var buf = [CChar](repeating: 0, count: 64)
            if fgets(&buf, 64, f) != nil { comm = String(cString: buf).trimmingSuffixNewline }
            fclose(f)
        }
        out.append("\(name):\(comm)")
    }
    return out
}

extension String {
    var trimmingSuffixNewline: String { hasSuffix("\n") ? String(dropLast()) : self }
}

func countEntries(_ path: String) -> Int {
    guard let d = opendir(path) else { return -1 }
    defer { closedir(d) }
    var n = 0
    while let e = readdir(d) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
        if name != "." && name != ".." { n += 1 }
    }
    return n
}
