// swift-tools-version:6.0
import PackageDescription

let strict: [SwiftSetting] = [.swiftLanguageMode(.v6)]
/// The DMA engine's and the relay's ring state lives in classes confined to one thread each (see
/// docs/ARCHITECTURE.md, "Threads"); runtime exclusivity checks on those properties cost about a
/// third of the engine's time per packet, so these two modules build without them. Bounds and
/// overflow checks stay on.
let hotPath: [SwiftSetting] = strict + [.unsafeFlags(["-enforce-exclusivity=unchecked"])]

let package = Package(
    name: "swift-vdpa",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "vdpad", targets: ["vdpad"]),
        .executable(name: "vdpactl", targets: ["vdpactl"]),
        .library(name: "VhostUserFrontend", targets: ["VhostUserFrontend"]),
        .library(name: "VDPA", targets: ["VDPA"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-atomics", from: "1.2.0"),
        .package(url: "https://github.com/LebJe/TOMLKit", from: "0.6.0"),
    ],
    targets: [
        .target(name: "CVDPAShims"),
        .target(name: "Platform", dependencies: ["CVDPAShims"], swiftSettings: strict),
        .target(name: "Virtio", dependencies: [
            "Platform", .product(name: "Atomics", package: "swift-atomics"),
        ], swiftSettings: strict),
        // The vDPA device framework: the device protocol, its value types and the virtio-net
        // feature sets. Device drivers depend on it, never on the daemon (docs/ARCHITECTURE.md).
        .target(name: "DeviceFramework", dependencies: ["Platform", "Virtio"], swiftSettings: strict),
        .target(name: "VhostUser", dependencies: [
            "Platform", "Virtio", .product(name: "Logging", package: "swift-log"),
            .product(name: "Atomics", package: "swift-atomics"),
        ], swiftSettings: strict),
        .target(name: "VhostUserFrontend", dependencies: ["Platform", "Virtio", "VhostUser"], swiftSettings: strict),
        .target(name: "Relay", dependencies: [
            "Platform", "Virtio", "VhostUser", "DeviceFramework", "CVDPAShims", .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: hotPath),
        .target(name: "VDPA", dependencies: [
            "Platform", "Virtio", "VhostUser", "DeviceFramework", "Relay", .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: strict),
        // vdpad's configuration file (TOML): its own module, so that the daemon's library (and
        // the fuzz targets built from it) does not depend on TOMLKit's C++.
        .target(name: "VDPAConfig", dependencies: ["VDPA", .product(name: "TOMLKit", package: "TOMLKit")], swiftSettings: strict),
        .target(name: "SoftNIC", dependencies: [
            "Platform", "Virtio", "DeviceFramework", "CVDPAShims", .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: hotPath),
        // The kernel vhost-vdpa driver: a VDPADevice over /dev/vhost-vdpa-N.
        .target(name: "VhostVDPA", dependencies: [
            "Platform", "Virtio", "DeviceFramework", "CVDPAShims", .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: strict),
        // The SoftNIC exported to the kernel as a VDUSE device (docs/ARCHITECTURE.md, "VDUSE").
        .target(name: "VDUSE", dependencies: [
            "SoftNIC", "DeviceFramework", "Virtio", "Platform", "CVDPAShims", .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: strict),
        .executableTarget(name: "vdpad", dependencies: [
            "VDPA", "VDPAConfig", "DeviceFramework", "SoftNIC", "VhostVDPA", "VDUSE", .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: strict),
        .executableTarget(name: "vdpa-bench", dependencies: [
            "VDPA", "VhostUserFrontend", "Virtio", "VhostUser", "Platform", "CVDPAShims",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ], swiftSettings: strict),
        .executableTarget(name: "vdpactl", dependencies: [
            "VDPA", .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ], swiftSettings: strict),
        .testTarget(name: "PlatformTests", dependencies: ["Platform"], swiftSettings: strict),
        .testTarget(name: "VirtioTests", dependencies: ["Virtio", "VhostUser", "Platform"], swiftSettings: strict),
        .testTarget(name: "VhostUserTests", dependencies: ["VhostUser", "VhostUserFrontend", "Platform", "Virtio"], swiftSettings: strict),
        .testTarget(name: "VDPATests", dependencies: ["VDPA", "VDPAConfig", "DeviceFramework", "VhostUserFrontend", "VhostUser", "Platform"], swiftSettings: strict),
        .testTarget(name: "VhostVDPATests", dependencies: ["VhostVDPA", "DeviceFramework", "Virtio", "Platform"], swiftSettings: strict),
        .testTarget(name: "VDUSETests", dependencies: ["VDUSE", "SoftNIC", "DeviceFramework", "Virtio", "Platform", "CVDPAShims"], swiftSettings: strict),
        .testTarget(name: "SoftNICTests", dependencies: ["SoftNIC", "VhostVDPA", "DeviceFramework", "VDPA", "Relay", "VhostUserFrontend", "VhostUser", "Virtio", "Platform"], swiftSettings: strict),
    ]
)
