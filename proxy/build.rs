//! Compiles the integration tests' gRPC service (`tests/proto/echo.proto`)
//! with a pure-Rust protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "tests/proto/echo.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["tests/proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
