/// Why a GSO frame cannot be segmented.
struct OffloadError: Error, Equatable, CustomStringConvertible {
    let text: String
    var description: String { text }
}
