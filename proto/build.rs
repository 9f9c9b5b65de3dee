use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so a fresh clone builds without a system protobuf-compiler.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("eventjournal_descriptor.bin"))
        .compile_protos(&["proto/eventjournal/v1/eventjournal.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
