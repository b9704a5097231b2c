// Generates the parameter-server gRPC code from proto/param_server.proto, using the protoc
// binary vendored as a crate so no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/param_server.proto");
    // Chunk payloads as `Bytes`: slices of one buffer when sent, of the received frame when
    // decoded, instead of a copy per chunk each way.
    tonic_prost_build::configure()
        .bytes(".rlt.ps.v1.TensorChunk.data")
        .compile_protos(&["proto/param_server.proto"], &["proto"])?;
    Ok(())
}
