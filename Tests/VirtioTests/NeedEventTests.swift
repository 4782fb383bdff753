import XCTest
@testable import Virtio

final class NeedEventTests: XCTestCase {
    func testNothingPublishedNeverNeedsAnEvent() {
        for e: UInt16 in [0, 1, 5, 0x7FFF, 0xFFFF] {
            XCTAssertFalse(vringNeedEvent(eventIndex: e, newIndex: 5, oldIndex: 5))
        }
    }

    func testEventInsideThePublishedWindow() {
        // old = 10, new = 13: entries 10, 11, 12 were published.
        XCTAssertTrue(vringNeedEvent(eventIndex: 10, newIndex: 13, oldIndex: 10))
        XCTAssertTrue(vringNeedEvent(eventIndex: 12, newIndex: 13, oldIndex: 10))
        XCTAssertFalse(vringNeedEvent(eventIndex: 13, newIndex: 13, oldIndex: 10)) // not reached yet
        XCTAssertFalse(vringNeedEvent(eventIndex: 9, newIndex: 13, oldIndex: 10))  // passed earlier
        XCTAssertFalse(vringNeedEvent(eventIndex: 200, newIndex: 13, oldIndex: 10))
    }

    func testWindowAcrossWraparound() {
        // old = 0xFFFE, new = 0x0001: entries 0xFFFE, 0xFFFF, 0x0000.
        XCTAssertTrue(vringNeedEvent(eventIndex: 0xFFFE, newIndex: 1, oldIndex: 0xFFFE))
        XCTAssertTrue(vringNeedEvent(eventIndex: 0xFFFF, newIndex: 1, oldIndex: 0xFFFE))
        XCTAssertTrue(vringNeedEvent(eventIndex: 0x0000, newIndex: 1, oldIndex: 0xFFFE))
        XCTAssertFalse(vringNeedEvent(eventIndex: 0x0001, newIndex: 1, oldIndex: 0xFFFE))
        XCTAssertFalse(vringNeedEvent(eventIndex: 0xFFFD, newIndex: 1, oldIndex: 0xFFFE))
    }

    func testLargestWindow() {
        // 65535 entries published: every event except `new` itself is in the window.
        XCTAssertTrue(vringNeedEvent(eventIndex: 0, newIndex: 0xFFFF, oldIndex: 0))
        XCTAssertTrue(vringNeedEvent(eventIndex: 0xFFFE, newIndex: 0xFFFF, oldIndex: 0))
        XCTAssertFalse(vringNeedEvent(eventIndex: 0xFFFF, newIndex: 0xFFFF, oldIndex: 0))
    }

    func testMatchesTheWindowDefinitionExhaustivelyForSmallSteps() {
        for old: UInt16 in [0, 1, 0x7FFF, 0xFFF0, 0xFFFF] {
            for step: UInt16 in 0...20 {
                let new = old &+ step
                for offset in -5...25 {
                    let event = old &+ UInt16(bitPattern: Int16(offset))
                    let expected = offset >= 0 && offset < Int(step)
                    XCTAssertEqual(vringNeedEvent(eventIndex: event, newIndex: new, oldIndex: old), expected,
                                   "old \(old) new \(new) event \(event)")
                }
            }
        }
    }
}
