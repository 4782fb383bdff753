#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims

/// A plain pthread for loops that are not Swift tasks (port loops, DMA engines, relays).
public final class OSThread: @unchecked Sendable {
    // @unchecked Sendable: `handle` is written once in init before any other thread sees the object,
    // and `join` is called at most once by the owner.
    private var handle: pthread_t
    private var joined = false

    private final class Box {
        let body: @Sendable () -> Void
        let name: String
        init(_ body: @escaping @Sendable () -> Void, _ name: String) { self.body = body; self.name = name }
    }

    /// Starts `body` on a new thread named `name` (at most 15 bytes are kept by the kernel).
    public init(name: String, _ body: @escaping @Sendable () -> Void) throws(SystemError) {
        let box = Unmanaged.passRetained(Box(body, name)).toOpaque()
        var t = pthread_t()
        let r = pthread_create(&t, nil, { arg in
            let box = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
            cvdpa_set_thread_name(String(box.name.prefix(15)))
            box.body()
            return nil
        }, box)
        if r != 0 {
            Unmanaged<Box>.fromOpaque(box).release()
            throw SystemError("pthread_create", errno: r)
        }
        handle = t
    }

    /// Waits for the thread to finish. Call once.
    public func join() {
        guard !joined else { return }
        joined = true
        // Fails only for a thread that is not joinable or is the caller (EINVAL, EDEADLK): a
        // thread this object started and has not joined yet is neither.
        _ = pthread_join(handle, nil)
    }
}

/// Turns SIGTERM/SIGINT into an eventfd that a loop can wait on. The handler only writes to the
/// eventfd, which is async-signal-safe. SIGPIPE is ignored (sockets also use MSG_NOSIGNAL).
public enum SignalNotifier {
    nonisolated(unsafe) static var fd: Int32 = -1

    /// Installs handlers for `signals`; returns the eventfd they signal (owned by the process).
    public static func install(_ signals: [Int32]) throws(SystemError) -> Int32 {
        if fd < 0 { fd = try EventFD.make().take() }
        for s in signals {
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { _ in
                // Async-signal-safe: one write(2) to an eventfd; its result cannot be acted on here.
                var one: UInt64 = 1
                _ = write(SignalNotifier.fd, &one, 8)
            }
            sigemptyset(&action.sa_mask)
            action.sa_flags = SA_RESTART
            try syscallRetrying("sigaction(\(s))") { sigaction(s, &action, nil) }
        }
        var ignore = sigaction()
        ignore.__sigaction_handler.sa_handler = SIG_IGN
        sigemptyset(&ignore.sa_mask)
        try syscallRetrying("sigaction(SIGPIPE)") { sigaction(SIGPIPE, &ignore, nil) }
        return fd
    }

    /// Installs handlers for SIGTERM and SIGINT (see `install`): what a daemon stops on.
    public static func installTermination() throws(SystemError) -> Int32 {
        try install([SIGTERM, SIGINT])
    }
}
