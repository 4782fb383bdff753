import Foundation
import Logging
import Synchronization
import XCTest
@testable import VDPA

/// `--log-format json`: each line one JSON object that any parser reads back exactly, whatever
/// the message holds, with the logger's and the call's metadata.
final class JSONLogHandlerTests: XCTestCase {
    func testLinesParseBackExactlyWithMetadata() throws {
        let lines = Mutex<[String]>([])
        var h = JSONLogHandler(label: "vdpad") { line in lines.withLock { $0.append(line) } }
        h.logLevel = .debug
        h[metadataKey: "port"] = "vm1"
        let tricky = "quote \" backslash \\ newline \n tab \t bell \u{07} nul \u{0} é 🚀"
        h.log(level: .warning, message: "\(tricky)", metadata: ["ring": "3"], source: "Relay", file: #file, function: #function, line: #line)
        let out = lines.withLock { $0 }
        XCTAssertEqual(out.count, 1)
        XCTAssertTrue(out[0].hasSuffix("}\n"))
        XCTAssertEqual(out[0].filter { $0 == "\n" }.count, 1, "one line per entry")
        let o = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(out[0].utf8)) as? [String: String])
        XCTAssertEqual(o["message"], tricky)
        XCTAssertEqual(o["port"], "vm1")
        XCTAssertEqual(o["ring"], "3")
        XCTAssertEqual(o["level"], "warning")
        XCTAssertEqual(o["source"], "Relay")
        XCTAssertEqual(o["label"], "vdpad")
        XCTAssertNotNil(o["time"].flatMap { ISO8601DateFormatter().date(from: $0.replacingOccurrences(of: #"\.\d+"#, with: "", options: .regularExpression)) })
    }
}
