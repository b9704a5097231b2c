// Generates the parameter-server gRPC code from proto/param_server.proto, using the protoc
// binary vendored as a crate so no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/param_server.proto");
    tonic_prost_build::compile_protos("proto/param_server.proto")?;
    Ok(())
}
