#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Foundation
import Platform
import Synchronization
import XCTest

final class Owner: Sendable {
    let count = Atomic<Int>(0)
    let stop = Atomic<Bool>(false)
}

final class MailboxTests: XCTestCase {
    /// Operations posted to a running owner thread run there; once it has ended, posting fails at
    /// once instead of waiting forever (a stopped device or relay must not hang its port).
    func testPerformRunsWhileTheOwnerRunsAndFailsAtOnceAfterItEnds() throws {
        let mailbox = try Mailbox<Owner>()
        let owner = Owner()
        let thread = try OSThread(name: "mailbox-test") {
            while !owner.stop.load(ordering: .acquiring) {
                if mailbox.hasPending { mailbox.drain(owner) }
                var p = pollfd(fd: mailbox.wake.raw, events: Int16(POLLIN), revents: 0)
                _ = poll(&p, 1, 100)
                EventFD.drain(mailbox.wake.raw)
            }
            mailbox.close()
        }
        XCTAssertTrue(mailbox.perform { $0.count.add(1, ordering: .relaxed) })
        XCTAssertTrue(mailbox.perform { $0.count.add(1, ordering: .relaxed) })
        XCTAssertEqual(owner.count.load(ordering: .relaxed), 2)
        XCTAssertTrue(mailbox.perform { $0.stop.store(true, ordering: .releasing) })
        thread.join()
        let start = Date()
        XCTAssertFalse(mailbox.perform { $0.count.add(1, ordering: .relaxed) }, "an ended owner must refuse at once")
        XCTAssertLessThan(Date().timeIntervalSince(start), 1)
        XCTAssertEqual(owner.count.load(ordering: .relaxed), 2)
        XCTAssertTrue(mailbox.isClosed)
    }

    /// An operation queued when the owner ends is released, not run, and reported as failed.
    func testQueuedOperationIsReleasedWhenTheOwnerEnds() throws {
        let mailbox = try Mailbox<Owner>()
        let owner = Owner()
        let result = Mutex<Bool?>(nil)
        let poster = try OSThread(name: "mailbox-poster") {
            let ran = mailbox.perform { $0.count.add(1, ordering: .relaxed) }
            result.withLock { $0 = ran }
        }
        // Wait until the post is queued (it signals the wake eventfd), then end the owner.
        var p = pollfd(fd: mailbox.wake.raw, events: Int16(POLLIN), revents: 0)
        XCTAssertEqual(poll(&p, 1, 5000), 1)
        XCTAssertTrue(mailbox.hasPending)
        mailbox.close()
        poster.join()
        XCTAssertEqual(result.withLock { $0 }, false)
        XCTAssertEqual(owner.count.load(ordering: .relaxed), 0)
    }
}
