//! Compiles the .proto files under `proto/` with the pure-Rust `protox` compiler (so a
//! fresh machine needs no `protoc`), then generates prost types and tonic stubs with
//! madsim-tonic-build, which emits both the real and the simulated stubs.
use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/mvccpb/kv.proto",
    "proto/authpb/auth.proto",
    "proto/etcdserverpb/rpc.proto",
    "proto/v3lockpb/v3lock.proto",
    "proto/v3electionpb/v3election.proto",
    "proto/metastore/internal.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("metastore_descriptor.bin");
    let fds = protox::compile(PROTOS, ["proto"])?;
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_build::configure()
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        .generate_default_stubs(true)
        .emit_rerun_if_changed(false)
        // A watch event reaches every matching watcher: with `Bytes` its key and value
        // are shared, not copied, per watcher.
        .bytes([".mvccpb.KeyValue"])
        .compile_protos(PROTOS, &["proto"])?;
    Ok(())
}
