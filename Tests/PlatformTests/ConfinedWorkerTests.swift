#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Platform
import Synchronization
import XCTest

/// A target whose loop sleeps on the worker's wake eventfd, or, once told to, blocks in a read on
/// a blocking pipe (as the engines once blocked on an eventfd a frontend made blocking again).
final class Counter: ConfinedTarget {
    let value = Atomic<Int>(0)
    let quarantined = Atomic<Int>(0)
    let blockInRead = Atomic<Bool>(false)
    let loopEnded = Atomic<Bool>(false)
    let inRead = Atomic<Bool>(false)
    let pipeRead: Int32
    let pipeWrite: Int32

    init() {
        var fds: [Int32] = [-1, -1]
        precondition(pipe(&fds) == 0)
        pipeRead = fds[0]
        pipeWrite = fds[1]
    }

    deinit {
        close(pipeRead)
        close(pipeWrite)
    }

    func run(on worker: ConfinedWorker<Counter>) {
        while !worker.stopRequested {
            if worker.hasPending { worker.runPending(self); continue }
            if blockInRead.load(ordering: .acquiring) {
                // Blocks until a signal interrupts it (EINTR: the handler has no SA_RESTART).
                var byte: UInt8 = 0
                inRead.store(true, ordering: .releasing)
                _ = read(pipeRead, &byte, 1)
                continue
            }
            var p = pollfd(fd: worker.wake.raw, events: Int16(POLLIN), revents: 0)
            _ = poll(&p, 1, 100)
            EventFD.drain(worker.wake.raw)
        }
        loopEnded.store(true, ordering: .releasing)
    }

    func quarantineBlockingFDs() {
        quarantined.add(1, ordering: .relaxed)
        blockInRead.store(false, ordering: .releasing)
    }
}

final class ConfinedWorkerTests: XCTestCase {
    func testPerformReturnsTheValueComputedOnTheOwnerThread() throws {
        let worker = try ConfinedWorker<Counter>(name: "worker-test")
        let target = Counter()
        try worker.start(target)
        defer { worker.stop() }
        let tid = try worker.perform { _ in UInt(pthread_self()) }
        XCTAssertNotEqual(tid, UInt(pthread_self()), "the body runs on the worker's thread")
        XCTAssertEqual(try worker.perform { $0.value.add(5, ordering: .relaxed).newValue }, 5)
        XCTAssertEqual(try worker.perform { $0.value.add(2, ordering: .relaxed).newValue }, 7)
        let optional: String? = try worker.perform { _ in nil }
        XCTAssertNil(optional, "an optional result comes back as it was returned")
    }

    /// A real-time caller lends its priority to the owner thread for the operation (so that an
    /// owner waiting for a CPU runs it at once), and the owner's own policy comes back after.
    func testRealTimeCallerLendsItsPriorityForTheOperation() throws {
        let worker = try ConfinedWorker<Counter>(name: "worker-prio")
        let target = Counter()
        try worker.start(target)
        defer { worker.stop() }
        XCTAssertNil(try worker.perform { _ in CurrentThread.realTimePriority }, "an ordinary caller lends nothing")
        var permitted = false
        let during: Int32?? = try CurrentThread.withRealTimePriority(3) { () throws -> Int32?? in
            permitted = CurrentThread.realTimePriority == 3
            return try worker.perform { _ in CurrentThread.realTimePriority }
        }
        try XCTSkipUnless(permitted, "SCHED_FIFO not permitted here (no CAP_SYS_NICE)")
        XCTAssertEqual(during, .some(3), "the owner ran the operation at the caller's priority")
        XCTAssertNil(CurrentThread.realTimePriority, "the caller's own policy is back")
        XCTAssertNil(try worker.perform { _ in CurrentThread.realTimePriority }, "the owner's own policy is back")
    }

    /// Once stopped, the thread has ended (the loop returned and was joined) and every operation
    /// fails at once with `.stopped`, without running.
    func testPerformFailsAtOnceAfterStop() throws {
        let worker = try ConfinedWorker<Counter>(name: "worker-test")
        let target = Counter()
        try worker.start(target)
        XCTAssertEqual(try worker.perform { $0.value.add(1, ordering: .relaxed).newValue }, 1)
        XCTAssertTrue(worker.stop())
        XCTAssertTrue(target.loopEnded.load(ordering: .acquiring), "stop returns after the loop ended")
        let start = Date()
        XCTAssertThrowsError(try worker.perform { $0.value.add(1, ordering: .relaxed) }) { error in
            XCTAssertEqual(error as? WorkerError, .stopped)
        }
        XCTAssertLessThan(Date().timeIntervalSince(start), 0.1)
        XCTAssertEqual(target.value.load(ordering: .relaxed), 1, "the refused operation did not run")
        XCTAssertTrue(worker.stop(), "a second stop has nothing to wait for")
    }

