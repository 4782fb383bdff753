#if canImport(Glibc)
import Glibc
#endif
import Foundation
import XCTest

/// The measuring tools of SoftNICAllocationTests: an LD_PRELOAD library that counts the
/// allocation calls one thread makes (built with the system C compiler), the symbolizing of the
/// call sites it samples, and glibc's heap-in-use figure.
enum MallocCounter {
    /// The library's C source: malloc and friends counted on the tracked thread, the first call
    /// sites sampled with backtrace().
    static let source = #"""
        #define _GNU_SOURCE
        #include <stddef.h>
        #include <errno.h>
        #include <unistd.h>
        #include <sys/syscall.h>
        #include <stdatomic.h>
        #include <execinfo.h>

        extern void *__libc_malloc(size_t);
        extern void *__libc_calloc(size_t, size_t);
        extern void *__libc_realloc(void *, size_t);
        extern void *__libc_memalign(size_t, size_t);

        static _Atomic long tracked_tid;
        static _Atomic unsigned long tracked_count;
        static _Atomic unsigned long tracked_bytes;
        static __thread int my_tid __attribute__((tls_model("initial-exec")));
        static __thread int in_hook __attribute__((tls_model("initial-exec")));
        #define SAMPLES 16
        #define DEPTH 16
        static void *sample_frames[SAMPLES][DEPTH];
        static int sample_depth[SAMPLES];
        static size_t sample_size[SAMPLES];
        static _Atomic int sample_count;

        static inline void note(size_t size) {
            long t = atomic_load_explicit(&tracked_tid, memory_order_relaxed);
            if (!t) return;
            if (!my_tid) my_tid = (int)syscall(SYS_gettid);
            if (my_tid != t || in_hook) return;
            atomic_fetch_add_explicit(&tracked_count, 1, memory_order_relaxed);
            atomic_fetch_add_explicit(&tracked_bytes, size, memory_order_relaxed);
            int i = atomic_fetch_add_explicit(&sample_count, 1, memory_order_relaxed);
            if (i < SAMPLES) {
                in_hook = 1;
                sample_depth[i] = backtrace(sample_frames[i], DEPTH);
                sample_size[i] = size;
                in_hook = 0;
            }
        }

        void *malloc(size_t n) { note(n); return __libc_malloc(n); }
        void *calloc(size_t a, size_t b) { note(a * b); return __libc_calloc(a, b); }
        void *realloc(void *p, size_t n) { note(n); return __libc_realloc(p, n); }
        void *memalign(size_t a, size_t n) { note(n); return __libc_memalign(a, n); }
        void *aligned_alloc(size_t a, size_t n) { note(n); return __libc_memalign(a, n); }
        int posix_memalign(void **out, size_t a, size_t n) {
            if (a < sizeof(void *) || (a & (a - 1))) return EINVAL;
            note(n);
            void *p = __libc_memalign(a, n);
            if (!p) return ENOMEM;
            *out = p;
            return 0;
        }

