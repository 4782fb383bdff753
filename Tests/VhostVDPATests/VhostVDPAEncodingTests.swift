import XCTest
@testable import VhostVDPA
final class VhostVDPAEncodingTests: XCTestCase {
    func testPlaceholderBuild() { XCTAssertEqual(VhostVDPAFile.encode(.batchBegin).count, 72) }
}
