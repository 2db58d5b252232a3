//! etcd's v3 wire schema and MetaStore's internal messages, as generated Rust types and
//! gRPC stubs. This crate owns nothing but the schema: no logic lives here.
//!
//! Package paths mirror etcd's so that gRPC method paths (`/etcdserverpb.KV/Range`, ...)
//! are the ones etcd clients call.
#![allow(clippy::all, clippy::pedantic)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}
pub mod authpb {
    tonic::include_proto!("authpb");
}
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}
pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}
/// MetaStore's own messages: the replicated request envelope.
pub mod metastore {
    tonic::include_proto!("metastore");
}