        /* Starts counting calls made on thread `tid` (from zero); 0 stops counting. */
        void softnic_alloc_track(long tid) {
            if (tid) {
                atomic_store(&tracked_count, 0);
                atomic_store(&tracked_bytes, 0);
                atomic_store(&sample_count, 0);
            }
            atomic_store(&tracked_tid, tid);
        }
        unsigned long softnic_alloc_count(void) { return atomic_load(&tracked_count); }
        unsigned long softnic_alloc_bytes(void) { return atomic_load(&tracked_bytes); }
        int softnic_alloc_samples(void) { int n = atomic_load(&sample_count); return n < SAMPLES ? n : SAMPLES; }
        /* Writes sample i's frames (symbolized) to fd. */
        void softnic_alloc_print_sample(int i, int fd) {
            backtrace_symbols_fd(sample_frames[i], sample_depth[i], fd);
        }
        unsigned long softnic_alloc_sample_size(int i) { return sample_size[i]; }
        """#

    /// The counter library, built with the system C compiler.
    static func build(in dir: String) throws -> String {
        let cc = ["/usr/bin/cc", "/usr/bin/gcc", "/usr/bin/clang"].first { FileManager.default.isExecutableFile(atPath: $0) }
        guard let cc else { throw XCTSkip("no C compiler to build the malloc-counting library") }
        let src = dir + "/count-malloc.c", lib = dir + "/count-malloc.so"
        try source.write(toFile: src, atomically: true, encoding: .utf8)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: cc)
        p.arguments = ["-shared", "-fPIC", "-O2", "-o", lib, src]
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw XCTSkip("\(cc) could not build the malloc-counting library") }
        return lib
    }

    /// Resolves "executable(+0xOFFSET)" frames of a backtrace_symbols text with addr2line and
    /// swift-demangle when they are installed; otherwise returns the text as it is.
    /// Runs `test` in a child process with the counter preloaded; the child writes KEY=VALUE
    /// lines to the file named by environment variable `resultVariable`. Returns them (empty
    /// when the child wrote none) and the child's result.
    static func runChild(test: String, resultVariable: String) throws -> (values: [String: Int], child: ChildProcess.Result) {
        let dir = NSTemporaryDirectory() + "malloc-count-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let lib = try build(in: dir)
        let resultPath = dir + "/result.txt"
        let r = try ChildProcess.run(test: test, environment: ["LD_PRELOAD": lib, resultVariable: resultPath], timeout: 120)
        let text = (try? String(contentsOfFile: resultPath, encoding: .utf8)) ?? ""
        var values: [String: Int] = [:]
        for line in text.split(separator: "\n") {
            let kv = line.split(separator: "=", maxSplits: 1)
            if kv.count == 2, let v = Int(kv[1]) { values[String(kv[0])] = v }
        }
        return (values, r)
    }

    static func symbolize(_ text: String) -> String {
        guard let exe = ChildProcess.executable, FileManager.default.isExecutableFile(atPath: "/usr/bin/addr2line") else { return text }
        var out: [String] = []
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            guard line.contains(URL(fileURLWithPath: exe).lastPathComponent), let open = line.range(of: "(+0x"),
                  let close = line[open.upperBound...].firstIndex(of: ")") else {
                out.append(String(line))
                continue
            }
            let offset = "0x" + line[open.upperBound..<close]
            var resolved = run("/usr/bin/addr2line", ["-f", "-e", exe, offset]).replacingOccurrences(of: "\n", with: " ")
            for demangler in ["/opt/swift/usr/bin/swift-demangle", "/usr/bin/swift-demangle"]
            where FileManager.default.isExecutableFile(atPath: demangler) {
                resolved = run(demangler, ["--simplified", resolved.split(separator: " ").first.map(String.init) ?? ""])
                    .trimmingCharacters(in: .whitespacesAndNewlines) + " " + (resolved.split(separator: " ").dropFirst().first ?? "")
                break
            }
            out.append("    " + resolved)
        }
        return out.joined(separator: "\n")
    }

    static func run(_ path: String, _ args: [String]) -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = args
        let pipe = Pipe()
        p.standardOutput = pipe
        guard (try? p.run()) != nil else { return "" }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return String(decoding: data, as: UTF8.self)
    }

    /// The kernel thread id of this process's thread named `name` (prctl name, 15 bytes).
    static func threadID(named name: String) -> Int? {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
        for t in tasks {
            let comm = (try? String(contentsOfFile: "/proc/self/task/\(t)/comm", encoding: .utf8)) ?? ""
            if comm.trimmingCharacters(in: .whitespacesAndNewlines) == String(name.prefix(15)) { return Int(t) }
        }
        return nil
    }
}

/// glibc's mallinfo2(), looked up at run time (Swift does not import <malloc.h>).
enum HeapProbe {
    /// Bytes in use: `uordblks` (allocated from arenas) + `hblkhd` (mmapped chunks).
    static let heapInUse: (@Sendable () -> Int)? = {
        #if arch(x86_64)
        // struct mallinfo2 is ten size_t fields, returned in memory: on x86-64 the caller passes
        // the destination in %rdi and gets it back in %rax, i.e. `void *mallinfo2(void *out)`.
        typealias F = @convention(c) (UnsafeMutableRawPointer) -> UnsafeMutableRawPointer?
        guard let p = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "mallinfo2") else { return nil }
        let f = unsafeBitCast(p, to: F.self)
        return {
            var fields = [Int](repeating: 0, count: 10)
            fields.withUnsafeMutableBytes { _ = f($0.baseAddress!) }
            // arena, ordblks, smblks, hblks, hblkhd, usmblks, fsmblks, uordblks, fordblks, keepcost
            return fields[7] + fields[4]
        }
        #else
        return nil
        #endif
    }()
}
