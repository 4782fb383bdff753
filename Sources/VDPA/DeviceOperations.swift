import DeviceFramework
import Logging
import Platform
import Relay
import VhostUser

/// A device operation for the frontend's message `request`: its failure fails the message.
func dev<T>(_ logger: Logger, _ request: String, _ body: () throws(DeviceError) -> T) throws(VhostUserError) -> T {
    do { return try body() } catch {
        logger.error("\(request): \(error)")
        throw VhostUserError(.device, request, field: "device", error.message)
    }
}

/// A relay operation for the frontend's message `request`: its failure fails the message.
@discardableResult
func rel<T>(_ logger: Logger, _ request: String, _ body: () throws(SystemError) -> T) throws(VhostUserError) -> T {
    do { return try body() } catch {
        logger.error("\(request): \(error)")
        throw VhostUserError(.device, request, field: "relay", error.description)
    }
}
