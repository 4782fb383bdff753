#if canImport(Glibc)
import Glibc
#endif
import Platform
import XCTest

/// Signals turned into an eventfd that a loop waits on (what vdpad's main thread does).
final class SignalNotifierTests: XCTestCase {
    /// A signal the notifier handles makes its eventfd readable and does not end the process;
    /// SIGPIPE is ignored from then on.
    func testHandledSignalSignalsTheEventFD() throws {
        let fd = try SignalNotifier.install([SIGUSR2])
        _ = EventFD.drain(fd)
        XCTAssertFalse(try Poll.waitReadable(fd, until: Deadline(secondsFromNow: 0)), "nothing raised yet")
        XCTAssertEqual(raise(SIGUSR2), 0)
        XCTAssertTrue(try Poll.waitReadable(fd, until: Deadline(secondsFromNow: 5)), "the handler did not signal the eventfd")
        XCTAssertEqual(EventFD.drain(fd), 1)
        XCTAssertEqual(try SignalNotifier.install([SIGUSR2]), fd, "one eventfd for the process")
        var old = sigaction()
        XCTAssertEqual(sigaction(SIGPIPE, nil, &old), 0)
        XCTAssertEqual(unsafeBitCast(old.__sigaction_handler.sa_handler, to: Int.self), unsafeBitCast(SIG_IGN, to: Int.self))
    }

    /// A signal number the kernel refuses (SIGKILL cannot be caught) is an error, not ignored.
    func testUncatchableSignalIsAnError() {
        XCTAssertThrowsError(try SignalNotifier.install([SIGKILL])) { error in
            XCTAssertEqual((error as? SystemError)?.code, .invalidArgument)
        }
    }
}
