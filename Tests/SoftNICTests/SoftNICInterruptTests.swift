#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Platform
import SoftNIC
import VDPA
import VhostUserFrontend
import Virtio
import XCTest

/// When the SoftNIC interrupts the guest: EVENT_IDX's used_event, and VRING_AVAIL_F_NO_INTERRUPT
/// without it.
final class SoftNICInterruptTests: SoftNICTestCase {
    func testEventIdxInterruptsExactlyWhenUsedEventIsPassed() throws {
        let env = try makeDaemon([.init(id: "sink0", link: "sink")])
        let g = try env.connect("sink0", features: Features.all)
        let tx = try g.startRing(1)
        let call = g.callFDs[1]!
        tx.setUsedEvent(4)  // "interrupt me when used.idx passes 4"
        EventFD.drain(call)

        for i in 0..<4 { g.sendAndComplete([TestFrames.make(length: 60, seed: i)]) }
        usleep(50_000)
        XCTAssertFalse(eventFDReadable(call), "no interrupt while used.idx <= used_event")
        XCTAssertEqual(env.queue("sink0", 1).interrupts, 0)

        g.sendAndComplete([TestFrames.make(length: 60, seed: 4)])  // used.idx 4 → 5 passes used_event
        XCTAssertGreaterThan(try g.frontend.waitForCall(ring: 1, timeout: .seconds(2)), 0, "interrupt when used.idx passes used_event")
        // The counter is bumped just after the eventfd is signalled.
        XCTAssertTrue(waitUntil(1) { env.queue("sink0", 1).interrupts == 1 })

        g.sendAndComplete([TestFrames.make(length: 60, seed: 5)])  // 5 → 6: used_event (4) is behind
        usleep(50_000)
        XCTAssertFalse(eventFDReadable(call), "no second interrupt for the same used_event")
        XCTAssertEqual(env.queue("sink0", 1).interrupts, 1)

        // A batch of 5 crossing used_event once raises one interrupt.
        tx.setUsedEvent(8)
        g.sendAndComplete((0..<5).map { TestFrames.make(length: 60, seed: 10 + $0) })  // 6 → 11
        XCTAssertGreaterThan(try g.frontend.waitForCall(ring: 1, timeout: .seconds(2)), 0)
        XCTAssertTrue(waitUntil(1) { env.queue("sink0", 1).interrupts == 2 })
        usleep(50_000)
        XCTAssertFalse(eventFDReadable(call))
        XCTAssertEqual(env.queue("sink0", 1).interrupts, 2)
    }

    func testNoInterruptFlagSuppressesInterruptsWithoutEventIdx() throws {
        let env = try makeDaemon([.init(id: "lb0", link: "loopback")])
        let g = try env.connect("lb0", features: Features.base | Features.mrg | Features.indirect)
        XCTAssertFalse(g.eventIdx)
        let rx = try g.startRing(0)
        let tx = try g.startRing(1)
        rx.disableInterrupts()
        tx.disableInterrupts()
        let rxCall = g.callFDs[0]!, txCall = g.callFDs[1]!
        EventFD.drain(rxCall)
        EventFD.drain(txCall)
        g.postRX(count: 32)

        for i in 0..<5 { g.sendAndComplete([TestFrames.make(length: 80, seed: i)]) }
        g.sendAndComplete((5..<10).map { TestFrames.make(length: 80, seed: $0) })
        XCTAssertEqual(g.receive(10).count, 10)
        usleep(50_000)
        XCTAssertFalse(eventFDReadable(txCall), "TX: NO_INTERRUPT set, yet the call eventfd was signalled")
        XCTAssertFalse(eventFDReadable(rxCall), "RX: NO_INTERRUPT set, yet the call eventfd was signalled")
        XCTAssertEqual(env.queue("lb0", 0).interrupts, 0)
        XCTAssertEqual(env.queue("lb0", 1).interrupts, 0)

        // Clearing the flag on RX only: RX interrupts, TX stays quiet.
        _ = rx.enableInterrupts()
        g.sendAndComplete([TestFrames.make(length: 80, seed: 99)])
        XCTAssertGreaterThan(try g.frontend.waitForCall(ring: 0, timeout: .seconds(2)), 0, "RX interrupt once NO_INTERRUPT is cleared")
        XCTAssertEqual(g.receive(1).count, 1)
        XCTAssertTrue(waitUntil(1) { env.queue("lb0", 0).interrupts == 1 })
        usleep(50_000)
        XCTAssertFalse(eventFDReadable(txCall))
        XCTAssertEqual(env.queue("lb0", 0).interrupts, 1)
        XCTAssertEqual(env.queue("lb0", 1).interrupts, 0)
    }
}
