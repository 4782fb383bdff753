import Relay
import Synchronization

/// Where a ring's completions go. One owner: the port's `MigrationSwitch` sets it; status and
/// stats report its raw value.
public enum RingMode: String, Sendable, Equatable {
    /// The device completes into the guest's used ring.
    case direct
    /// Started, or running, while LOG_ALL is on but before the frontend sent the log: the device
    /// keeps it disabled (none of its completions could be logged yet) until the log arrives.
    case held
    /// The device completes into a mediated used ring; the relay copies and marks.
    case relay
}

/// Per-ring migration figures the port reports (stats JSON).
public struct RingMigrationStats: Sendable, Equatable {
    public var mode: RingMode = .direct
    public var switchovers = 0
    public var lastSwitchoverGapMicros: UInt64 = 0
    public var counters: RelayCounters?
    public static func == (a: Self, b: Self) -> Bool {
        a.mode == b.mode && a.switchovers == b.switchovers && a.lastSwitchoverGapMicros == b.lastSwitchoverGapMicros
            && a.counters === b.counters
    }
}

/// How long the port took to answer the SET_FEATURES messages that turned dirty logging on
/// (switchover) or off (switch-back): from the whole message read to the reply handed to the socket (QEMU waits
/// for that reply holding its main loop). Stats JSON `logAllReplies`.
public struct LogAllReplyStats: Codable, Sendable, Equatable {
    public struct Times: Codable, Sendable, Equatable {
        public var count: UInt64 = 0
        public var lastMicros: UInt64 = 0
        public var maxMicros: UInt64 = 0
        /// Replies that took longer than 1 ms.
        public var overOneMillisecond: UInt64 = 0
        /// The last 32 replies' times, oldest first.
        public var recentMicros: [UInt64] = []
        public init() {}

        mutating func record(_ micros: UInt64) {
            count += 1
            lastMicros = micros
            maxMicros = max(maxMicros, micros)
            if micros > 1000 { overOneMillisecond += 1 }
            if recentMicros.count == 32 { recentMicros.removeFirst() }
            recentMicros.append(micros)
        }
    }
    /// LOG_ALL turned on: the rings go to the relay (or are held until the log arrives).
    public var on = Times()
    /// LOG_ALL turned off: the rings go back to the direct path.
    public var off = Times()
    public init() {}
}

/// The per-ring migration figures, shared between the port thread and the control thread.
public final class MigrationStatsTable: Sendable {
    let table = Mutex<[Int: RingMigrationStats]>([:])
    /// Reply times of the SET_FEATURES messages that toggled LOG_ALL.
    public let logAllReplies = Mutex(LogAllReplyStats())
    /// The port's relay thread, once one exists (for its CPU figures).
    public let relay = Mutex<RelayEngine?>(nil)
    /// `migration=iommu-dirty` ports: the folder's figures (nil for the relay).
    public let dirtyTracking = Mutex<DirtyTrackingStats?>(nil)
    public init() {}
    public func withLock<R>(_ body: (inout [Int: RingMigrationStats]) -> R) -> R { table.withLock { body(&$0) } }
    public var snapshot: [Int: RingMigrationStats] { table.withLock { $0 } }
}

/// Test-only switches, from VDPAD_TEST_* environment variables (docs/TESTING.md).
public struct TestSwitches: Sendable {
    public var skipBufferMarking = false
    public var journal: (any RelayJournal)?
    /// VDPAD_TEST_SKIP_DIRTY_FOLD=1: `migration=iommu-dirty` folds read the device's bits and
    /// drop them instead of logging them (the negative control of the marking checks).
    public var skipDirtyFold = false
    /// VDPAD_TEST_DIRTY_FOLD_PERIOD_MS: the background fold period of `migration=iommu-dirty`
    /// ports instead of the default (0: no background folds, only those replies need), so a
    /// test can tell which fold carried a page.
    public var dirtyFoldPeriodMillis: Int?
    public init(skipBufferMarking: Bool = false, journal: (any RelayJournal)? = nil, skipDirtyFold: Bool = false,
                dirtyFoldPeriodMillis: Int? = nil) {
        self.skipBufferMarking = skipBufferMarking
        self.journal = journal
        self.skipDirtyFold = skipDirtyFold
        self.dirtyFoldPeriodMillis = dirtyFoldPeriodMillis
    }
}