    /// A thread blocked in a system call is interrupted (real-time signal, no SA_RESTART): the call
    /// returns EINTR, the thread quarantines its blocking fds, runs the operation and returns its
    /// value within the second wait.
    func testStuckOwnerIsInterruptedAndThenAnswers() throws {
        let worker = try ConfinedWorker<Counter>(name: "worker-test", timeoutSeconds: 0.3)
        let target = Counter()
        try worker.start(target)
        defer { worker.stop() }
        try worker.perform { $0.blockInRead.store(true, ordering: .releasing) }
        // The next pass of the loop blocks in read() (the flag is set just before it).
        XCTAssertTrue(waitFor { target.inRead.load(ordering: .acquiring) })
        let start = Date()
        XCTAssertEqual(try worker.perform { $0.value.add(3, ordering: .relaxed).newValue }, 3)
        let waited = Date().timeIntervalSince(start)
        XCTAssertGreaterThanOrEqual(waited, 0.3, "answered only after the first wait and the interrupt")
        XCTAssertEqual(target.quarantined.load(ordering: .relaxed), 1, "quarantine ran before the operation")
    }

    /// A thread that does not answer even after the interrupt (busy without a system call): the
    /// operation fails with `.unresponsive`, the next fails at once, and once the thread runs its
    /// operations again the worker answers again. Stop on a thread that never answers abandons it.
    func testUnresponsiveOwnerFailsFastUntilItDrainsAgain() throws {
        let worker = try ConfinedWorker<Counter>(name: "worker-test", timeoutSeconds: 0.1)
        let target = Counter()
        try worker.start(target)
        let hold = try Hold(worker)
        XCTAssertThrowsError(try worker.perform { _ in 1 }) { XCTAssertEqual($0 as? WorkerError, .unresponsive) }
        let start = Date()
        XCTAssertThrowsError(try worker.perform { _ in 1 }) { XCTAssertEqual($0 as? WorkerError, .unresponsive) }
        XCTAssertLessThan(Date().timeIntervalSince(start), 0.05, "fails at once while the owner made no progress")
        hold.release()
        XCTAssertTrue(waitFor { (try? worker.perform { _ in 1 }) == 1 }, "answers again once it has drained")
        XCTAssertTrue(worker.stop())
    }

    /// Stop on a thread that does not answer (held inside an operation, no system call to
    /// interrupt) gives up after the two waits and abandons it, and every later operation fails
    /// at once as `.stopped` (not merely as unresponsive: the caller must not expect it back).
    func testStopAbandonsAStuckThreadAndLaterOperationsFailAsStopped() throws {
        let worker = try ConfinedWorker<Counter>(name: "worker-test", timeoutSeconds: 0.1)
        let target = Counter()
        try worker.start(target)
        let hold = try Hold(worker)
        XCTAssertFalse(worker.stop(), "a thread that does not answer is abandoned")
        let start = Date()
        XCTAssertThrowsError(try worker.perform { _ in 1 }) { XCTAssertEqual($0 as? WorkerError, .stopped) }
        XCTAssertLessThan(Date().timeIntervalSince(start), 0.05)
        XCTAssertFalse(worker.stop(), "a second stop waits for the thread again and does not pretend it ended")
        // Once free, the abandoned thread sees the stop flag and ends; a later stop joins it.
        hold.release()
        XCTAssertTrue(waitFor { target.loopEnded.load(ordering: .acquiring) })
        XCTAssertTrue(worker.stop())
    }

    /// Several stops at once all return true once the thread has ended, and it is joined once.
    func testConcurrentStopsAllSeeTheEnd() throws {
        let worker = try ConfinedWorker<Counter>(name: "worker-test", timeoutSeconds: 0.5)
        let target = Counter()
        try worker.start(target)
        let results = Mutex<[Bool]>([])
        DispatchQueue.concurrentPerform(iterations: 4) { _ in
            let r = worker.stop()
            results.withLock { $0.append(r) }
        }
        XCTAssertEqual(results.withLock { $0 }, [true, true, true, true])
        XCTAssertTrue(target.loopEnded.load(ordering: .acquiring))
    }

    /// A stop that comes while operations already fail fast (the thread did not answer one) still
    /// reaches the thread: once free, it ends.
    func testStopAfterAnUnresponsiveOperationStillEndsTheThread() throws {
        let worker = try ConfinedWorker<Counter>(name: "worker-test", timeoutSeconds: 0.1)
        let target = Counter()
        try worker.start(target)
        let hold = try Hold(worker)
        XCTAssertThrowsError(try worker.perform { _ in 1 }) { XCTAssertEqual($0 as? WorkerError, .unresponsive) }
        XCTAssertFalse(worker.stop(), "still held: abandoned for now")
        hold.release()
        XCTAssertTrue(waitFor { target.loopEnded.load(ordering: .acquiring) }, "the stop reached the thread once it was free")
        XCTAssertTrue(worker.stop())
    }

    /// Holds the worker's thread inside an operation (no progress, no system call to interrupt)
    /// until `release`.
    final class Hold {
        final class Flags: Sendable {
            let released = Atomic<Bool>(false)
            let started = Atomic<Bool>(false)
        }
        let flags = Flags()
        let thread: OSThread

        init(_ worker: ConfinedWorker<Counter>) throws {
            let flags = flags
            thread = try OSThread(name: "worker-holder") {
                do {
                    try worker.perform { _ in
                        flags.started.store(true, ordering: .releasing)
                        while !flags.released.load(ordering: .acquiring) { sched_yield() }
                    }
                } catch {
                    // Expected: this operation itself outlasts both waits.
                }
            }
            while !flags.started.load(ordering: .acquiring) { sched_yield() }
        }

        func release() {
            flags.released.store(true, ordering: .releasing)
            thread.join()
        }
    }

    private func waitFor(_ condition: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(5)
        while Date() < deadline {
            if condition() { return true }
            usleep(10_000)
        }
        return false
    }
}
