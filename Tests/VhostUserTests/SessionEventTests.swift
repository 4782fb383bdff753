import Platform
import XCTest
@testable import VhostUser

/// The device side hears of a frontend's changes as typed events carrying the values they are
/// about (never the session), and a failing event fails the message.
final class SessionEventTests: XCTestCase {
    /// Records every event; `failOn` makes the named event throw.
    final class RecordingHooks: VhostUserDeviceHooks {
        var events: [String] = []
        var started: [RingSetup] = []
        var enabledAtFeatures: [Bool] = []
        var logs: [DirtyLog?] = []
        var tables: [GuestMemoryTable] = []
        var failOn: String?

        func note(_ e: String) throws(VhostUserError) {
            events.append(e)
            if failOn == e { throw VhostUserError(.device, e, field: "device", "test device refused") }
        }
        func featuresChanged(_ features: UInt64, ringsEnabled: [Bool]) throws(VhostUserError) {
            enabledAtFeatures = ringsEnabled
            try note("features")
        }
        func memoryTableChanged(_ table: GuestMemoryTable) throws(VhostUserError) { tables.append(table); try note("memory") }
        func vringStarted(_ ring: RingSetup) throws(VhostUserError) { started.append(ring); try note("start \(ring.index)") }
        func vringStopping(_ index: Int) throws(VhostUserError) -> UInt32? { try note("stop \(index)"); return 42 }
        func vringEnableChanged(_ index: Int, enabled: Bool) throws(VhostUserError) { try note("enable \(index) \(enabled)") }
        func vringCallChanged(_ index: Int, call: SharedFD?) throws(VhostUserError) { try note("call \(index) \(call != nil)") }
        func usedLogAddressChanged(_ index: Int, usedLogGPA: UInt64) throws(VhostUserError) {
            try note("log address \(index) 0x\(String(usedLogGPA, radix: 16))")
        }
        func logChanged(_ log: DirtyLog?) throws(VhostUserError) { logs.append(log); try note("log \(log != nil)") }
        func sendRARP(mac: [UInt8]) -> Bool { events.append("rarp \(mac.map { String($0, radix: 16) }.joined(separator: ":"))"); return true }
        func statusChanged(_ status: UInt8) { events.append("status \(status)") }
        func reset() { events.append("reset") }
    }

    func driver(_ hooks: RecordingHooks) throws -> SessionDriver {
        let d = SessionDriver()
        d.session.hooks = hooks
        try d.negotiate()
        try d.send(.setMemTable, .memoryTable([region(gpa: 0, size: 1 << 20)]), fds: [memfd(1 << 20)])
        return d
    }

    func address(_ i: UInt32, flags: UInt32 = 0, log: UInt64 = 0) -> VhostUserPayload {
        .vringAddress(VringAddress(index: i, flags: flags, descUserAddr: testUserBase + 0x10000, usedUserAddr: testUserBase + 0x18000,
                                   availUserAddr: testUserBase + 0x14000, logGuestAddr: log))
    }

    func testRingStartCarriesItsSetupAndLogAddress() throws {
        let hooks = RecordingHooks()
        let d = try driver(hooks)
        XCTAssertEqual(hooks.tables.last?.regions.count, 1, "the memory event carries the new table")
        try d.send(.setVringNum, .vringState(VringState(index: 0, num: 128)))
        try d.send(.setVringBase, .vringState(VringState(index: 0, num: 9)))
        try d.send(.setVringAddr, address(0, flags: VringAddress.logFlag, log: 0x9000))
        try d.send(.setVringEnable, .vringState(VringState(index: 0, num: 1)))
        XCTAssertEqual(hooks.events.last, "enable 0 true", "delivered before the ring starts too (the device side ignores it then)")
        try d.send(.setVringKick, .vringFile(index: 0, hasFD: true), fds: [EventFD.make().take()])
        let r = try XCTUnwrap(hooks.started.last)
        XCTAssertEqual(r.index, 0)
        XCTAssertEqual(r.size, 128)
        XCTAssertEqual(r.base, 9)
        XCTAssertEqual(r.descGPA, 0x10000)
        XCTAssertEqual(r.availGPA, 0x14000)
        XCTAssertEqual(r.usedGPA, 0x18000)
        XCTAssertEqual(r.usedLogGPA, 0x9000, "the log address the frontend gave with the log flag")
        XCTAssertTrue(r.enabled)
        XCTAssertNotNil(r.kick)
        // The log flag toggled on the running ring: an event with the new log address.
        try d.send(.setVringAddr, address(0))
        XCTAssertEqual(hooks.events.last, "log address 0 0x18000")
        try d.send(.setVringCall, .vringFile(index: 0, hasFD: true), fds: [EventFD.make().take()])
        XCTAssertEqual(hooks.events.last, "call 0 true")
        try d.send(.getVringBase, .vringState(VringState(index: 0, num: 0)))
        XCTAssertEqual(hooks.events.last, "stop 0")
        XCTAssertEqual(d.session.vrings[0].base, 42, "the device's answer is the ring's base")
    }

    func testFeaturesEventCarriesEnableStates() throws {
        let hooks = RecordingHooks()
        let d = SessionDriver()
        d.session.hooks = hooks
        // Without PROTOCOL_FEATURES, SET_FEATURES enables every ring: the event says so.
        try d.send(.setFeatures, .u64(1 << 32))
        XCTAssertEqual(hooks.enabledAtFeatures, [true, true, true, true])
    }

    func testLogEventsCarryTheLogAndItsEnd() throws {
        let hooks = RecordingHooks()
        let d = try driver(hooks)
        try d.send(.setFeatures, .u64(d.session.ackedFeatures | VirtioFeatureBits.logAll))
        try d.send(.setLogBase, .log(LogDescription(size: 32, offset: 0)), fds: [memfd(4096)])
        XCTAssertTrue(hooks.logs.last! === d.session.log, "the event carries the session's new log")
        try d.send(.setFeatures, .u64(d.session.ackedFeatures & ~VirtioFeatureBits.logAll))
        XCTAssertEqual(Array(hooks.events.suffix(2)), ["features", "log false"], "logging off, then the log is dropped")
        XCTAssertNil(d.session.log)
    }

    func testAFailingEventFailsTheMessage() throws {
        let hooks = RecordingHooks()
        let d = try driver(hooks)
        hooks.failOn = "features"
        XCTAssertThrowsError(try d.send(.setFeatures, .u64(d.session.ackedFeatures | VirtioFeatureBits.logAll))) { error in
            XCTAssertEqual((error as? VhostUserError)?.layer, .device)
        }
    }

    func testRARPStatusAndResetReachTheDevice() throws {
        let hooks = RecordingHooks()
        let d = try driver(hooks)
        try d.send(.sendRARP, .u64(0x0605_0403_0201))
        try d.send(.setStatus, .u64(0x0f))
        try d.send(.resetDevice)
        XCTAssertEqual(Array(hooks.events.suffix(3)), ["rarp 1:2:3:4:5:6", "status 15", "reset"])
    }
}
